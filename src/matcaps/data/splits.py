"""Train / validation / test splits of a prepared dataset.

``split="standard"``: the published train and test sets.

Validation is held out from the **training** set (never from the test set, unlike IBM,
which scored a slice of the test set during training):

* smallNORB: every image of the instances ``val_instances`` (default ``(4,)``: instance
  4 of each of the 5 categories, 9,720 images; the training file holds instances
  4, 6, 7, 8, 9), so validation measures generalisation to unseen objects like the test
  set does;
* MNIST / Fashion-MNIST: a random hold-out of ``val_size`` images drawn with ``holdout_seed``
  (default: ``seed``).

``validation=False`` keeps the whole training set and returns ``val=None``.

Novel-viewpoint splits of Hinton et al. (2018), smallNORB only.  Training images are
taken from the training file and test images from the test file (so the train/test
objects stay disjoint, as in the standard split), filtered by viewpoint:

* ``split="azimuth"``: train on azimuths 300, 320, 340, 0, 20, 40°; test on the other
  twelve (60..280°);
* ``split="elevation"``: train on the 3 lowest elevations (30, 35, 40°); test on the 6
  highest (45..70°).

Validation comes from the (viewpoint-filtered) training images, by instance as above,
so it shows *familiar* viewpoints of unseen objects.  ``test_viewpoints="familiar"`` scores
the test file's images at the training viewpoints instead of the novel ones (Hinton et al.'s
Table 2 matches the networks on that error before comparing novel-viewpoint errors).

``split="affine"`` (MNIST-like datasets): the standard training and validation sets, and as test
set every test digit under a seeded random affine transformation (:mod:`matcaps.data.affine`,
affNIST-style; ``affine_seed``).

Options of the input: ``canvas`` places MNIST-like digits on a larger black canvas (Sabour et
al.'s 40×40 padded MNIST: random positions for training, centred for validation and test);
``stereo`` feeds smallNORB's two stereo views of a pair as one 2-channel image (24,300 items per
split, the authors' own recipe) instead of two separate samples (48,600, IBM's).

NORB info coding: elevation code ``e`` in 0..8 is ``30 + 5e`` degrees; azimuth code ``a``
in 0, 2, .., 34 is ``10a`` degrees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from matcaps.errors import ConfigError, DataFormatError, DatasetNotFoundError
from matcaps.data.affine import AFFINE_SEED, AffineDigitsTransform
from matcaps.data.cache import NORB_INFO_COLUMNS, NORB_STEREO, cache_dir, read_manifest
from matcaps.data.datasets import CachedImageDataset
from matcaps.data.folders import FOLDER_DATASET, FolderOptions, load_folder
from matcaps.data.sources import DatasetInfo, check_dataset_name, dataset_info
from matcaps.data.transforms import DigitsTransform, NorbTransform

#: Accepted values of :attr:`DataConfig.split`.
SPLIT_KINDS: tuple[str, ...] = ("standard", "azimuth", "elevation", "affine")
#: Splits that select viewpoints (smallNORB only).
VIEWPOINT_SPLITS: tuple[str, ...] = ("azimuth", "elevation")
#: Accepted values of :attr:`DataConfig.test_viewpoints`.
TEST_VIEWPOINTS: tuple[str, ...] = ("novel", "familiar")
#: Datasets of grey 28×28 digits-like images: the ``affine`` split and ``canvas`` apply to them.
DIGIT_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")

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
        seed: seeds every training augmentation, and the hold-outs unless ``holdout_seed`` is set.
        holdout_seed: seeds the MNIST-like validation hold-out and image folders' splits (None:
            ``seed``); fixed, runs of several seeds share one validation set.
        folder: how image folders are read and split (``dataset="folder"`` only).
        test_viewpoints: with a viewpoint split, test on the ``"novel"`` viewpoints (default) or on
            the ``"familiar"`` (training) ones.
        affine_seed: seeds the transformations of the ``"affine"`` test set.
        canvas: MNIST-like: side of the black canvas each digit is placed on (None: 28×28 as is).
        hflip: mirror training images left-right with probability 1/2 (MNIST-like and CIFAR-10;
            not smallNORB, whose azimuth it would change, nor image folders).
        stereo: smallNORB: one 2-channel item per stereo pair instead of one item per view.
    """

    dataset: str = "smallnorb"
    root: Path = Path("data")
    split: str = "standard"
    val_instances: tuple[int, ...] = (4,)
    val_size: int = 5000
    validation: bool = True
    seed: int = 0
    holdout_seed: int | None = None
    folder: FolderOptions = FolderOptions()
    test_viewpoints: str = "novel"
    affine_seed: int = AFFINE_SEED
    canvas: int | None = None
    hflip: bool = False
    stereo: bool = False

    def __post_init__(self) -> None:
        if self.dataset != FOLDER_DATASET:
            check_dataset_name(self.dataset)
            if (self.folder.image_size, self.folder.channels) != (None, None):
                raise ConfigError("--image-size and --channels apply to image folders (--dataset folder) only")
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "val_instances", tuple(int(i) for i in self.val_instances))
        if self.split not in SPLIT_KINDS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of {', '.join(SPLIT_KINDS)}")
        if self.split in VIEWPOINT_SPLITS and self.dataset != "smallnorb":
            raise ConfigError(f"split {self.split!r} needs viewpoint information, which only smallnorb has")
        if self.split == "affine" and self.dataset not in DIGIT_DATASETS:
            raise ConfigError(f"split 'affine' transforms MNIST-like digits ({', '.join(DIGIT_DATASETS)}), "
                              f"not {self.dataset}")
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")
        if self.test_viewpoints not in TEST_VIEWPOINTS:
            raise ConfigError(f"test viewpoints must be novel or familiar, got {self.test_viewpoints!r}")
        if self.test_viewpoints != "novel" and self.split not in VIEWPOINT_SPLITS:
            raise ConfigError("familiar test viewpoints need the azimuth or elevation split")
        if self.canvas is not None:
            if self.dataset not in DIGIT_DATASETS:
                raise ConfigError(f"canvas applies to MNIST-like digits, not to {self.dataset}")
            size = dataset_info(self.dataset).image_size
            if isinstance(self.canvas, bool) or not isinstance(self.canvas, int) or self.canvas < size:
                raise ConfigError(f"canvas must be an integer of at least {size} (the image size), got {self.canvas!r}")
        if self.hflip and self.dataset in (FOLDER_DATASET, "smallnorb"):
            raise ConfigError(f"hflip applies to MNIST-like datasets and cifar10, not to {self.dataset}")
        if self.stereo and self.dataset != "smallnorb":
            raise ConfigError("stereo applies to smallnorb's stereo pairs only")
        seed = self.holdout_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"holdout_seed must be an integer, got {self.holdout_seed!r}")

    @property
    def split_seed(self) -> int:
        """The seed of the validation hold-out (and of an image folder's splits)."""
        return holdout_seed_of(self.seed, self.holdout_seed)


