"""Multi-crop evaluation: several windows of each test image, whose class scores are averaged.

Hinton et al.'s own smallNORB release scores each test image with 13 crops (1.8 % → 1.4 % error
reported in the paper): the centre crop and the windows moved diagonally by ±1, ±2 and ±3 pixels
along both diagonals.  For smallNORB the windows are 32×32 crops of the standardised 48×48 image;
for datasets fed whole (MNIST-like), the window moves over the image and the background (zeros,
before standardisation) fills what it uncovers.

With ``mirrored`` each window is also taken from the image mirrored left-right (the test-time
counterpart of ``--hflip`` training; not in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from matcaps.errors import ConfigError

#: Diagonal offsets of the official release, pixels.
CROP_DISTANCES = (1, 2, 3)
#: Numbers of crops ``matcaps test --crops`` accepts.
CROP_COUNTS = (1, 13)


def crop_offsets(crops: int) -> tuple[tuple[int, int], ...]:
    """``(dy, dx)`` of each window: ``(0, 0)`` first, then ``(±d, ±d)`` for ``d`` in 1, 2, 3 (13 crops)."""
    if crops not in CROP_COUNTS:
        raise ConfigError(f"crops must be one of {', '.join(map(str, CROP_COUNTS))}, got {crops}")
    offsets = [(0, 0)]
    if crops > 1:
        for distance in CROP_DISTANCES:
            for dy in (-distance, distance):
                for dx in (-distance, distance):
                    offsets.append((dy, dx))
    return tuple(offsets)


@dataclass(frozen=True)
class MultiCropTransform:
    """Every window of ``offsets`` of one image: ``(H, W)`` uint8 → ``(V, C, S, S)`` float32.

    Attributes:
        base: an evaluation transform with ``pixels`` and ``normalise`` (see :mod:`matcaps.data.transforms`).
        offsets: Window offsets ``(dy, dx)``.
        mirrored: Also every window of the image mirrored left-right, after those of the image:
            ``V = 2·len(offsets)`` instead of ``len(offsets)``.
    """

    base: object
    offsets: tuple[tuple[int, int], ...]
    mirrored: bool = False

    @property
    def views(self) -> int:
        """``V``, the views of each image."""
        return len(self.offsets) * (2 if self.mirrored else 1)

    @property
    def random(self) -> bool:
        return bool(getattr(self.base, "random", False))

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = self.base.pixels(image, generator).unsqueeze(0)  # type: ignore[attr-defined]
        sources = (pixels, pixels.flip(-1)) if self.mirrored else (pixels,)
        return torch.cat([
            self.base.normalise(source, offset) for source in sources for offset in self.offsets  # type: ignore[attr-defined]
        ]).contiguous()  # fmt: skip
