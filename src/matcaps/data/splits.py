"""Train / validation / test splits of a prepared dataset.

``split="standard"``: the published train and test sets.

Validation is held out from the **training** set (never from the test set, unlike IBM,
which scored a slice of the test set during training):

* smallNORB: every image of the instances ``val_instances`` (default ``(4,)``: instance
  4 of each of the 5 categories, 9,720 images; the training file holds instances
  4, 6, 7, 8, 9), so validation measures generalisation to unseen objects like the test
  set does;
* MNIST / Fashion-MNIST: a random hold-out of ``val_size`` images drawn with ``seed``.

``validation=False`` keeps the whole training set and returns ``val=None``.

Novel-viewpoint splits of Hinton et al. (2018), smallNORB only.  Training images are
taken from the training file and test images from the test file (so the train/test
objects stay disjoint, as in the standard split), filtered by viewpoint:

* ``split="azimuth"``: train on azimuths 300, 320, 340, 0, 20, 40°; test on the other
  twelve (60..280°);
* ``split="elevation"``: train on the 3 lowest elevations (30, 35, 40°); test on the 6
  highest (45..70°).

Validation comes from the (viewpoint-filtered) training images, by instance as above,
so it shows *familiar* viewpoints of unseen objects.

NORB info coding: elevation code ``e`` in 0..8 is ``30 + 5e`` degrees; azimuth code ``a``
in 0, 2, .., 34 is ``10a`` degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from matcaps.errors import ConfigError, DataFormatError, DatasetNotFoundError
from matcaps.data.cache import NORB_INFO_COLUMNS, cache_dir, read_manifest
from matcaps.data.datasets import CachedImageDataset
from matcaps.data.folders import FOLDER_DATASET, FolderOptions, load_folder
from matcaps.data.sources import DatasetInfo, check_dataset_name, dataset_info
from matcaps.data.transforms import DigitsTransform, NorbTransform

#: Accepted values of :attr:`DataConfig.split`.
SPLIT_KINDS: tuple[str, ...] = ("standard", "azimuth", "elevation")

#: Degrees per NORB azimuth code step (codes 0, 2, .., 34 → 0, 20, .., 340°).
AZIMUTH_DEG_PER_CODE = 10

#: Elevation of code 0, and degrees per code (codes 0..8 → 30..70°).
ELEVATION_BASE_DEG = 30
ELEVATION_DEG_PER_CODE = 5

#: Hinton et al.'s training azimuths for the novel-viewpoint experiment.
AZIMUTH_TRAIN_DEG: frozenset[int] = frozenset({300, 320, 340, 0, 20, 40})

#: Hinton et al.'s training elevations (the 3 lowest) for the novel-viewpoint experiment.
ELEVATION_TRAIN_DEG: frozenset[int] = frozenset({30, 35, 40})


def azimuth_degrees(code: np.ndarray) -> np.ndarray:
    """NORB azimuth codes (0, 2, .., 34) → degrees (0, 20, .., 340)."""
    return np.asarray(code, dtype=np.int64) * AZIMUTH_DEG_PER_CODE


def elevation_degrees(code: np.ndarray) -> np.ndarray:
    """NORB elevation codes (0..8) → degrees (30..70)."""
    return ELEVATION_BASE_DEG + np.asarray(code, dtype=np.int64) * ELEVATION_DEG_PER_CODE


@dataclass(frozen=True)
class DataConfig:
    """Which data to load and how to split it.

    Attributes:
        dataset: one of ``DATASET_NAMES``, or ``folder`` (:mod:`~matcaps.data.folders`).
        root: data root (the cache is ``root/<dataset>/prepared``); for ``folder``, the image folder.
        split: ``"standard"``, or smallNORB's ``"azimuth"`` / ``"elevation"``.
        val_instances: smallNORB instances held out of training for validation.
        val_size: MNIST-family: images held out of training for validation.
        validation: hold out a validation set at all.
        seed: seeds the MNIST hold-out and every training augmentation.
        folder: how image folders are read and split (``dataset="folder"`` only).
    """

    dataset: str = "smallnorb"
    root: Path = Path("data")
    split: str = "standard"
    val_instances: tuple[int, ...] = (4,)
    val_size: int = 5000
    validation: bool = True
    seed: int = 0
    folder: FolderOptions = FolderOptions()

    def __post_init__(self) -> None:
        if self.dataset != FOLDER_DATASET:
            check_dataset_name(self.dataset)
            if (self.folder.image_size, self.folder.channels) != (None, None):
                raise ConfigError("--image-size and --channels apply to image folders (--dataset folder) only")
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "val_instances", tuple(int(i) for i in self.val_instances))
        if self.split not in SPLIT_KINDS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of {', '.join(SPLIT_KINDS)}")
        if self.split != "standard" and self.dataset != "smallnorb":
            raise ConfigError(f"split {self.split!r} needs viewpoint information, which only smallnorb has")
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")


class DataSplits(NamedTuple):
    """The datasets of one :class:`DataConfig` (``val`` is None without validation)."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo


