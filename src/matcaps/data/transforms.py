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
colour.  With a ``canvas`` (Sabour et al. 2017: 40), the digit is first placed on a black
``canvas × canvas`` image, at a uniformly random position for training and in the centre for
evaluation.  With ``hflip`` (not in the paper; the usual augmentation of Fashion-MNIST and
CIFAR-10, wrong for digits), each training image is mirrored left-right with probability 1/2.

Every transform maps a ``(H, W)`` uint8 array to a ``(1, S, S)`` float32 tensor (a colour
``(H, W, C)`` one to ``(C, S, S)``; smallNORB's stereo pairs come channels-first, ``(2, H, W)``)
and takes an optional ``torch.Generator`` that is the only source of randomness.

The evaluation transforms come in two halves, so that an attack can work on pixels:
``pixels(image)`` gives the ``(C, H', W')`` image in the valid pixel range [0, 1] (before any
standardisation), and ``normalise(batch, offset)`` the network input of a ``(N, C, H', W')``
batch of such images, differentiably; ``offset = (dy, dx)`` moves the window the network sees
(multi-crop evaluation).  ``transform(image) == normalise(pixels(image)[None])[0]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from matcaps.errors import ConfigError, InvalidInputError

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


#: Probability that a training image is mirrored left-right with ``hflip``.
HFLIP_PROBABILITY = 0.5

#: The valid range of pixels after :func:`to_unit_float`; attacks clip to it.
PIXEL_RANGE = (0.0, 1.0)


def to_unit_float(image: np.ndarray | torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """``(H, W)`` uint8 → ``(1, H, W)`` float32 in [0, 1]; a 3-D image keeps its channels, moved
    first from ``(H, W, C)`` (colour images) or already first, ``(C, H, W)``, when not ``channels_last``
    (smallNORB's stereo pairs)."""
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    elif channels_last:
        tensor = tensor.permute(2, 0, 1)
    return tensor.to(torch.float32).div(PIXEL_SCALE)


def resize_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` to ``(C, size, size)`` (half-pixel centres, no antialias)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]


def per_image_standardise(image: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / max(std, 1/sqrt(numel))`` over the whole image, as TF's
    ``per_image_standardization`` (population std; the floor protects uniform images).

    Differentiable everywhere (the floor is applied to the variance, so a uniform image gets a
    zero gradient through the statistics, not NaN).

    Args:
        image: ``(C, H, W)`` float, or a batch ``(..., C, H, W)`` (each image on its own).
    """
    dims = (-3, -2, -1)
    mean = image.mean(dim=dims, keepdim=True)
    variance = (image - mean).square().mean(dim=dims, keepdim=True)
    floor = 1.0 / math.prod(image.shape[-3:])  # (1/sqrt(numel))²
    return (image - mean) / variance.clamp(min=floor).sqrt()


def shift_window(image: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
    """The ``(..., H, W)`` window moved by ``offset = (dy, dx)`` pixels, filled with zeros where it leaves the image.

    ``shift_window(x, (1, 0))[..., i, :] == x[..., i + 1, :]``: the content moves up by one row.
    """
    dy, dx = offset
    if dy == 0 and dx == 0:
        return image
    margin = max(abs(dy), abs(dx))
    height, width = image.shape[-2:]
    padded = F.pad(image, (margin, margin, margin, margin))
    return padded[..., margin + dy : margin + dy + height, margin + dx : margin + dx + width]


def place_on_canvas(image: torch.Tensor, canvas: int, top: int, left: int) -> torch.Tensor:
    """``(C, h, w)`` pasted on a black ``(C, canvas, canvas)`` image with its top-left corner at ``(top, left)``."""
    channels, height, width = image.shape
    out = image.new_zeros(channels, canvas, canvas)
    out[:, top : top + height, left : left + width] = image
    return out


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

    def pixels(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` (or ``(C, H, W)``) uint8 → ``(C, resize, resize)`` float32 in [0, 1]: the image resized."""
        return resize_bilinear(to_unit_float(image, channels_last=False), self.resize)

    def normalise(self, pixels: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Evaluation input of ``(N, C, resize, resize)`` pixels: standardised, the ``crop`` window at the
        centre moved by ``offset`` → ``(N, C, crop, crop)``."""
        x = per_image_standardise(pixels)
        top = (x.shape[-2] - self.crop) // 2 + offset[0]
        left = (x.shape[-1] - self.crop) // 2 + offset[1]
        if not (0 <= top <= x.shape[-2] - self.crop and 0 <= left <= x.shape[-1] - self.crop):
            raise InvalidInputError(f"crop offset {offset} leaves the {x.shape[-2]}×{x.shape[-1]} image")
        return crop(x, top, left, self.crop)

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` (or ``(C, H, W)``) uint8 → ``(C, crop, crop)`` float32."""
        if not self.train:
            return self.normalise(self.pixels(image).unsqueeze(0))[0].contiguous()
        x = per_image_standardise(resize_bilinear(to_unit_float(image, channels_last=False), self.resize))
        if generator is None:
            raise ValueError("the training transform needs a torch.Generator")
        x = random_crop(x, self.crop, generator)
        x = random_brightness(x, self.max_brightness_delta, generator)
        x = random_contrast(x, *self.contrast_range, generator)
        return x.contiguous()


@dataclass(frozen=True)
class DigitsTransform:
    """MNIST / Fashion-MNIST (and CIFAR-10 and image folders, in colour too): ``/255``, optionally
    placed on a larger black canvas, then per-image standardisation over every pixel and channel;
    ``(1, 28, 28)`` for MNIST (``(1, canvas, canvas)``).

    Attributes:
        train: with a ``canvas``, place the digit at a uniformly random position (every offset
            from 0 to ``canvas − 28`` on each axis equally likely; Sabour et al.'s random
            translations) instead of the centre; without one, nothing changes.
        canvas: side of the black image the digit is placed on (None: the image as it is).
        hflip: when training, mirror the image left-right with probability :data:`HFLIP_PROBABILITY`
            (after placing it; one more draw from the generator, so without it the draws, and
            therefore every earlier run, stay as they were).
    """

    train: bool = False
    canvas: int | None = None
    hflip: bool = False

    @property
    def random(self) -> bool:
        """Random only when training with a canvas or flips."""
        return self.train and (self.canvas is not None or self.hflip)

    def pixels(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` uint8 → ``(1, S, S)`` float32 in [0, 1] (``S`` = ``canvas`` or ``H``)."""
        x = self._placed(to_unit_float(image), generator)
        if self.train and self.hflip:
            if generator is None:
                raise ValueError("the training transform with flips needs a torch.Generator")
            if float(torch.rand((), generator=generator)) < HFLIP_PROBABILITY:
                x = x.flip(-1)
        return x

    def _placed(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(C, H, W)`` on the canvas (unchanged without one)."""
        if self.canvas is None:
            return x
        height, width = x.shape[-2:]
        if self.canvas < max(height, width):
            raise ConfigError(f"a {height}×{width} image does not fit on a canvas of {self.canvas}")
        if self.train:
            if generator is None:
                raise ValueError("the training transform with a canvas needs a torch.Generator")
            top = int(torch.randint(0, self.canvas - height + 1, (), generator=generator))
            left = int(torch.randint(0, self.canvas - width + 1, (), generator=generator))
        else:
            top, left = (self.canvas - height) // 2, (self.canvas - width) // 2
        return place_on_canvas(x, self.canvas, top, left)

    def normalise(self, pixels: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Network input of ``(N, C, S, S)`` pixels: the window moved by ``offset`` (zeros, the
        background, fill what it uncovers), then standardised."""
        return per_image_standardise(shift_window(pixels, offset))

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(H, W)`` uint8 → ``(1, S, S)`` float32, or ``(H, W, C)`` → ``(C, S, S)``."""
        return self.normalise(self.pixels(image, generator).unsqueeze(0))[0].contiguous()
