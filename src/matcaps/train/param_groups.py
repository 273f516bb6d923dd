"""Learning-rate factors per kind of parameter (``--lr-scale GROUP=FACTOR``).

Adam moves every parameter by about its learning rate per step, whatever the parameter's scale.
With the IBM initialisation of the ``mnist`` network that is ~10 % of a first-layer kernel weight
per step at 3e-3, ~0.4 % of a capsule transform (std 1.0) and ~3·10⁻⁶ of ``β_a`` (mean −1000):
the layers learn at very different relative speeds (docs/learning-speed.md). A factor per group
lets a run change that; without factors the optimizer keeps the single group of the IBM recipe
(and of every earlier checkpoint).

Groups (every parameter belongs to exactly one):

* ``transforms``: the transformation matrices ``W_ij`` of the routed capsule layers (ConvCaps,
  class capsules) in the votes ``V_ij = M_i · W_ij`` (Hinton et al. 2018, §2);
* ``beta_a``, ``beta_v``: the routed layers' activation and cost biases (Procedure 1, M-step);
* ``features``: everything else (first convolution, extra convolutions, primary capsules, the
  CNN baseline's layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from matcaps.errors import ConfigError
from matcaps.layers import RoutedCapsules

#: Parameter groups a learning-rate factor can name, in the optimizer's order.
LR_GROUPS: tuple[str, ...] = ("features", "transforms", "beta_a", "beta_v")
#: Names of the routed layers' own parameters and the group each belongs to.
ROUTED_PARAMETER_GROUPS: dict[str, str] = {"weight": "transforms", "beta_a": "beta_a", "beta_v": "beta_v"}


def check_lr_scales(scales: Mapping[str, object]) -> None:
    """Raise :class:`ConfigError` (one line) unless ``scales`` maps known groups to positive numbers."""
    for group, factor in scales.items():
        if group not in LR_GROUPS:
            raise ConfigError(f"option lr_scales: unknown parameter group {group!r}; choose from {', '.join(LR_GROUPS)}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"option lr_scales: the factor of {group} must be a positive number, got {factor!r}")


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of ``model`` by group (see the module docstring), groups in
    :data:`LR_GROUPS` order, empty groups left out."""
    grouped: dict[str, list[nn.Parameter]] = {group: [] for group in LR_GROUPS}
    routed = {id(p): ROUTED_PARAMETER_GROUPS[name]
              for module in model.modules() if isinstance(module, RoutedCapsules)
              for name, p in module.named_parameters(recurse=False) if name in ROUTED_PARAMETER_GROUPS}  # fmt: skip
    for p in model.parameters():
        grouped[routed.get(id(p), "features")].append(p)
    return {group: params for group, params in grouped.items() if params}


def optimizer_groups(model: nn.Module, lr: float, scales: Mapping[str, float]) -> list[dict]:
    """Parameter groups for ``torch.optim.Adam``: one group of every parameter at ``lr`` without
    ``scales`` (the IBM recipe), else one group per kind at ``lr · scales.get(group, 1)``.

    Raises :class:`ConfigError` if a scaled group has no parameter in this network.
    """
    if not scales:
        return [{"params": list(model.parameters()), "lr": lr}]  # exactly the optimizer of earlier runs
    check_lr_scales(scales)
    grouped = parameter_groups(model)
    missing = sorted(set(scales) - set(grouped))
    if missing:
        raise ConfigError(f"option lr_scales: this network has no {', '.join(missing)} parameters "
                          f"(it has {', '.join(grouped)})")
    factors = {group: float(scales.get(group, 1.0)) for group in grouped}
    return [{"params": params, "lr": lr * factors[group], "group": group, "lr_scale": factors[group]}
            for group, params in grouped.items()]