def holdout_seed_of(seed: int, holdout_seed: int | None) -> int:
    """The seed that draws the hold-outs: ``holdout_seed`` where set, else the run's ``seed``."""
    return seed if holdout_seed is None else holdout_seed


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
    test_familiar = np.isin(test.metadata[key], values)
    return np.isin(train.metadata[key], values), test_familiar if config.test_viewpoints == "familiar" else ~test_familiar


def _first_views(count: int) -> np.ndarray:
    """Mask of the rows that start a stereo pair (``2i``) among ``count`` cached rows."""
    return np.arange(count) % NORB_STEREO == 0


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
    permutation = np.random.default_rng(config.split_seed).permutation(len(candidates))
    val = np.sort(candidates[permutation[: config.val_size]])
    rest = np.sort(candidates[permutation[config.val_size :]])
    return rest, val


def dataset_transforms(name: str, canvas: int | None = None, hflip: bool = False) -> tuple:
    """The training and the evaluation transform of dataset ``name`` (validation, test, ``matcaps predict``);
    ``canvas``: MNIST-like digits placed on a black square of that side; ``hflip``: training images
    mirrored left-right at random (evaluation never flips)."""
    if name != FOLDER_DATASET and check_dataset_name(name) == "smallnorb":
        return NorbTransform(train=True), NorbTransform(train=False)
    return DigitsTransform(train=True, canvas=canvas, hflip=hflip), DigitsTransform(train=False, canvas=canvas)


def load_splits(config: DataConfig) -> DataSplits:
    """Build the train / validation / test datasets of ``config`` from the prepared cache.

    Raises:
        DatasetNotFoundError: no prepared cache (the message says which command makes it).
        DataFormatError: the cache is damaged (rerun the command with ``--force``).
        ConfigError: the split / validation options select nothing.
    """
    name = config.dataset
    if name == FOLDER_DATASET:
        return load_folder(config.root, config.folder, config.validation, config.split_seed)
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
    views = NORB_STEREO if config.stereo else 1
    if config.stereo:
        train_mask, test_mask = train_mask & _first_views(len(train_mask)), test_mask & _first_views(len(test_mask))
    candidates = np.flatnonzero(train_mask)
    train_rows, val_rows = _hold_out(config, train, candidates)

    info = dataset_info(name)
    train_transform, eval_transform = dataset_transforms(name, config.canvas, config.hflip)
    if config.canvas is not None:
        info = dataclasses.replace(info, image_size=config.canvas)
    if config.stereo:
        info = dataclasses.replace(info, channels=NORB_STEREO)
    test_transform, test_seed = eval_transform, config.seed
    if config.split == "affine":
        test_transform, test_seed = AffineDigitsTransform(canvas=info.image_size), config.affine_seed

    def make(split: _Split, rows: np.ndarray, transform, seed: int = config.seed) -> CachedImageDataset:
        return CachedImageDataset(split.images_path, split.labels, rows, transform, seed, split.metadata, views)

    return DataSplits(
        train=make(train, train_rows, train_transform),
        val=None if val_rows is None else make(train, val_rows, eval_transform),
        test=make(test, np.flatnonzero(test_mask), test_transform, test_seed),
        info=info,
    )
