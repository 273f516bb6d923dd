"""Parameter initialisers of the IBM implementation, named and explained once.

The values reproduce Gritzman's TensorFlow code, which trains reliably:

* transformation matrices ``W_ij``: truncated normal, mean 0, std 1 ("a bigger standard
  deviation helps numerical stability");
* ``β_a``: truncated normal, mean −1000, std 500, so that ``λ·β_a`` starts near −0.5;
* ``β_v``: Glorot-uniform as TensorFlow computes it for a ``(…, C, 1)`` variable,
  ``U(±√(6 / (C + 1)))``;
* ordinary convolutions: Glorot-uniform weights and truncated-normal (std 0.01) biases.

TensorFlow's truncated normal redraws values beyond two standard deviations; so does
:func:`torch.nn.init.trunc_normal_` with bounds at ±2σ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Std of the truncated normal of the 4×4 transformation matrices.
TRANSFORM_INIT_STD = 1.0
#: Mean and std of the truncated normal of ``β_a``.
BETA_A_INIT_MEAN = -1000.0
BETA_A_INIT_STD = 500.0
#: Std of the truncated normal of convolution biases.
CONV_BIAS_INIT_STD = 0.01
#: TensorFlow's truncated normal keeps draws within this many standard deviations.
TRUNCATION_STDS = 2.0


def truncated_normal_(tensor: Tensor, mean: float, std: float) -> Tensor:
    """Fill ``tensor`` in place from N(mean, std²) truncated to ``mean ± 2·std``."""
    bound = TRUNCATION_STDS * std
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=mean - bound, b=mean + bound)


@torch.no_grad()
def init_transforms_(weight: Tensor) -> Tensor:
    """Transformation matrices ``W``: truncated N(0, 1)."""
    return truncated_normal_(weight, 0.0, TRANSFORM_INIT_STD)


@torch.no_grad()
def init_beta_a_(beta_a: Tensor) -> Tensor:
    """``β_a`` of shape ``(C,)``: truncated N(−1000, 500²)."""
    return truncated_normal_(beta_a, BETA_A_INIT_MEAN, BETA_A_INIT_STD)


@torch.no_grad()
def init_beta_v_(beta_v: Tensor) -> Tensor:
    """``β_v`` of shape ``(C,)``: U(±√(6/(C+1))), Glorot-uniform of a ``(C, 1)`` variable."""
    bound = math.sqrt(6.0 / (beta_v.numel() + 1))
    return nn.init.uniform_(beta_v, -bound, bound)


@torch.no_grad()
def init_conv_(conv: nn.Conv2d) -> nn.Conv2d:
    """Glorot-uniform weights and truncated N(0, 0.01²) biases (TF-slim's defaults in IBM's code)."""
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        truncated_normal_(conv.bias, 0.0, CONV_BIAS_INIT_STD)
    return conv
