"""Tiny but valid raw dataset files, for tests that need data without the network.

``write_tiny_smallnorb(root)`` / ``write_tiny_mnist(root)`` write the raw source files of
a dataset, in exactly the published binary formats and with the real file names
(gzipped by default), into ``root/<dataset>/raw/`` (where ``matcaps data`` would have
downloaded them), so that::

    write_tiny_smallnorb(tmp_path)
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    splits = load_splits(DataConfig(dataset="smallnorb", root=tmp_path))

works (``verify=False``, ``--no-verify`` on the command line: these are not the official
files, so their MD5 sums are not the published ones).  The images carry a learnable signal: a bright square whose position depends on
the label, over low-amplitude noise, so a model can fit them in a few steps.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from matcaps.data.idx_format import write_idx
from matcaps.data.norb_format import write_norb
from matcaps.data.sources import SMALLNORB_TEST_STEM, SMALLNORB_TRAIN_STEM, raw_dir

#: Object instances of the real smallNORB training and test files.
SMALLNORB_TRAIN_INSTANCES = (4, 6, 7, 8, 9)
SMALLNORB_TEST_INSTANCES = (0, 1, 2, 3, 5)

#: Default viewpoints: azimuth codes 0, 4, 8, 30 (0, 40, 80, 300°: three of Hinton's
#: training azimuths and one novel one) and elevation codes 0, 3 (30° familiar, 45° novel).
DEFAULT_AZIMUTHS = (0, 4, 8, 30)
DEFAULT_ELEVATIONS = (0, 3)

SMALLNORB_CLASSES = 5
MNIST_CLASSES = 10


def _signal_images(labels: np.ndarray, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``(N, size, size)`` uint8: noise in [0, 40) plus a 200-valued square placed by label."""
    count = labels.shape[0]
    images = rng.integers(0, 40, size=(count, size, size), dtype=np.uint8)
    square = max(2, size // 6)
    per_row = int(np.ceil(np.sqrt(num_classes)))
    step = (size - square) // max(1, per_row - 1) if per_row > 1 else 0
    for i, label in enumerate(labels):
        top, left = (int(label) // per_row) * step, (int(label) % per_row) * step
        images[i, top : top + square, left : left + square] = 200
    return images


def write_tiny_smallnorb(
    root: Path,
    *,
    instances_per_split: int = 2,
    azimuths: tuple[int, ...] = DEFAULT_AZIMUTHS,
    elevations: tuple[int, ...] = DEFAULT_ELEVATIONS,
    lightings: tuple[int, ...] = (0,),
    image_size: int = 96,
    compress: bool = True,
    directory: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write the six smallNORB ``.mat`` files for a tiny dataset.

    Each split has ``5 categories × instances_per_split × len(elevations) ×
    len(azimuths) × len(lightings)`` stereo pairs (80 by default: 160 images), the
    training split using the first instances of (4, 6, 7, 8, 9), the test split those
    of (0, 1, 2, 3, 5).  Codes follow NORB: azimuth 0, 2, .., 34 (×10°), elevation 0..8
    (30° + 5° per step), lighting 0..5.

    Args:
        root: data root; files go to ``root/smallnorb/raw`` unless ``directory`` is given.
        instances_per_split: instances per category in each split (1..5).
        azimuths, elevations, lightings: viewpoint codes to include.
        image_size: side of each image (96 as in the real files).
        compress: write ``*.mat.gz`` (True) or the decompressed ``*.mat`` names.
        directory: write here instead (e.g. ``root`` itself).
        seed: seeds the pixel noise.

    Returns:
        The directory holding the six files.
    """
    out = Path(directory) if directory is not None else raw_dir("smallnorb", Path(root))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".mat.gz" if compress else ".mat"
    for stem, all_instances in ((SMALLNORB_TRAIN_STEM, SMALLNORB_TRAIN_INSTANCES),
                                (SMALLNORB_TEST_STEM, SMALLNORB_TEST_INSTANCES)):
        rows = list(itertools.product(range(SMALLNORB_CLASSES), all_instances[:instances_per_split],
                                      elevations, azimuths, lightings))
        labels = np.array([row[0] for row in rows], dtype=np.int32)
        info = np.array([row[1:] for row in rows], dtype=np.int32)  # instance, elevation, azimuth, lighting
        left = _signal_images(labels, image_size, SMALLNORB_CLASSES, rng)
        right = _signal_images(labels, image_size, SMALLNORB_CLASSES, rng)
        write_norb(out / f"{stem}-dat{suffix}", np.stack([left, right], axis=1))
        write_norb(out / f"{stem}-cat{suffix}", labels)
        write_norb(out / f"{stem}-info{suffix}", info)
    return out


def write_tiny_mnist(
    root: Path,
    name: str = "mnist",
    n_train: int = 60,
    n_test: int = 20,
    *,
    compress: bool = True,
    directory: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write the four IDX files of a tiny MNIST or Fashion-MNIST (28×28, labels cycling 0..9).

    Args:
        root: data root; files go to ``root/<name>/raw`` unless ``directory`` is given.
        name: ``"mnist"`` or ``"fashion-mnist"`` (same file names and format).
        n_train, n_test: number of images per split.
        compress: write ``*.gz`` (True) or the decompressed names.
        directory: write here instead.
        seed: seeds the pixel noise.

    Returns:
        The directory holding the four files.
    """
    out = Path(directory) if directory is not None else raw_dir(name, Path(root))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(count) % MNIST_CLASSES).astype(np.uint8)
        write_idx(out / f"{prefix}-images-idx3-ubyte{suffix}", _signal_images(labels, 28, MNIST_CLASSES, rng))
        write_idx(out / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return out
