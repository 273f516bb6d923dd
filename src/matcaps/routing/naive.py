"""Straightforward vectorised EM routing, differentiated by autograd.

This is a plain transcription of Procedure 1 of Hinton et al. (2018) with the three
corrections of Gritzman (2019): every intermediate is a full ``(N, L, I, C, H)`` tensor
and autograd stores them all for the backward pass.  It is kept as the baseline against
which ``matcaps bench --routing-impl naive`` measures the fused implementation, and as a second,
readable statement of the algorithm.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from matcaps.routing.config import LOG_2PI, EMRoutingConfig
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.normalise import softmax_over_parents


class RoutingTrace(NamedTuple):
    """The state of one EM iteration, as recorded by :func:`trace_em_routing`.

    Attributes:
        routing: ``(N, L, C, I)`` routing weights ``r_ij`` the iteration's M-step used.
        mean: ``(N, L, C, H)`` parent pose means ``μ_j``.
        variance: ``(N, L, C, H)`` parent variances ``σ²_j`` (floor included).
        activations: ``(N, L, C)`` parent activations ``a_j``.
    """

    routing: Tensor
    mean: Tensor
    variance: Tensor
    activations: Tensor


def em_routing_naive(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
) -> tuple[Tensor, Tensor]:
    """EM routing with every intermediate materialised (same contract as ``em_routing``).

    Args:
        votes: ``(N, L, C, I, H)``, ``V_ij`` for the ``C`` parent types of each of the
            ``L`` windows and the ``I = S·B`` children of the window (``H = 16`` pose
            entries).
        child_activations: ``(N, L, I)``, ``a_i`` of each child as read by each window.
        beta_v, beta_a: ``(C,)``, one scalar per parent type.
        geometry: Window-to-child map of the layer.
        config: Routing hyper-parameters.

    Returns:
        ``(pose_means, activations)`` of shapes ``(N, L, C, H)`` and ``(N, L, C)``.
    """
    for state in _iterations(votes, child_activations, beta_v, beta_a, geometry, config):
        pass
    return state.mean, state.activations


def trace_em_routing(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
) -> list[RoutingTrace]:
    """Run EM routing and return the state of every iteration (for analysis and plots).

    Same arguments as :func:`em_routing_naive`; differentiable.  The last entry holds the
    outputs of ``em_routing``; entry ``t`` holds the routing weights its M-step used
    (the prior ``1 / (|P(x)| · C)`` for ``t = 0``).
    """
    return list(_iterations(votes, child_activations, beta_v, beta_a, geometry, config))


def _iterations(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
) -> Iterator[RoutingTrace]:
    n, num_windows, parent_types, children, _ = votes.shape
    child_types = children // geometry.window_size
    cost_factor = config.cost_factor(children, parent_types)
    prior = geometry.initial_assignment(child_types, parent_types, votes.dtype).to(votes.device)  # (L, 1, I)
    routing = prior.expand(n, num_windows, parent_types, children)

    for iteration in range(config.iterations):
        mean, variance, activations = _m_step(
            routing, votes, child_activations, beta_v, beta_a, cost_factor, config.inverse_temperature(iteration), config
        )
        yield RoutingTrace(routing, mean.squeeze(3), variance.squeeze(3), activations)
        if iteration < config.iterations - 1:
            routing = _e_step(votes, mean, variance, activations, geometry, config, config.likelihood_scale(iteration))


def _m_step(
    routing: Tensor,
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    cost_factor: float,
    inverse_temperature: float,
    config: EMRoutingConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Procedure 1, lines 2-7: a weighted Gaussian per parent, its cost and activation.

    Returns ``mean`` and ``variance`` of shape ``(N, L, C, 1, H)`` and ``activations``
    of shape ``(N, L, C)``.
    """
    weighted = routing * child_activations.unsqueeze(2)  # r'_ij = r_ij a_i        (N, L, C, I)
    data = weighted.sum(dim=3)  # R_j                                             (N, L, C)
    weights = (weighted / (data.unsqueeze(3) + config.epsilon)).unsqueeze(-1)  # (N, L, C, I, 1)
    mean = (weights * votes).sum(dim=3, keepdim=True)  # μ_jh
    variance = (weights * (votes - mean) ** 2).sum(dim=3, keepdim=True) + config.variance_floor  # σ²_jh
    cost_per_unit = (beta_v.view(-1, 1) + 0.5 * torch.log(variance.squeeze(3))).sum(dim=-1)
    cost = cost_per_unit * data * cost_factor  # (N, L, C)
    activations = torch.sigmoid(inverse_temperature * (beta_a - cost))
    return mean, variance, activations


def _e_step(
    votes: Tensor,
    mean: Tensor,
    variance: Tensor,
    activations: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    likelihood_scale: float = 1.0,
) -> Tensor:
    """Procedure 1, line 8: posterior of each parent for each child, normalised over all
    the parents (every position and type) that reach the child.  Returns ``(N, L, C, I)``.

    ``likelihood_scale`` is ``τ_t`` of :attr:`EMRoutingConfig.e_step_scales`: the logits are
    ``ln(a_j + ε) + τ_t ln p_ij`` (1 in the paper)."""
    log_likelihood = -(((votes - mean) ** 2) / (2 * variance)).sum(dim=-1) - 0.5 * (
        LOG_2PI + torch.log(variance)
    ).sum(dim=-1)  # ln p_ij                                                       (N, L, C, I)
    if likelihood_scale != 1.0:
        log_likelihood = likelihood_scale * log_likelihood
    logits = torch.log(activations + config.epsilon).unsqueeze(-1) + log_likelihood
    return softmax_over_parents(logits, geometry)
