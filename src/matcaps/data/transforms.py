"""Image transforms of IBM's pipeline in pure torch (no torchvision).

smallNORB (IBM ``data_pipeline_norb.py``):

* train: ``/255`` → bilinear resize 96→48 → per-image standardisation → random 32×32
  crop → random brightness (add ``δ ~ U[-2, 2)``, in standardised units) → random
  contrast (scale the deviation from the image mean by ``f ~ U[0.5, 1.5)``);
* eval (validation and test): the same up to the standardisation, then the centre 32×32
  crop (offset 8), no randomness.

The resize is ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
antialias=False)``: for the exact factor-2 reduction 96→48 its half-pixel sampling
lands between input pixels, so every output pixel is the mean of a 2×2 block (an
alias-free box filter).  TF1's ``resize_images`` (IBM) sampled without the half-pixel
offset, i.e. it kept every second pixel; we prefer the box average.

MNIST / Fashion-MNIST: ``/255`` → per-image standardisation, at 28×28, for training and
evaluation alike (no augmentation, so nothing random); CIFAR-10 and image folders the same, in
colour.

Every transform maps a ``(H, W)`` uint8 array to a ``(1, S, S)`` float32 tensor, or a colour
``(H, W, C)`` one to ``(C, S, S)``, and takes an optional ``torch.Generator`` that is the only
source of randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Pixel values are divided by this to land in [0, 1].
PIXEL_SCALE = 255.0

#: smallNORB images are resized to this side before cropping (IBM).
NORB_RESIZE = 48

#: Side of the crop the network sees (IBM).
NORB_CROP = 32

#: IBM's ``random_brightness(max_delta=2.0)``, applied after standardisation.
NORB_MAX_BRIGHTNESS_DELTA = 2.0

#: IBM's ``random_contrast(0.5, 1.5)``.
NORB_CONTRAST_RANGE = (0.5, 1.5)


def to_unit_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(H, W)`` uint8 → ``(1, H, W)``, or colour ``(H, W, C)`` → ``(C, H, W)``, float32 in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.to(torch.float32).div(PIXEL_SCALE)


def resize_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` to ``(C, size, size)`` (half-pixel centres, no antialias)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]


def per_image_standardise(image: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / max(std, 1/sqrt(numel))`` over the whole image, as TF's
    ``per_image_standardization`` (population std; the floor protects uniform images).

    Args:
        image: ``(C, H, W)`` float.
    """
    mean = image.mean()
    std = image.std(unbiased=False)
    floor = 1.0 / math.sqrt(image.numel())
    return (image - mean) / torch.clamp(std, min=floor)


def crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """The ``(C, size, size)`` window of ``(C, H, W)`` whose top-left corner is ``(top, left)``."""
    return image[..., top : top + size, left : left + size]


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``(C, size, size)`` window (offset ``(H - size) // 2``)."""
    top = (image.shape[-2] - size) // 2
    left = (image.shape[-1] - size) // 2
    return crop(image, top, left, size)


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(C, size, size)`` window at a uniformly random offset (every offset possible)."""
    top = int(torch.randint(0, image.shape[-2] - size + 1, (), generator=generator))
    left = int(torch.randint(0, image.shape[-1] - size + 1, (), generator=generator))
    return crop(image, top, left, size)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_brightness(image: torch.Tensor, max_delta: float, generator: torch.Generator) -> torch.Tensor:
    """Add one ``δ ~ U[-max_delta, max_delta)`` to every pixel."""
    return image + _uniform(-max_delta, max_delta, generator)


def random_contrast(image: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``(x - mean) · f + mean`` with ``f ~ U[low, high)`` and the mean over each channel."""
    factor = _uniform(low, high, generator)
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return (image - mean) * factor + mean


@dataclass(frozen=True)
class NorbTransform:
    """The smallNORB pipeline; ``train=True`` adds random crop, brightness and contrast.

    Attributes:
        train: random augmentation (needs a generator) or deterministic centre crop.
        resize: side after resizing (48).
        crop: side of the output (32).
        max_brightness_delta: brightness jitter, standardised units (2.0; 0 disables).
        contrast_range: contrast factor range ((0.5, 1.5); (1, 1) disables).
    """

    train: bool
    resize: int = NORB_RESIZE
    crop: int = NORB_CROP
    max_brightness_delta: float = NORB_MAX_BRIGHTNESS_DELTA
    contrast_range: tuple[float, float] = NORB_CONTRAST_RANGE

    @property
    def random(self) -> bool:
        """Whether the transform draws random numbers."""
        return self.train

    @property
    def output_size(self) -> int:
        """Side ``S`` of the ``(1, S, S)`` output."""
        return self.crop

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` uint8 → ``(1, crop, crop)`` float32."""
        x = per_image_standardise(resize_bilinear(to_unit_float(image), self.resize))
        if not self.train:
            return centre_crop(x, self.crop).contiguous()
        if generator is None:
            raise ValueError("the training transform needs a torch.Generator")
        x = random_crop(x, self.crop, generator)
        x = random_brightness(x, self.max_brightness_delta, generator)
        x = random_contrast(x, *self.contrast_range, generator)
        return x.contiguous()


@dataclass(frozen=True)
class DigitsTransform:
    """MNIST / Fashion-MNIST (and CIFAR-10 and image folders, in colour too): ``/255`` then per-image
    standardisation over every pixel and channel; ``(1, 28, 28)`` for MNIST.

    Attributes:
        train: recorded for symmetry; the transform is the same (nothing random).
    """

    train: bool = False

    @property
    def random(self) -> bool:
        """Never random."""
        return False

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` uint8 → ``(1, H, W)`` float32, or ``(H, W, C)`` → ``(C, H, W)``."""
        return per_image_standardise(to_unit_float(image)).contiguous()
