"""Normalising routing weights over every parent that reaches a child (Gritzman's first fix).

A child capsule at position ``x`` is read by every parent position whose window contains
``x``; its routing weights must sum to one over all those positions and all parent types,
not once per window.  Both functions take per-window tensors laid out like the routing
weights, ``(N, L, C, I)`` with ``I = S·B`` children per window, and use the scatter/gather
of :class:`~matcaps.routing.geometry.RoutingGeometry` to combine the windows a child
belongs to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from matcaps.routing.geometry import RoutingGeometry


def sum_over_parents(values: Tensor, geometry: RoutingGeometry) -> Tensor:
    """``Σ_{j ∈ parents(i)} values_ij`` for every child, returned for every window it is in.

    Args:
        values: ``(N, L, C, I)``.

    Returns:
        ``(N, L, 1, I)``: the sum over all parent types and all windows containing the
        child, broadcastable against ``values``.
    """
    n, num_windows, _, children = values.shape
    per_window = values.sum(dim=2).view(n, num_windows, geometry.window_size, -1)  # (N, L, S, B)
    per_child = geometry.gather_extended(geometry.scatter_sum(per_window))
    return per_child.reshape(n, num_windows, 1, children)


def softmax_over_parents(logits: Tensor, geometry: RoutingGeometry) -> Tensor:
    """Softmax of ``z_ij`` over every parent ``j`` (all positions and types) reaching child ``i``.

    Computed stably: the maximum over each child's parents is found with a scatter-max
    (no gradient flows through it; the softmax does not depend on it) and subtracted
    before exponentiating.

    Args:
        logits: ``(N, L, C, I)``, ``z_ij = ln(a_j + ε) + ln p_ij``.

    Returns:
        ``(N, L, C, I)`` routing weights ``r_ij``; for every child that some window reads,
        the weights over all its parents sum to one; slots in the zero padding get 0.
    """
    n, num_windows, _, children = logits.shape
    window_max = logits.detach().amax(dim=2).view(n, num_windows, geometry.window_size, -1)  # (N, L, S, B)
    child_max = geometry.gather_extended(geometry.scatter_max(window_max)).reshape(n, num_windows, 1, children)
    # A child whose logits are all -inf has nothing to normalise; keep its shift finite.
    child_max = torch.where(torch.isfinite(child_max), child_max, torch.zeros_like(child_max))
    unnormalised = torch.exp(logits - child_max)
    per_window = unnormalised.sum(dim=2).view(n, num_windows, geometry.window_size, -1)  # (N, L, S, B)
    totals = geometry.scatter_sum(per_window)  # (N, P + 1, B)
    # Slots in the zero padding are not children: an infinite total gives them weight 0.
    totals[:, geometry.num_child_positions] = float("inf")
    return unnormalised / geometry.gather_extended(totals).reshape(n, num_windows, 1, children)
