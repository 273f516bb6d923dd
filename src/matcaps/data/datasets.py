"""``torch.utils.data.Dataset`` over a split of the prepared cache.

Each item is ``(image, label)``: a ``(1, S, S)`` float32 tensor and an int64 scalar
tensor.  The images are read lazily from the ``.npy`` memmap, opened on first access in
each process (the memmap is never pickled), so a dataset can be handed to
``DataLoader`` workers under any start method.

Randomness: a random transform draws from a ``torch.Generator`` seeded from
``(seed, epoch, row)`` (``row`` = index of the image in the cached split), so an item's
augmentation does not depend on the worker, the batch or the process that loads it, and
changes from epoch to epoch.  :meth:`CachedImageDataset.set_epoch` stores the epoch in a
one-element shared-memory tensor, which also reaches persistent DataLoader workers;
call it before iterating the epoch's DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

#: Mask keeping seeds in the non-negative int64 range accepted by ``manual_seed``.
_SEED_MASK = (1 << 63) - 1
_U64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of the SplitMix64 mixer: a bijective, well-scrambling 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _U64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _U64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the sample ``index`` of epoch ``epoch`` under the run seed ``seed``."""
    state = 0
    for part in (seed, epoch, index):
        state = _splitmix64(state ^ (part & _U64))
    return state & _SEED_MASK


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`sample_seed`."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator


class CachedImageDataset(Dataset):
    """Some rows of one split of a prepared cache, with a transform.

    Args:
        images_path: the split's ``(N, H, W)`` uint8 ``.npy`` file.
        all_labels: ``(N,)`` int64 labels of the whole split.
        rows: ``(M,)`` int64 rows of the split that this dataset exposes, in order.
        transform: ``(H, W) uint8 array, generator | None -> (1, S, S) float32``; it
            has a ``random`` attribute saying whether it needs a generator.
        seed: run seed mixed into every sample's generator.
        metadata: optional ``(N,)`` arrays per field (e.g. smallNORB's ``instance``,
            ``elevation_deg``, ``azimuth_deg``, ``lighting``) of the whole split.
        views: consecutive cached rows that make one item, stacked as channels: 1, or 2 for
            smallNORB's stereo pairs (rows ``2i`` and ``2i + 1``; ``rows`` then lists the ``2i``).

    Attributes:
        labels: ``(M,)`` int64 numpy array, the label of every item.
        rows: ``(M,)`` int64 rows in the cached split.
        metadata: ``{field: (M,) array}`` restricted to ``rows``.
    """

    def __init__(
        self,
        images_path: Path,
        all_labels: np.ndarray,
        rows: np.ndarray,
        transform: Callable[..., torch.Tensor],
        seed: int = 0,
        metadata: dict[str, np.ndarray] | None = None,
        views: int = 1,
    ) -> None:
        self.images_path = Path(images_path)
        self.views = int(views)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(all_labels, dtype=np.int64)[self.rows]
        self.transform = transform
        self.seed = int(seed)
        self.metadata = {key: np.asarray(value)[self.rows] for key, value in (metadata or {}).items()}
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._images: np.ndarray | None = None

    # -- pickling: never carry the memmap to another process
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def epoch(self) -> int:
        """The epoch that seeds the augmentation."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of epoch ``epoch`` (no effect on deterministic datasets)."""
        self._epoch[0] = int(epoch)

    def images(self) -> np.ndarray:
        """The split's ``(N, H, W)`` uint8 memmap (opened on first use in this process)."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        row = int(self.rows[index])
        # copy out of the memmap: (H, W), or (views, H, W) stacked as channels
        image = np.array(self.images()[row]) if self.views == 1 else np.array(self.images()[row : row + self.views])
        generator = sample_generator(self.seed, self.epoch, row) if getattr(self.transform, "random", False) else None
        return self.transform(image, generator), torch.tensor(self.labels[index], dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.images_path.parent.name}/{self.images_path.name}, {len(self)} items)"
