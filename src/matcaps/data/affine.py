"""An affNIST-style test set: every MNIST test digit under its own random affine transformation.

affNIST (Tieleman, 2013) is how Sabour et al. (2017) measured affine generalisation: a network
trained on MNIST digits placed at random positions on a 40×40 black canvas (translations only) is
tested on digits that were also rotated, sheared and scaled.  affNIST itself is a download that
matcaps does not depend on; this module builds the same kind of test set from the MNIST test set,
deterministically, per digit:

1. draw, from a generator seeded by ``(seed, row)`` (:func:`~matcaps.data.datasets.sample_generator`
   with epoch 0, so an image never depends on the batch or the worker), in this order:
   the rotation ``θ ~ U[−20°, 20°]``, the horizontal shear ``s ~ U[−0.2, 0.2]``, the horizontal and
   vertical scales ``sx, sy ~ U[0.8, 1.2]`` (independently);
2. ``A = R(θ) · [[1, s], [0, 1]] · diag(sx, sy)`` acts on pixel coordinates about the centre of the
   28×28 image, which maps to the centre of the canvas;
3. the translation ``(tx, ty)`` is drawn uniformly (``tx`` first) among those that keep the
   transformed bounding box of the digit's non-zero pixels inside the canvas, as affNIST kept the
   whole digit in the image; a digit that cannot fit is centred (and cut by the canvas);
4. the canvas is filled by bilinear interpolation of the ``[0, 1]`` image (zeros outside it).

The canvas is 40×40 (affNIST's) for networks trained on 40×40 padded MNIST and 28×28 for networks
trained on plain MNIST; the label is the digit's (the transformation preserves it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from matcaps.data.transforms import per_image_standardise, shift_window, to_unit_float

#: Rotation range of affNIST, degrees either way.
AFFINE_MAX_ROTATION_DEG = 20.0
#: Shear range of affNIST (horizontal shear factor), either way.
AFFINE_MAX_SHEAR = 0.2
#: Range of affNIST's horizontal and vertical scale factors.
AFFINE_SCALE_RANGE = (0.8, 1.2)
#: Side of affNIST's images (and of Sabour et al.'s padded MNIST).
AFFNIST_CANVAS = 40
#: Default seed of the affine test set.
AFFINE_SEED = 0


@dataclass(frozen=True)
class AffineParameters:
    """One digit's transformation: rotation (degrees), horizontal shear, scales, translation (pixels)."""

    rotation_deg: float = 0.0
    shear: float = 0.0
    scale_x: float = 1.0
    scale_y: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    def matrix(self) -> torch.Tensor:
        """``(2, 2)`` float64 ``A = R(θ) · shear · diag(sx, sy)`` acting on ``(x, y)`` column vectors."""
        angle = math.radians(self.rotation_deg)
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                                dtype=torch.float64)
        shear = torch.tensor([[1.0, self.shear], [0.0, 1.0]], dtype=torch.float64)
        scale = torch.diag(torch.tensor([self.scale_x, self.scale_y], dtype=torch.float64))
        return rotation @ shear @ scale


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=generator))


def _digit_corners(image: torch.Tensor) -> torch.Tensor:
    """``(4, 2)`` float64 corners ``(x, y)`` of the bounding box of the non-zero pixels, about the image centre."""
    height, width = image.shape[-2:]
    mask = image.reshape(-1, height, width).amax(dim=0) > 0
    rows, columns = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:  # a blank image: the whole image
        top, bottom, left, right = 0, height, 0, width
    else:
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    corners = torch.tensor([[left, top], [right, top], [left, bottom], [right, bottom]], dtype=torch.float64)
    return corners - torch.tensor([width / 2, height / 2], dtype=torch.float64)


