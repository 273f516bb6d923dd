"""Your own images as a dataset: one sub-folder per class (``matcaps train --dataset folder --data-root PATH``).

Two layouts are recognised:

* ``PATH/train/<class>/…`` and ``PATH/test/<class>/…`` (and optionally ``PATH/val/<class>/…``
  or ``PATH/validation/<class>/…``): the split is the folders'; the classes are the
  sub-folders of ``train``, and ``test``/``val`` may only use those;
* ``PATH/<class>/…``: each class is split, in a random order drawn from the seed, into
  ``test_fraction`` of its images for the test set, then ``val_fraction`` of the rest for
  validation (when validation is on, and unless a ``val`` folder exists), the rest for training.

Classes are the sorted sub-folder names (label = index).  Images are the files below a class
folder (at any depth) whose name ends in ``.png``, ``.jpg`` or ``.jpeg`` (any case; hidden
files aside), read with Pillow (:func:`~matcaps.data.images.read_image`) as grey or RGB
(``channels``; by default RGB as soon as one image is in colour), fitted to
``image_size × image_size`` (shorter side resized, centre crop) and held in memory as uint8.
Every image is decoded when the splits are loaded, so a truncated or corrupted file is found
then: ``bad_images="stop"`` raises one line naming it, ``"skip"`` leaves it out and lists it
in the dataset's ``skipped`` (``matcaps train`` prints each, and the count).

The transform is the per-image standardisation of MNIST (:class:`~matcaps.data.transforms.DigitsTransform`),
for training and evaluation alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from matcaps.data.datasets import CachedImageDataset
from matcaps.data.images import CHANNEL_MODES, IMAGE_SUFFIXES, load_image
from matcaps.data.sources import DatasetInfo
from matcaps.data.transforms import DigitsTransform
from matcaps.errors import ConfigError, DataFormatError, DatasetNotFoundError

if TYPE_CHECKING:  # matcaps.data.splits imports this module
    from matcaps.data.splits import DataSplits

#: The dataset name that selects image folders (``--dataset folder``).
FOLDER_DATASET = "folder"
#: Side of the network input when ``--image-size`` is not given.
DEFAULT_FOLDER_IMAGE_SIZE = 32
#: Smallest ``--image-size``: the capsule network's maps (stride 2, then K3/s2, K3/s1) need 16.
MIN_FOLDER_IMAGE_SIZE = 16
#: Folder names of each split in the split-by-folder layout.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
#: What to do with an image that cannot be read: raise naming it, or leave it out and count it.
BAD_IMAGE_POLICIES: tuple[str, ...] = ("stop", "skip")
#: Pillow modes of grey images; any other mode counts as colour.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass(frozen=True)
class FolderOptions:
    """How image folders are read and split (``matcaps train`` flags in brackets).

    Attributes:
        image_size: Side of the square network input (``--image-size``; None: 32).
        channels: 1 (grey) or 3 (RGB) (``--channels``; None: RGB if any image is in colour).
        val_fraction: Share of each class's training images held out for validation
            when there is no ``val`` folder (``--val-fraction``).
        test_fraction: Share of each class's images held out as the test set in the
            one-folder-per-class layout (``--test-fraction``).
        bad_images: ``stop`` or ``skip`` (``--bad-images``).
    """

    image_size: int | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    bad_images: str = "stop"

    def __post_init__(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < MIN_FOLDER_IMAGE_SIZE):  # fmt: skip
            raise ConfigError(f"--image-size must be an integer of at least {MIN_FOLDER_IMAGE_SIZE}, got {self.image_size!r}")
        if self.channels is not None and self.channels not in CHANNEL_MODES:
            raise ConfigError(f"--channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number in [0, 1), got {value!r}")
        if self.bad_images not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"--bad-images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.bad_images!r}")

    @property
    def size(self) -> int:
        """The side of the network input."""
        return self.image_size if self.image_size is not None else DEFAULT_FOLDER_IMAGE_SIZE


@dataclass(frozen=True)
class FolderScan:
    """The image files of a folder dataset, split, before decoding.

    Attributes:
        root: The folder.
        class_names: Sorted class folder names (label = index).
        files: ``{"train" | "val" | "test": [(path, label), …]}`` (``val`` absent without validation).
    """

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (any depth, hidden ones aside), sorted."""
    return sorted(
        path for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )  # fmt: skip


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _labelled_files(folder: Path, classes: dict[str, int], what: str) -> list[tuple[Path, int]]:
    files = []
    for class_folder in _class_folders(folder):
        if class_folder.name not in classes:
            raise DataFormatError(f"{class_folder}: class {class_folder.name!r} of the {what} set is not a class of the "
                                  f"training set ({', '.join(classes)})")
        files += [(path, classes[class_folder.name]) for path in _image_files(class_folder)]
    return files


