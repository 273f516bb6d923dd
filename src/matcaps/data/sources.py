"""What each supported dataset is: its classes, image size and raw source files.

The raw files are looked for (compressed ``.gz`` or already decompressed) in, in order:
``ROOT/<dataset>/raw/`` (where downloads go), ``ROOT/<dataset>/`` and, for smallNORB
only (whose file names are unambiguous), ``ROOT/`` itself.  MNIST and Fashion-MNIST
share their file names, so they are never taken from ``ROOT/`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matcaps.errors import ConfigError

#: Every dataset name the library knows.
DATASET_NAMES: tuple[str, ...] = ("smallnorb", "mnist", "fashion-mnist", "cifar10")

#: Side of the network input for smallNORB: a 32×32 crop of the image resized to 48×48.
SMALLNORB_INPUT_SIZE = 32

#: Side of MNIST / Fashion-MNIST images, fed to the network unchanged.
DIGITS_INPUT_SIZE = 28

#: Side of CIFAR-10's colour images, fed to the network unchanged.
CIFAR10_INPUT_SIZE = 32


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset as the network sees it.

    Attributes:
        name: one of :data:`DATASET_NAMES`.
        num_classes: number of classes ``K``.
        class_names: ``K`` human-readable names, index = label.
        image_size: side ``S`` of the ``(1, S, S)`` network input.
        channels: number of input channels (1, or 3 for CIFAR-10's colour images).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    channels: int = 1


_INFOS: dict[str, DatasetInfo] = {
    "smallnorb": DatasetInfo("smallnorb", 5, ("animal", "human", "airplane", "truck", "car"), SMALLNORB_INPUT_SIZE),
    "mnist": DatasetInfo("mnist", 10, tuple(str(d) for d in range(10)), DIGITS_INPUT_SIZE),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        10,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        DIGITS_INPUT_SIZE,
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        CIFAR10_INPUT_SIZE,
        channels=3,
    ),
}


def stored_image_size(name: str) -> int:
    """Side of the square images the cache of ``name`` stores, the input of its transforms.

    smallNORB's transforms resize and crop its 96×96 images; the other datasets are used as stored.
    """
    return SMALLNORB_IMAGE_SIDE if check_dataset_name(name) == "smallnorb" else dataset_info(name).image_size


def check_dataset_name(name: str) -> str:
    """Return ``name`` if known, else raise :class:`ConfigError` listing the known ones."""
    if name not in _INFOS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; an unknown name raises :class:`ConfigError`."""
    return _INFOS[check_dataset_name(name)]


@dataclass(frozen=True)
class RawLayout:
    """What the matrix stored in one raw file must be, checked before anything is allocated.

    The official files hold ``(N, *item_shape)`` matrices; a file of the dataset may hold
    fewer items (a subset, the test fixtures) but never more, nor other item shapes.

    Attributes:
        what: what one item is, for messages (``"images"``, ``"labels"``, ...).
        dtype: element type (byte order aside).
        item_shape: shape of one item, after the leading count ``N``: ``(28, 28)`` for an
            MNIST image, ``()`` for a label, ``(2, 96, 96)`` for a smallNORB stereo pair.
        max_count: ``N`` of the official file.
        header_bytes: size of the file's header (IDX: ``4 + 4·ndim``; NORB: ``8 + 4·max(ndim, 3)``).
    """

    what: str
    dtype: str
    item_shape: tuple[int, ...]
    max_count: int
    header_bytes: int

    @property
    def ndim(self) -> int:
        """Number of dimensions of the whole matrix (the count included)."""
        return 1 + len(self.item_shape)

    @property
    def item_bytes(self) -> int:
        """Bytes per item."""
        return math.prod(self.item_shape) * np.dtype(self.dtype).itemsize

    @property
    def max_file_bytes(self) -> int:
        """Size of the official (decompressed) file: the largest acceptable one."""
        return self.header_bytes + self.max_count * self.item_bytes

    def describe(self) -> str:
        """E.g. ``images: uint8 of shape (N, 28, 28) with 1 <= N <= 60000``."""
        shape = ", ".join(["N", *(str(d) for d in self.item_shape)])
        return f"{self.what}: {self.dtype} of shape ({shape}) with 1 <= N <= {self.max_count}"


@dataclass(frozen=True)
class SourceFile:
    """One raw file of a dataset.

    Attributes:
        key: role of the file in the dataset, e.g. ``"train_images"``.
        filename: the published (gzipped) name, ending in ``.gz``.
        mirrors: base URLs (ending in ``/``) tried in order.
        layout: what the file must hold.
    """

    key: str
    filename: str
    mirrors: tuple[str, ...]
    layout: RawLayout

    @property
    def plain_name(self) -> str:
        """The name once decompressed (``filename`` without ``.gz``)."""
        return self.filename[: -len(".gz")] if self.filename.endswith(".gz") else self.filename

    @property
    def urls(self) -> tuple[str, ...]:
        """Full URLs, one per mirror."""
        return tuple(base + self.filename for base in self.mirrors)


#: NYU's smallNORB directory (the only official source).
SMALLNORB_MIRRORS = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)

#: MNIST mirrors: the PyTorch CI copy and Google's CVDF copy.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Zalando's Fashion-MNIST bucket.
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

#: Alex Krizhevsky's CIFAR page (the only official source).
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

#: Largest acceptable CIFAR-10 archive once decompressed: the official tar holds six pickles of
#: about 31 MB each (about 178 MiB in all); anything far larger is not it.
CIFAR10_MAX_TAR_BYTES = 256 * 1024 * 1024