def translation_range(image: torch.Tensor, matrix: torch.Tensor, canvas: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((low_x, high_x), (low_y, high_y))``: translations keeping the transformed digit inside the canvas.

    When the digit is larger than the canvas along an axis, both bounds are the centring translation 0.
    """
    extent = _digit_corners(image) @ matrix.T  # corners relative to the canvas centre, before translation
    bounds = []
    for axis in range(2):
        low = -canvas / 2 - float(extent[:, axis].min())
        high = canvas / 2 - float(extent[:, axis].max())
        bounds.append((low, high) if low <= high else (0.0, 0.0))
    return bounds[0], bounds[1]


def draw_parameters(image: torch.Tensor, canvas: int, generator: torch.Generator) -> AffineParameters:
    """The seeded affNIST-style transformation of one ``(C, H, W)`` image (see the module docstring)."""
    rotation = _uniform(-AFFINE_MAX_ROTATION_DEG, AFFINE_MAX_ROTATION_DEG, generator)
    shear = _uniform(-AFFINE_MAX_SHEAR, AFFINE_MAX_SHEAR, generator)
    scale_x = _uniform(*AFFINE_SCALE_RANGE, generator)
    scale_y = _uniform(*AFFINE_SCALE_RANGE, generator)
    partial = AffineParameters(rotation, shear, scale_x, scale_y)
    (low_x, high_x), (low_y, high_y) = translation_range(image, partial.matrix(), canvas)
    shift_x = _uniform(low_x, high_x, generator)
    shift_y = _uniform(low_y, high_y, generator)
    return AffineParameters(rotation, shear, scale_x, scale_y, shift_x, shift_y)


def warp(image: torch.Tensor, parameters: AffineParameters, canvas: int) -> torch.Tensor:
    """``(C, H, W)`` float → ``(C, canvas, canvas)``: output pixel ``q`` takes the bilinear value of the input at
    ``A⁻¹ (q − c_out − t) + c_in`` (pixel centres at ``i + ½``; zeros outside the input)."""
    height, width = image.shape[-2:]
    inverse = torch.linalg.inv(parameters.matrix())
    centres = torch.arange(canvas, dtype=torch.float64) + 0.5 - canvas / 2
    y, x = torch.meshgrid(centres - parameters.shift_y, centres - parameters.shift_x, indexing="ij")
    source = torch.stack([x, y], dim=-1) @ inverse.T  # (canvas, canvas, 2) about the input's centre
    # grid_sample's normalised coordinates (align_corners=False): −1 and 1 are the outer edges of the image
    grid = torch.stack([source[..., 0] * 2 / width, source[..., 1] * 2 / height], dim=-1)
    out = F.grid_sample(image.unsqueeze(0).double(), grid.unsqueeze(0), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0].to(image.dtype)


@dataclass(frozen=True)
class AffineDigitsTransform:
    """The affNIST-style test transform: ``(H, W)`` uint8 → ``(1, canvas, canvas)`` float32, standardised.

    Its randomness comes from the dataset's per-row generator; the dataset is built with the
    affine seed (not the run's), so the test set depends on that seed alone.

    Attributes:
        canvas: side of the output image.
    """

    canvas: int = AFFNIST_CANVAS

    @property
    def random(self) -> bool:
        """It draws each digit's transformation from the generator."""
        return True

    def parameters(self, image: np.ndarray, generator: torch.Generator) -> AffineParameters:
        """The transformation this transform applies to ``image`` with this generator state."""
        return draw_parameters(to_unit_float(image), self.canvas, generator)

    def pixels(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """The transformed digit, ``(1, canvas, canvas)`` float32 in [0, 1]."""
        if generator is None:
            raise ValueError("the affine test transform needs a torch.Generator (seeded per image)")
        x = to_unit_float(image)
        return warp(x, draw_parameters(x, self.canvas, generator), self.canvas).clamp(0.0, 1.0)

    def normalise(self, pixels: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """As :meth:`DigitsTransform.normalise <matcaps.data.transforms.DigitsTransform.normalise>`."""
        return per_image_standardise(shift_window(pixels, offset))

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalise(self.pixels(image, generator).unsqueeze(0))[0].contiguous()