def _hold_out(files: list[tuple[Path, int]], fraction: float, generator: np.random.Generator,
              ) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:  # fmt: skip
    """Per class, a random :func:`fraction_count` of the files (kept, held out)."""
    kept, held = [], []
    for label in sorted({label for _, label in files}):
        members = [item for item in files if item[1] == label]
        order = generator.permutation(len(members))
        count = fraction_count(fraction, len(members))
        held += [members[i] for i in sorted(order[:count])]
        kept += [members[i] for i in sorted(order[count:])]
    return kept, held


def scan_folder(root: str | Path, options: FolderOptions, validation: bool, seed: int) -> FolderScan:
    """Find the classes and the image files of each split (see the module docstring).

    Raises:
        DatasetNotFoundError: ``root`` is not a directory, or holds no class folder.
        DataFormatError: a test or validation class that training lacks, a class without
            training images, or an empty test set (each names the folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist (--data-root names the folder that holds "
                                   "one sub-folder per class, or train/ and test/ with one sub-folder per class)")
    generator = np.random.default_rng(seed)
    train_folder, test_folder = _split_folder(root, "train"), _split_folder(root, "test")
    if (train_folder is None) != (test_folder is None):
        present, absent = ("train", "test") if train_folder is not None else ("test", "train")
        raise DatasetNotFoundError(f"image folder {root} has {present}/ but no {absent}/; give both, or put the class "
                                   "folders directly in it")
    by_folder = train_folder is not None
    class_root = train_folder if by_folder else root
    names = tuple(folder.name for folder in _class_folders(class_root))
    if not names:
        raise DatasetNotFoundError(f"image folder {class_root} has no class sub-folder")
    classes = {name: label for label, name in enumerate(names)}
    files: dict[str, list[tuple[Path, int]]] = {}
    if by_folder:
        files["train"] = _labelled_files(train_folder, classes, "training")
        files["test"] = _labelled_files(test_folder, classes, "test")
    else:
        files["train"], files["test"] = _hold_out(_labelled_files(root, classes, "training"), options.test_fraction,
                                                  generator)  # fmt: skip
    if validation:
        val_folder = _split_folder(root, "val") if by_folder else None
        if val_folder is not None:
            files["val"] = _labelled_files(val_folder, classes, "validation")
        else:
            files["train"], files["val"] = _hold_out(files["train"], options.val_fraction, generator)
    counts = np.bincount([label for _, label in files["train"]], minlength=len(names))
    if not counts.all():
        empty = names[int(np.flatnonzero(counts == 0)[0])]
        raise DataFormatError(f"image folder {class_root / empty}: no training image left for class {empty!r} "
                              "(add images, or lower --test-fraction / --val-fraction)")
    if not files["test"]:
        raise DataFormatError(f"image folder {root}: the test set is empty; raise --test-fraction or add a test/ folder")
    if validation and not files["val"]:
        raise DataFormatError(f"image folder {root}: the validation set is empty; raise --val-fraction, add a val/ "
                              "folder or use --no-validation")
    return FolderScan(root, names, files)


def detect_channels(paths: list[Path]) -> int:
    """3 if any of ``paths`` is a colour image, else 1 (unreadable files are left to the decoding)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                if image.mode not in GREY_MODES:
                    return 3
        except Exception:  # noqa: BLE001 - reported, with its reason, when the file is decoded
            continue
    return 1