@dataclass
class _Split:
    """The arrays of one cached split (labels and metadata in memory, images on disk)."""

    images_path: Path
    labels: np.ndarray
    metadata: dict[str, np.ndarray] = field(default_factory=dict)


def _load_split(cache: Path, manifest: dict, split: str) -> _Split:
    files = manifest["splits"][split]["files"]
    labels = np.load(cache / files["labels"])
    metadata: dict[str, np.ndarray] = {}
    if "info" in files:
        info = np.load(cache / files["info"]).astype(np.int64)
        columns = dict(zip(NORB_INFO_COLUMNS, info.T))
        metadata = {
            "instance": columns["instance"],
            "elevation_deg": elevation_degrees(columns["elevation"]),
            "azimuth_deg": azimuth_degrees(columns["azimuth"]),
            "lighting": columns["lighting"],
        }
    return _Split(cache / files["images"], labels, metadata)


def _viewpoint_masks(config: DataConfig, train: _Split, test: _Split) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the training and test rows that the split keeps."""
    if config.split == "azimuth":
        key, familiar = "azimuth_deg", AZIMUTH_TRAIN_DEG
    elif config.split == "elevation":
        key, familiar = "elevation_deg", ELEVATION_TRAIN_DEG
    else:
        return np.ones(len(train.labels), bool), np.ones(len(test.labels), bool)
    values = np.fromiter(familiar, dtype=np.int64)
    return np.isin(train.metadata[key], values), ~np.isin(test.metadata[key], values)


def _hold_out(config: DataConfig, train: _Split, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Split the candidate training rows into (train rows, validation rows or None)."""
    if not config.validation:
        return candidates, None
    if config.dataset == "smallnorb":
        held = np.isin(train.metadata["instance"][candidates], np.asarray(config.val_instances, dtype=np.int64))
        present = sorted(set(np.unique(train.metadata["instance"][candidates]).tolist()))
        if not held.any():
            raise ConfigError(
                f"val_instances {list(config.val_instances)} select no training image; "
                f"the training instances are {present}"
            )
        if held.all():
            raise ConfigError(f"val_instances {list(config.val_instances)} hold out every training instance {present}")
        return candidates[~held], candidates[held]
    if not 0 < config.val_size < len(candidates):
        raise ConfigError(
            f"val_size {config.val_size} must be between 1 and {len(candidates) - 1} "
            f"(the training set has {len(candidates)} images); use validation=False to disable it"
        )
    permutation = np.random.default_rng(config.seed).permutation(len(candidates))
    val = np.sort(candidates[permutation[: config.val_size]])
    rest = np.sort(candidates[permutation[config.val_size :]])
    return rest, val


def dataset_transforms(name: str) -> tuple:
    """The training and the evaluation transform of dataset ``name`` (validation, test, ``matcaps predict``)."""
    if name == FOLDER_DATASET:
        return DigitsTransform(train=True), DigitsTransform(train=False)
    if check_dataset_name(name) == "smallnorb":
        return NorbTransform(train=True), NorbTransform(train=False)
    return DigitsTransform(train=True), DigitsTransform(train=False)


def load_splits(config: DataConfig) -> DataSplits:
    """Build the train / validation / test datasets of ``config`` from the prepared cache.

    Raises:
        DatasetNotFoundError: no prepared cache (the message says which command makes it).
        DataFormatError: the cache is damaged (rerun the command with ``--force``).
        ConfigError: the split / validation options select nothing.
    """
    name = config.dataset
    if name == FOLDER_DATASET:
        return load_folder(config.root, config.folder, config.validation, config.seed)
    cache = cache_dir(name, config.root)
    command = f"matcaps data {name} --root {config.root}"
    try:
        manifest = read_manifest(cache, name)
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(f"{name} is not prepared in {config.root} ({error}); run `{command}`") from error
    except DataFormatError as error:
        raise DataFormatError(f"{error}; rebuild the cache with `{command} --force`") from error
    train, test = _load_split(cache, manifest, "train"), _load_split(cache, manifest, "test")
    train_mask, test_mask = _viewpoint_masks(config, train, test)
    candidates = np.flatnonzero(train_mask)
    train_rows, val_rows = _hold_out(config, train, candidates)

    train_transform, eval_transform = dataset_transforms(name)

    def make(split: _Split, rows: np.ndarray, transform) -> CachedImageDataset:
        return CachedImageDataset(split.images_path, split.labels, rows, transform, config.seed, split.metadata)

    return DataSplits(
        train=make(train, train_rows, train_transform),
        val=None if val_rows is None else make(train, val_rows, eval_transform),
        test=make(test, np.flatnonzero(test_mask), eval_transform),
        info=dataset_info(name),
    )