#: smallNORB file name stems: training instances 4,6,7,8,9 and test instances 0,1,2,3,5.
SMALLNORB_TRAIN_STEM = "smallnorb-5x46789x9x18x6x2x96x96-training"
SMALLNORB_TEST_STEM = "smallnorb-5x01235x9x18x6x2x96x96-testing"

#: Object instances in each smallNORB split (NYU's page, and the "46789" / "01235" of the names).
SMALLNORB_SPLIT_INSTANCES: dict[str, frozenset[int]] = {
    "train": frozenset({4, 6, 7, 8, 9}),
    "test": frozenset({0, 1, 2, 3, 5}),
}

#: Stereo pairs per smallNORB split: 5 categories × 5 instances × 9 elevations × 18 azimuths × 6 lightings.
SMALLNORB_PAIRS = 24300

#: Side of a smallNORB image.
SMALLNORB_IMAGE_SIDE = 96

#: Fields of one smallNORB ``-info`` row: instance, elevation, azimuth, lighting.
SMALLNORB_INFO_FIELDS = 4

#: Images per split of MNIST and Fashion-MNIST.
DIGITS_TRAIN_COUNT = 60000
DIGITS_TEST_COUNT = 10000

#: Header sizes of the official files: NORB stores at least 3 dimensions (8 + 4·max(ndim, 3)
#: bytes), IDX exactly ndim (4 + 4·ndim bytes).
NORB_DAT_HEADER_BYTES = 8 + 4 * 4
NORB_CAT_INFO_HEADER_BYTES = 8 + 4 * 3
IDX_IMAGES_HEADER_BYTES = 4 + 4 * 3
IDX_LABELS_HEADER_BYTES = 4 + 4 * 1


def _smallnorb_sources() -> tuple[SourceFile, ...]:
    side = SMALLNORB_IMAGE_SIDE
    layouts = {
        "dat": RawLayout("stereo image pairs", "uint8", (2, side, side), SMALLNORB_PAIRS, NORB_DAT_HEADER_BYTES),
        "cat": RawLayout("category labels", "int32", (), SMALLNORB_PAIRS, NORB_CAT_INFO_HEADER_BYTES),
        "info": RawLayout("info rows", "int32", (SMALLNORB_INFO_FIELDS,), SMALLNORB_PAIRS, NORB_CAT_INFO_HEADER_BYTES),
    }
    files = []
    for split, stem in (("train", SMALLNORB_TRAIN_STEM), ("test", SMALLNORB_TEST_STEM)):
        for part in ("dat", "cat", "info"):
            files.append(SourceFile(f"{split}_{part}", f"{stem}-{part}.mat.gz", SMALLNORB_MIRRORS, layouts[part]))
    return tuple(files)


def _idx_sources(mirrors: tuple[str, ...]) -> tuple[SourceFile, ...]:
    side = DIGITS_INPUT_SIZE

    def images(count: int) -> RawLayout:
        return RawLayout("images", "uint8", (side, side), count, IDX_IMAGES_HEADER_BYTES)

    def labels(count: int) -> RawLayout:
        return RawLayout("labels", "uint8", (), count, IDX_LABELS_HEADER_BYTES)

    return (
        SourceFile("train_images", "train-images-idx3-ubyte.gz", mirrors, images(DIGITS_TRAIN_COUNT)),
        SourceFile("train_labels", "train-labels-idx1-ubyte.gz", mirrors, labels(DIGITS_TRAIN_COUNT)),
        SourceFile("test_images", "t10k-images-idx3-ubyte.gz", mirrors, images(DIGITS_TEST_COUNT)),
        SourceFile("test_labels", "t10k-labels-idx1-ubyte.gz", mirrors, labels(DIGITS_TEST_COUNT)),
    )


_SOURCES: dict[str, tuple[SourceFile, ...]] = {
    "smallnorb": _smallnorb_sources(),
    "mnist": _idx_sources(MNIST_MIRRORS),
    "fashion-mnist": _idx_sources(FASHION_MNIST_MIRRORS),
    # one gzipped tar of pickled batches (matcaps.data.cifar_format); its layout only caps its size
    "cifar10": (SourceFile("archive", "cifar-10-python.tar.gz", CIFAR10_MIRRORS,
                           RawLayout("bytes of the tar archive", "uint8", (), CIFAR10_MAX_TAR_BYTES, 0)),),
}


def source_files(name: str) -> tuple[SourceFile, ...]:
    """The raw files of dataset ``name``."""
    return _SOURCES[check_dataset_name(name)]


def dataset_dir(name: str, root: Path) -> Path:
    """``ROOT/<dataset>``: everything matcaps writes for this dataset lives below it."""
    return Path(root) / check_dataset_name(name)


def raw_dir(name: str, root: Path) -> Path:
    """``ROOT/<dataset>/raw``: where downloads are written."""
    return dataset_dir(name, root) / "raw"


def search_dirs(name: str, root: Path) -> tuple[Path, ...]:
    """Directories searched for raw files, most specific first (see the module docstring)."""
    dirs = (raw_dir(name, root), dataset_dir(name, root))
    return dirs + (Path(root),) if name == "smallnorb" else dirs


def find_source(name: str, root: Path, source: SourceFile) -> Path | None:
    """The existing raw file for ``source`` (``.gz`` or decompressed), or None."""
    for directory in search_dirs(name, root):
        for candidate in (source.filename, source.plain_name):
            path = directory / candidate
            if path.is_file():
                return path
    return None