@dataclass
class DecodedImages:
    """The decoded images of one split: ``(N, S, S)`` or ``(N, S, S, 3)`` uint8, labels, skipped files."""

    images: np.ndarray
    labels: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def decode_images(files: list[tuple[Path, int]], channels: int, size: int, bad_images: str,
                  on_image: Callable[[], None] | None = None) -> DecodedImages:  # fmt: skip
    """Read every file of ``files`` (see the module docstring for ``bad_images``)."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    images = np.empty((len(files), *shape), dtype=np.uint8)
    labels, skipped, count = [], [], 0
    for path, label in files:
        try:
            images[count] = load_image(path, channels, size)
        except DataFormatError as error:
            if bad_images == "stop":
                raise DataFormatError(f"{error} (--bad-images skip leaves unreadable images out)") from None
            skipped.append((path, str(error).removeprefix(f"{path}: ")))
        else:
            labels.append(label)
            count += 1
        if on_image is not None:
            on_image()
    return DecodedImages(images[:count], np.asarray(labels, dtype=np.int64), skipped)


class FolderImageDataset(CachedImageDataset):
    """Decoded images held in memory, with the interface of :class:`CachedImageDataset`.

    Attributes:
        skipped: ``(file, reason)`` of the images left out because they could not be read.
    """

    def __init__(self, decoded: DecodedImages, transform: Callable[..., torch.Tensor], seed: int) -> None:
        super().__init__(Path("<memory>"), decoded.labels, np.arange(len(decoded.labels)), transform, seed)
        self.array = decoded.images
        self.skipped = list(decoded.skipped)

    def images(self) -> np.ndarray:
        return self.array

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.skipped)} skipped)"


def folder_info(scan: FolderScan, options: FolderOptions, channels: int) -> DatasetInfo:
    """The :class:`DatasetInfo` of a scanned folder."""
    return DatasetInfo(FOLDER_DATASET, len(scan.class_names), scan.class_names, options.size, channels)


def load_folder(
    root: str | Path, options: FolderOptions, validation: bool, seed: int, progress: bool = False
) -> DataSplits:
    """The train / validation / test datasets of an image folder."""
    from tqdm import tqdm

    from matcaps.data.splits import DataSplits

    scan = scan_folder(root, options, validation, seed)
    every_file = [path for split in scan.files.values() for path, _ in split]
    channels = options.channels if options.channels is not None else detect_channels(every_file)
    transform = DigitsTransform()
    datasets = {}
    with tqdm(total=len(every_file), desc=f"reading {scan.root}", unit="image", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for split, files in scan.files.items():
            decoded = decode_images(files, channels, options.size, options.bad_images, lambda: bar.update(1))
            datasets[split] = FolderImageDataset(decoded, transform, seed)
    if not len(datasets["train"]) or not len(datasets["test"]):
        empty = "training" if not len(datasets["train"]) else "test"
        raise DataFormatError(f"image folder {scan.root}: no readable {empty} image")
    return DataSplits(datasets["train"], datasets.get("val"), datasets["test"], folder_info(scan, options, channels))


def skipped_images(splits: DataSplits) -> list[tuple[Path, str]]:
    """Every ``(file, reason)`` left out of the datasets of ``splits`` (empty for other datasets)."""
    return [item for dataset in (splits.train, splits.val, splits.test) for item in getattr(dataset, "skipped", [])]


def folder_class_names(root: str | Path, num_classes: int) -> tuple[str, ...]:
    """The class names of the image folder ``root`` (that a network was trained on), or ``0``, ``1``, …
    when the folder is gone or no longer has ``num_classes`` classes."""
    root = Path(root)
    class_root = _split_folder(root, "train") if root.is_dir() else None
    class_root = class_root or root
    names = tuple(folder.name for folder in _class_folders(class_root)) if class_root.is_dir() else ()
    return names if len(names) == num_classes else tuple(str(k) for k in range(num_classes))


def fraction_count(fraction: float, total: int) -> int:
    """``⌊fraction · total + ½⌋``: how many of ``total`` images a fraction holds out (halves round up)."""
    return int(math.floor(fraction * total + 0.5))
