"""EM routing as autograd functions with a hand-written backward pass.

Plain autograd stores every intermediate of every EM iteration, about ten tensors the
size of the votes ``(N, L, C, I, H)`` per iteration, and each elementwise step is another
pass over memory.  The fused implementation keeps only small per-iteration statistics
(routing weights, means, variances, activations: at most ``1/H`` of the votes each) and
computes every contraction over children or pose entries as a batched matrix product on
the ``(B, I, H)`` view of the votes, ``B = N·L·C``.  :func:`route_capsules_fused` goes
further and does not keep the votes either: it recomputes them from the child poses in
the backward pass, so a routed layer holds no votes-sized tensor between the forward and
the backward pass at all; its votes-sized scratch space comes from a
:class:`~matcaps.routing.workspace.RoutingWorkspace` when one is given.

The backward pass is the chain rule through all iterations written out by hand (no
``stop_gradient``, as in the IBM implementation), one helper per step of the naive
implementation: :func:`_m_step_backward` and :func:`_e_step_backward`.  With
``D_t = V − μ_t``, ``Q_t = D_t²``, ``w_ij = r'_ij / (R_j + ε)``, ``W_j = Σ_i w_ij`` and
``1 − W_j = ε / (R_j + ε)``:

* M-step, from the gradients of ``μ``, ``σ²`` and ``a``:
  ``ḡ_u = ḡ_a a(1 − a) λ``, ``ḡ_cost = −ḡ_u``, ``ḡ_R = ḡ_cost f_L Σ_h(β_v + ½ ln σ²)``,
  ``ḡ_σ² += ḡ_cost f_L R ½ / σ²``, ``ḡ_μ,total = ḡ_μ − 2 ḡ_σ² Σ_i w D``,
  ``ḡ_w,i = Σ_h (ḡ_μ,total V_ih + ḡ_σ²,h Q_ih)``, ``ḡ_V += w (ḡ_μ,total + 2 ḡ_σ² D)``,
  ``ḡ_r',i = (ḡ_w,i − Σ_k ḡ_w,k w_k) / (R + ε) + ḡ_R``, then ``ḡ_r = ḡ_r' a_in`` and
  ``ḡ_a_in += Σ_j ḡ_r' r``.
* E-step, from the gradient of the next routing weights:
  ``ḡ_z = r (ḡ_r − Σ_{j ∈ parents(i)} r ḡ_r)`` (softmax over every parent of the child),
  ``ḡ_a += Σ_i ḡ_z / (a + ε)``, ``ḡ_μ += Σ_i ḡ_z D / σ²``,
  ``ḡ_σ² += Σ_i ḡ_z (Q / σ² − 1) / (2σ²)``, ``ḡ_V −= ḡ_z D / σ²``.

Precision.  Near the variance floor ``1/σ²`` reaches ``1e9``, and poses far from the
origin make ``V`` and ``μ`` large next to their difference ``D``; a term computed from
``V`` and ``μ`` separately and scaled by ``1/σ²`` loses every digit.  So nothing is
computed from ``V`` itself, only from the votes less a per-parent reference vote ``c``
(one child's vote, so that ``V − c`` is exact for the votes near it), and
``D = (V − c) − (μ − c)``:

* the forward pass takes ``c`` from the child of largest first-step weight; it keeps
  ``μ − c = Σ_i w (V − c) − (1 − W) c`` and returns ``μ = W c + Σ_i w (V − c)``, exact to
  rounding whether a parent receives data or not;
* the backward pass takes, per parent and pose entry, the vote of the heaviest child of the
  iteration whose variance is smallest (where ``1/σ²`` amplifies most), and recomputes every
  ``μ_t − c`` and ``Σ_i w (V − μ_t)`` from those centred votes, so that deviations, their
  weighted sums and the means agree as they do in autograd (a rounding error of ``μ`` then
  cancels, as in the naive implementation);
* ``1 − W`` is never formed as a difference, and the constant part ``ḡ_μ,total · c`` of
  ``ḡ_w`` enters ``ḡ_r'`` only through ``(1 − W)``.

Every term of the votes' gradient is an outer product ``column_i ⊗ row_h`` per parent,
multiplied by the centred votes or not, and the columns are the same two families (``w``
and ``ḡ_z``) for both kinds; so it is gathered at the end as
``ḡ_V = (V − c) ⊙ (A G_D) + A G_1`` with two batched matrix products instead of a pass per
term (:class:`_VotesGradient`).

Limits: the backward pass is not itself differentiable (no double backward, no
``create_graph``), and the functions do not support ``torch.func`` transforms or
forward-mode AD; each raises :class:`~matcaps.errors.UnsupportedOperationError` naming the
``"naive"`` implementation, which supports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from matcaps.routing.config import LOG_2PI, EMRoutingConfig
from matcaps.routing.first_order import check_first_order, first_order_only
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.normalise import softmax_over_parents, sum_over_parents
from matcaps.routing.votes import (
    block_diagonal_transforms,
    child_major_poses,
    kronecker_products_,
    kronecker_votes_backward,
)
from matcaps.routing.workspace import RoutingWorkspace, scratch

#: Name of this implementation in messages (``EMRoutingConfig.implementation``).
IMPLEMENTATION = "fused"
#: Scratch-buffer slots (see :meth:`matcaps.routing.workspace.RoutingWorkspace.scratch`).
_VOTES_SLOT, _SQUARES_SLOT, _PRODUCTS_SLOT = 0, 1, 2



# ``torch.compile`` runs the fused routing eagerly (a graph break): its forward and backward
# passes are already hand-fused, write into a reused workspace, and are not traceable by
# dynamo; the layers around it (convolutions, gathers of windows) are still compiled.
@torch.compiler.disable
def em_routing_fused(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    workspace: RoutingWorkspace | None = None,
) -> tuple[Tensor, Tensor]:
    """EM routing with a hand-written backward pass (same contract as ``em_routing``).

    Args:
        votes: ``(N, L, C, I, H)``.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.
        geometry: Window-to-child map of the layer.
        config: Routing hyper-parameters.
        workspace: Where to take votes-sized scratch space from (None: fresh allocations).

    Returns:
        ``(N, L, C, H)`` pose means and ``(N, L, C)`` activations.
    """
    check_first_order(IMPLEMENTATION, votes, child_activations, beta_v, beta_a)
    return _FusedEMRouting.apply(
        votes.contiguous(), child_activations.contiguous(), beta_v, beta_a, geometry, config, workspace
    )


@torch.compiler.disable
def route_capsules_fused(
    windows: Tensor,
    transforms: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    vote_offsets: Tensor | None = None,
    workspace: RoutingWorkspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Votes and EM routing in one function that keeps no votes-sized tensor for backward.

    Same contract as :func:`matcaps.routing.route_capsules`.
    """
    check_first_order(IMPLEMENTATION, windows, transforms, child_activations, beta_v, beta_a)
    offsets = None if vote_offsets is None else vote_offsets.detach().contiguous()
    return _FusedCapsuleRouting.apply(
        windows.contiguous(), transforms, offsets, child_activations.contiguous(), beta_v, beta_a, geometry, config,
        workspace,
    )  # fmt: skip


# ---------------------------------------------------------------------------- forward pass


@dataclass
class _IterationState:
    """What one EM iteration keeps for the backward pass (all small next to the votes).

    Attributes:
        routing: ``(N, L, C, I)`` routing weights ``r`` the M-step used.
        weights: ``(N, L, C, I)`` normalised weights ``w = r a_in / (R + ε)``.
        data: ``(N, L, C)`` data received ``R``.
        variance: ``(B, 1, H)`` ``σ²`` (floor included).
        activations: ``(N, L, C)`` ``a``.
        inverse_temperature: ``λ_t``.

    The means are not kept: the backward pass recomputes them from the centred votes.
    """

    routing: Tensor
    weights: Tensor
    data: Tensor
    variance: Tensor
    activations: Tensor
    inverse_temperature: float


#: The tensor fields of :class:`_IterationState`, in the order :func:`_pack_states` saves them.
_STATE_TENSORS = ("routing", "weights", "data", "variance", "activations")


def _pack_states(states: list[_IterationState]) -> list[Tensor]:
    """The states' tensors as one flat list, for ``ctx.save_for_backward``."""
    return [getattr(state, name) for state in states for name in _STATE_TENSORS]


def _unpack_states(tensors: tuple[Tensor, ...], config: EMRoutingConfig) -> list[_IterationState]:
    """Inverse of :func:`_pack_states`."""
    size = len(_STATE_TENSORS)
    return [
        _IterationState(*tensors[t * size : (t + 1) * size], inverse_temperature=config.inverse_temperature(t))
        for t in range(config.iterations)
    ]


def _normalised_weights(routing: Tensor, child_activations: Tensor, config: EMRoutingConfig) -> tuple[Tensor, Tensor]:
    """``(w, R)``: ``w = r a_in / (R + ε)`` ``(N, L, C, I)`` and ``R = Σ_i r a_in`` ``(N, L, C)``."""
    weighted = routing * child_activations.unsqueeze(2)  # r'
    data = weighted.sum(dim=-1)
    return weighted.div_((data + config.epsilon).unsqueeze(-1)), data


def _first_weights(
    child_activations: Tensor, geometry: RoutingGeometry, config: EMRoutingConfig, votes_shape: torch.Size
) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, w, R)`` of the first M-step, from the prior ``r = 1 / (|P(x)| · C)``."""
    n, num_windows, parent_types, children, _ = votes_shape
    prior = geometry.initial_assignment(children // geometry.window_size, parent_types, child_activations.dtype)
    routing = prior.to(child_activations.device).expand(n, num_windows, parent_types, children)
    return (routing, *_normalised_weights(routing, child_activations, config))


def _shortfall(data: Tensor, config: EMRoutingConfig) -> Tensor:
    """``1 − W = 1 − R / (R + ε) = ε / (R + ε)`` as ``(B, 1, 1)``, without the cancellation."""
    return (config.epsilon / (data + config.epsilon)).view(-1, 1, 1)


def _weight_total(data: Tensor, config: EMRoutingConfig) -> Tensor:
    """``W = Σ_i w = R / (R + ε)`` as ``(B, 1, 1)``."""
    return (data / (data + config.epsilon)).view(-1, 1, 1)


def _vote_at(votes: Tensor, offsets: Tensor | None, child: Tensor) -> Tensor:
    """``V + o`` of child ``child[b, 0, h]`` for every parent ``b`` and pose entry ``h``: ``(B, 1, H)``.

    Args:
        votes: ``(B, I, H)`` (any strides).
        offsets: ``(I, H)`` or None.
        child: ``(B, 1, H)`` int64 child indices.
    """
    vote = votes.gather(1, child)
    if offsets is not None:
        vote = vote + offsets.unsqueeze(0).expand(votes.shape[0], -1, -1).gather(1, child)
    return vote


def _heaviest_child(weights: Tensor) -> Tensor:
    """``(B, 1, 1)``: for every parent, the child of largest weight ``w`` ``(N, L, C, I)``."""
    return weights.reshape(-1, weights.shape[-1]).max(dim=1).indices.view(-1, 1, 1)


def _first_centre_child(first_weights: Tensor, entries: int) -> Tensor:
    """``(B, 1, H)``: the heaviest child of the first M-step, the same for every parent type of a
    window (the prior does not depend on the type), found once per window."""
    n, num_windows, parent_types, children = first_weights.shape
    per_window = first_weights[:, :, 0].reshape(-1, children).max(dim=1).indices.view(n, num_windows, 1)
    return per_window.expand(-1, -1, parent_types).reshape(-1, 1, 1).expand(-1, 1, entries)


def _centre_votes(votes: Tensor, centre: Tensor, offsets: Tensor | None, out: Tensor) -> Tensor:
    """``V + o − c`` into ``out`` ``(B, I, H)``, from votes ``(B, I, H)`` (any strides) and ``c`` ``(B, 1, H)``."""
    torch.sub(votes, centre, out=out)
    if offsets is not None:
        out += offsets
    return out


def _routing_forward(
    centred: Tensor,
    centre: Tensor,
    first_weights: tuple[Tensor, Tensor, Tensor],
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    squared_deviations: Tensor,
    votes_shape: torch.Size,
) -> tuple[list[_IterationState], Tensor]:
    """Run the EM iterations without autograd.

    Args:
        centred: ``(B, I, H)`` the votes less a per-parent reference, ``V − c``.
        centre: ``(B, 1, H)`` the reference ``c``: per parent, the vote of one child.
        first_weights: ``(r, w, R)`` of the first M-step (:func:`_first_weights`).
        child_activations: ``(N, L, I)``.
        squared_deviations: ``(B, I, H)`` scratch space for ``Q``.
        votes_shape: ``(N, L, C, I, H)``.

    Returns:
        One state per iteration (the last holds the activations) and the final means
        ``(B, 1, H)``, ``μ = W c + Σ_i w (V − c)``.
    """
    n, num_windows, parent_types, children, entries = votes_shape
    batch = n * num_windows * parent_types
    cost_factor = config.cost_factor(children, parent_types)
    routing, weights, data = first_weights

    states: list[_IterationState] = []
    for iteration in range(config.iterations):
        inverse_temperature = config.inverse_temperature(iteration)
        if iteration > 0:
            weights, data = _normalised_weights(routing, child_activations, config)
        row_weights = weights.view(batch, 1, children)
        centred_sum = torch.bmm(row_weights, centred)  # Σ w (V − c)        (B, 1, H)
        deviation = centred_sum - _shortfall(data, config) * centre  # μ − c = Σ w (V − c) − (1 − W) c
        torch.sub(centred, deviation, out=squared_deviations).square_()  # Q = (V − μ)²
        variance = torch.bmm(row_weights, squared_deviations).add_(config.variance_floor)  # σ²
        log_variance_sum = variance.log().sum(dim=-1).view(n, num_windows, parent_types)
        cost = cost_factor * data * (entries * beta_v + 0.5 * log_variance_sum)
        activations = torch.sigmoid(inverse_temperature * (beta_a - cost))  # (N, L, C)
        states.append(_IterationState(routing, weights, data, variance, activations, inverse_temperature))
        if iteration < config.iterations - 1:
            # z = ln(a + ε) + τ ln p,  ln p = −½ Σ_h Q/σ² − ½ Σ_h ln(2π σ²)
            scale = config.likelihood_scale(iteration)
            scaled_distance = torch.bmm(squared_deviations, variance.reciprocal().transpose(1, 2))  # (B, I, 1)
            log_normaliser = 0.5 * (entries * LOG_2PI + log_variance_sum)
            logits = scaled_distance.view(n, num_windows, parent_types, children).mul_(-0.5 * scale)
            logits += (torch.log(activations + config.epsilon) - scale * log_normaliser).unsqueeze(-1)
            routing = softmax_over_parents(logits, geometry)
    return states, torch.addcmul(centred_sum, _weight_total(data, config), centre)  # μ = W c + Σ w (V − c)


# ---------------------------------------------------------------------------- backward pass


def _backward_centre(states: list[_IterationState], votes: Tensor, offsets: Tensor | None) -> Tensor:
    """``(B, 1, H)``: per parent and pose entry, the vote of the heaviest child of the iteration
    where that entry's variance is smallest (where ``1/σ²`` amplifies rounding most)."""
    smallest = states[0].variance
    child = _heaviest_child(states[0].weights).expand_as(smallest)
    for state in states[1:]:
        smaller = state.variance < smallest
        smallest = torch.where(smaller, state.variance, smallest)
        child = torch.where(smaller, _heaviest_child(state.weights), child)
    return _vote_at(votes, offsets, child)


@dataclass
class _VotesGradient:
    """The votes' gradient, gathered as ``ḡ_V = (V − c) ⊙ (Σ_k c_k ⊗ g_k) + Σ_k c_k ⊗ h_k``.

    Each step's backward adds one term: a column ``c_k`` ``(N, L, C, I)`` over the children
    of each parent and two rows ``(B, 1, H)`` over pose entries, ``g_k`` (multiplied by the
    centred votes) and ``h_k`` (not).
    """

    columns: list[Tensor] = field(default_factory=list)
    centred_rows: list[Tensor] = field(default_factory=list)
    plain_rows: list[Tensor] = field(default_factory=list)

    def add(self, column: Tensor, centred_row: Tensor, plain_row: Tensor) -> None:
        self.columns.append(column)
        self.centred_rows.append(centred_row)
        self.plain_rows.append(plain_row)

    def write(self, out: Tensor, centred: Tensor) -> Tensor:
        """``ḡ_V`` into ``out`` ``(B, I, H)`` (which must not alias ``centred``)."""
        batch, children, _ = centred.shape
        left = torch.stack([column.reshape(batch, children) for column in self.columns], dim=-1)  # (B, I, K)
        torch.bmm(left, torch.cat(self.centred_rows, dim=1), out=out).mul_(centred)
        return out.baddbmm_(left, torch.cat(self.plain_rows, dim=1))


@dataclass
class _CentredStep:
    """One iteration's means, as the backward pass sees them: from the centred votes ``V − c``.

    Attributes:
        squared_deviations: ``(B, I, H)`` ``Q = (V − μ)²``.
        deviation: ``(B, 1, H)`` ``μ − c = Σ_i w (V − c) − (1 − W) c``.
        weighted_deviation: ``(B, 1, H)`` ``Σ_i w (V − μ) = Σ_i w (V − c) − W (μ − c)``.
    """

    squared_deviations: Tensor
    deviation: Tensor
    weighted_deviation: Tensor


@dataclass
class _StepGradients:
    """Gradients flowing into one iteration's M-step from later steps.

    Attributes:
        mean, variance: ``(B, 1, H)`` gradients of ``μ`` and ``σ²``.
        activations: ``(N, L, C)`` gradient of ``a``.
    """

    mean: Tensor
    variance: Tensor
    activations: Tensor


def _softmax_over_parents_backward(grad_routing: Tensor, routing: Tensor, geometry: RoutingGeometry) -> Tensor:
    """``ḡ_z = r (ḡ_r − Σ_{j ∈ parents(i)} r ḡ_r)``, the gradient of the logits of :func:`softmax_over_parents`."""
    weighted_grad = routing * grad_routing
    return weighted_grad.sub_(routing * sum_over_parents(weighted_grad, geometry))


def _e_step_backward(
    grad_logits: Tensor,
    centred_logit_sums: Tensor,
    state: _IterationState,
    step: _CentredStep,
    config: EMRoutingConfig,
    votes_gradient: _VotesGradient,
    likelihood_scale: float = 1.0,
) -> _StepGradients:
    """Backward of the E-step that follows ``state``'s M-step (``naive._e_step``), from its logits on.

    Args:
        grad_logits: ``(N, L, C, I)`` gradient ``ḡ_z`` of the logits ``z = ln(a + ε) + τ ln p``.
        centred_logit_sums: ``(B, 1, H)`` ``Σ_i ḡ_z (V − c)`` over the children of each parent.
        state: The iteration whose ``μ``, ``σ²`` and ``a`` the E-step read.
        step: Its centred means and ``Q``.
        likelihood_scale: ``τ`` of this E-step (:attr:`EMRoutingConfig.e_step_scales`).

    Returns:
        The gradients of this iteration's ``μ``, ``σ²`` and ``a``; the votes' term goes to
        ``votes_gradient``.
    """
    batch, children = step.squared_deviations.shape[:2]
    grad_logit_sums = grad_logits.sum(dim=-1)  # (N, L, C)
    grad_activations = grad_logit_sums / (state.activations + config.epsilon)  # ∂/∂a of ln(a + ε)
    if likelihood_scale != 1.0:  # ln p enters the logits as τ ln p: its terms see τ ḡ_z
        grad_logits = likelihood_scale * grad_logits
        centred_logit_sums = likelihood_scale * centred_logit_sums
        grad_logit_sums = likelihood_scale * grad_logit_sums
    grad_logit_rows = grad_logits.view(batch, 1, children)
    per_parent_sums = grad_logit_sums.view(batch, 1, 1)
    inverse_variance = state.variance.reciprocal()
    # ∂/∂μ of −½ Σ_h Q/σ²: Σ_i ḡ_z (V − μ)/σ² = (Σ_i ḡ_z (V − c) − (μ − c) Σ_i ḡ_z)/σ²
    grad_mean = (centred_logit_sums - step.deviation * per_parent_sums) * inverse_variance
    # ∂/∂σ² of −½ Σ_h (Q/σ² + ln σ²): Σ_i ḡ_z (Q/σ² − 1) / (2σ²)
    grad_variance = (
        0.5 * torch.bmm(grad_logit_rows, step.squared_deviations) * inverse_variance - 0.5 * per_parent_sums
    ) * inverse_variance
    # ∂/∂V: −ḡ_z (V − μ)/σ² = (V − c) ⊙ (ḡ_z ⊗ −1/σ²) + ḡ_z ⊗ (μ − c)/σ²
    votes_gradient.add(grad_logits, -inverse_variance, step.deviation * inverse_variance)
    return _StepGradients(grad_mean, grad_variance, grad_activations)


def _m_step_backward(
    grads: _StepGradients,
    state: _IterationState,
    step: _CentredStep,
    centred: Tensor,
    centre: Tensor,
    beta_v: Tensor,
    cost_factor: float,
    config: EMRoutingConfig,
    votes_gradient: _VotesGradient,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of one M-step (``naive._m_step``).

    Args:
        grads: Gradients of the step's ``μ``, ``σ²`` and ``a``.
        state: The step's saved state.
        step: Its centred means and ``Q``.
        centred: ``(B, I, H)`` centred votes ``V − c``.
        centre: ``(B, 1, H)`` the reference ``c``.

    Returns:
        ``(grad_weighted, grad_beta_v, grad_beta_a)``: the gradient ``(N, L, C, I)`` of
        ``r' = r a_in`` and this step's share of the gradients of ``β_v`` and ``β_a``; the
        votes' term goes to ``votes_gradient``.
    """
    batch, children, entries = centred.shape
    activations, data, weights, variance = state.activations, state.data, state.weights, state.variance
    grad_pre_sigmoid = grads.activations * activations * (1 - activations) * state.inverse_temperature
    grad_beta_a = grad_pre_sigmoid.sum(dim=(0, 1))
    grad_cost = -grad_pre_sigmoid  # (N, L, C)
    log_variance_sum = variance.log().sum(dim=-1).view_as(data)
    grad_data = grad_cost * cost_factor * (entries * beta_v + 0.5 * log_variance_sum)
    grad_beta_v = (grad_cost * cost_factor * data).sum(dim=(0, 1)) * entries
    grad_variance = grads.variance + (0.5 * cost_factor * grad_cost * data).view(batch, 1, 1) / variance
    # σ² = Σ_i w (V − μ)²: through μ, ∂σ²/∂μ = −2 Σ_i w (V − μ)
    grad_mean_total = grads.mean - 2 * grad_variance * step.weighted_deviation
    # ḡ_w,i = ḡ_μ,total·V_i + ḡ_σ²·Q_i with V = (V − c) + c; the constant ḡ_μ,total·c survives the
    # normalisation w = r'/(R + ε) only as ḡ_μ,total·c (1 − W).
    grad_weights = torch.bmm(centred, grad_mean_total.transpose(1, 2))
    grad_weights += torch.bmm(step.squared_deviations, grad_variance.transpose(1, 2))
    grad_weights = grad_weights.view_as(weights)
    normaliser = data + config.epsilon
    constant_part = (grad_mean_total * centre).sum(dim=-1).view_as(data) * (config.epsilon / normaliser)
    centred_part = grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True)
    grad_weighted = (centred_part + constant_part.unsqueeze(-1)) / normaliser.unsqueeze(-1) + grad_data.unsqueeze(-1)
    # ∂/∂V: w (ḡ_μ,total + 2 ḡ_σ² (V − μ))
    #     = (V − c) ⊙ (w ⊗ 2ḡ_σ²) + w ⊗ (ḡ_μ,total − 2ḡ_σ² (μ − c))
    votes_gradient.add(weights, 2 * grad_variance, grad_mean_total - 2 * grad_variance * step.deviation)
    return grad_weighted, grad_beta_v, grad_beta_a


def _routing_backward(
    centred: Tensor,
    centre: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    states: list[_IterationState],
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    grad_mean_out: Tensor | None,
    grad_activations_out: Tensor | None,
    squared_deviations: Tensor,
    grad_votes: Tensor,
    votes_shape: torch.Size,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward pass through every EM iteration (see the module docstring for the formulas).

    Args:
        centred: ``(B, I, H)`` the votes less :func:`_backward_centre`, ``V − c``.
        centre: ``(B, 1, H)`` ``c``.
        grad_mean_out: ``(N, L, C, H)`` or None.
        grad_activations_out: ``(N, L, C)`` or None.
        squared_deviations: ``(B, I, H)`` scratch space.
        grad_votes: ``(B, I, H)`` destination of the votes' gradient (must not alias
            ``centred`` or ``squared_deviations``).
        votes_shape: ``(N, L, C, I, H)``.

    Returns:
        ``(grad_votes, grad_child_activations, grad_beta_v, grad_beta_a)``.
    """
    n, num_windows, parent_types, children, entries = votes_shape
    batch = n * num_windows * parent_types
    cost_factor = config.cost_factor(children, parent_types)
    activations_in = child_activations.unsqueeze(2)
    final = states[-1]

    grads = _StepGradients(
        torch.zeros_like(final.variance) if grad_mean_out is None else grad_mean_out.reshape(batch, 1, entries),
        torch.zeros_like(final.variance),
        torch.zeros_like(final.activations) if grad_activations_out is None else grad_activations_out,
    )
    grad_child_activations = torch.zeros_like(child_activations)
    grad_beta_v = torch.zeros_like(beta_v)
    grad_beta_a = torch.zeros_like(beta_v)
    votes_gradient = _VotesGradient()
    grad_next_routing: Tensor | None = None

    for iteration in reversed(range(config.iterations)):
        state = states[iteration]
        weight_rows = state.weights.view(batch, 1, children)
        grad_logits = None
        if grad_next_routing is None:
            centred_sum = torch.bmm(weight_rows, centred)  # Σ w (V − c)
        else:
            grad_logits = _softmax_over_parents_backward(grad_next_routing, states[iteration + 1].routing, geometry)
            # Both contractions of V − c over children in one pass: Σ_i ḡ_z (V − c) and Σ_i w (V − c).
            rows = torch.cat([grad_logits.view(batch, 1, children), weight_rows], dim=1)
            centred_sums = torch.bmm(rows, centred)  # (B, 2, H)
            centred_sum = centred_sums[:, 1:]
        deviation = centred_sum - _shortfall(state.data, config) * centre  # μ − c
        torch.sub(centred, deviation, out=squared_deviations).square_()  # Q
        step = _CentredStep(
            squared_deviations, deviation, centred_sum - _weight_total(state.data, config) * deviation
        )
        if grad_logits is not None:
            grads = _e_step_backward(
                grad_logits, centred_sums[:, :1], state, step, config, votes_gradient, config.likelihood_scale(iteration)
            )
        grad_weighted, step_grad_beta_v, step_grad_beta_a = _m_step_backward(
            grads, state, step, centred, centre, beta_v, cost_factor, config, votes_gradient
        )
        grad_beta_v += step_grad_beta_v
        grad_beta_a += step_grad_beta_a
        grad_child_activations += (grad_weighted * state.routing).sum(dim=2)
        if iteration > 0:  # the first routing weights are a constant prior
            grad_next_routing = grad_weighted * activations_in

    return votes_gradient.write(grad_votes, centred), grad_child_activations, grad_beta_v, grad_beta_a


# ---------------------------------------------------------------------------- autograd functions


def _outputs(states: list[_IterationState], mean: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """The routed poses ``(N, L, C, H)`` from the final means ``(B, 1, H)`` and a copy of the
    activations ``(N, L, C)`` (so that in-place changes of the outputs cannot reach the
    tensors saved for the backward pass)."""
    n, num_windows, parent_types, _, entries = shape
    return mean.view(n, num_windows, parent_types, entries), states[-1].activations.clone()



class _FusedEMRouting(torch.autograd.Function):
    """EM routing from given votes; keeps the votes (an input) for the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        votes: Tensor,
        child_activations: Tensor,
        beta_v: Tensor,
        beta_a: Tensor,
        geometry: RoutingGeometry,
        config: EMRoutingConfig,
        workspace: RoutingWorkspace | None,
    ) -> tuple[Tensor, Tensor]:
        flat_shape = _flat_shape(votes.shape)
        flat_votes = votes.view(flat_shape)
        first_weights = _first_weights(child_activations, geometry, config, votes.shape)
        centre = _vote_at(flat_votes, None, _first_centre_child(first_weights[1], flat_shape[2]))
        centred = _centre_votes(
            flat_votes, centre, None, scratch(workspace, _PRODUCTS_SLOT, flat_shape, votes.dtype, votes.device)
        )
        squares = scratch(workspace, _SQUARES_SLOT, flat_shape, votes.dtype, votes.device)
        states, mean = _routing_forward(
            centred, centre, first_weights, child_activations, beta_v, beta_a, geometry, config, squares, votes.shape
        )
        ctx.save_for_backward(votes, child_activations, beta_v, *_pack_states(states))
        ctx.geometry, ctx.config, ctx.workspace = geometry, config, workspace
        return _outputs(states, mean, votes.shape)

    @staticmethod
    @first_order_only(IMPLEMENTATION)
    def backward(  # type: ignore[override]
        ctx: Any, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        votes, child_activations, beta_v, *state_tensors = ctx.saved_tensors
        states = _unpack_states(tuple(state_tensors), ctx.config)
        flat_shape = _flat_shape(votes.shape)
        centre = _backward_centre(states, votes.view(flat_shape), None)
        centred = _centre_votes(
            votes.view(flat_shape), centre, None,
            scratch(ctx.workspace, _PRODUCTS_SLOT, flat_shape, votes.dtype, votes.device),
        )  # fmt: skip
        squares = scratch(ctx.workspace, _SQUARES_SLOT, flat_shape, votes.dtype, votes.device)
        grads = _routing_backward(
            centred, centre, child_activations, beta_v, states, ctx.geometry, ctx.config,
            grad_mean, grad_activations, squares, votes.new_empty(flat_shape), votes.shape,
        )  # fmt: skip
        grad_votes, grad_child_activations, grad_beta_v, grad_beta_a = grads
        return grad_votes.view_as(votes), grad_child_activations, grad_beta_v, grad_beta_a, None, None, None


class _FusedCapsuleRouting(torch.autograd.Function):
    """Votes plus EM routing; recomputes the votes in the backward pass instead of keeping them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        windows: Tensor,
        transforms: Tensor,
        vote_offsets: Tensor | None,
        child_activations: Tensor,
        beta_v: Tensor,
        beta_a: Tensor,
        geometry: RoutingGeometry,
        config: EMRoutingConfig,
        workspace: RoutingWorkspace | None,
    ) -> tuple[Tensor, Tensor]:
        child_major = child_major_poses(windows)
        votes, shape = _votes_into_scratch(windows, transforms, child_major, workspace)
        first_weights = _first_weights(child_activations, geometry, config, shape)
        centre = _vote_at(votes, vote_offsets, _first_centre_child(first_weights[1], shape[-1]))
        centred = _centre_votes(
            votes, centre, vote_offsets, scratch(workspace, _VOTES_SLOT, votes.shape, votes.dtype, votes.device)
        )
        squares = scratch(workspace, _SQUARES_SLOT, votes.shape, votes.dtype, votes.device)
        states, mean = _routing_forward(
            centred, centre, first_weights, child_activations, beta_v, beta_a, geometry, config, squares, shape
        )
        ctx.save_for_backward(windows, transforms, vote_offsets, child_activations, beta_v, *_pack_states(states))
        ctx.geometry, ctx.config, ctx.workspace = geometry, config, workspace
        return _outputs(states, mean, shape)

    @staticmethod
    @first_order_only(IMPLEMENTATION)
    def backward(  # type: ignore[override]
        ctx: Any, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        windows, transforms, vote_offsets, child_activations, beta_v, *state_tensors = ctx.saved_tensors
        states = _unpack_states(tuple(state_tensors), ctx.config)
        workspace = ctx.workspace
        child_major = child_major_poses(windows)
        votes, shape = _votes_into_scratch(windows, transforms, child_major, workspace)
        flat_shape, dtype, device = votes.shape, votes.dtype, votes.device
        centre = _backward_centre(states, votes, vote_offsets)
        centred = _centre_votes(votes, centre, vote_offsets, scratch(workspace, _VOTES_SLOT, flat_shape, dtype, device))
        squares = scratch(workspace, _SQUARES_SLOT, flat_shape, dtype, device)
        # The products' scratch space is free once the votes are centred.
        grad_votes = scratch(workspace, _PRODUCTS_SLOT, flat_shape, dtype, device)
        grads = _routing_backward(
            centred, centre, child_activations, beta_v, states, ctx.geometry, ctx.config,
            grad_mean, grad_activations, squares, grad_votes, shape,
        )  # fmt: skip
        grad_votes, grad_child_activations, grad_beta_v, grad_beta_a = grads
        # The centred votes' scratch space is free now: reorder the gradient into it.
        n, num_windows, parent_types, children, entries = shape
        grad_products = scratch(workspace, _VOTES_SLOT, (children, n * num_windows, parent_types * entries), dtype, device)
        grad_windows, grad_transforms = kronecker_votes_backward(
            grad_votes.view(shape), grad_products, child_major, transforms
        )
        return (
            grad_windows, grad_transforms, None, grad_child_activations, grad_beta_v, grad_beta_a, None, None, None
        )  # fmt: skip


def _flat_shape(votes_shape: torch.Size) -> tuple[int, int, int]:
    """``(B, I, H)`` with ``B = N·L·C`` from ``(N, L, C, I, H)``."""
    n, num_windows, parent_types, children, entries = votes_shape
    return (n * num_windows * parent_types, children, entries)


def _votes_into_scratch(
    windows: Tensor, transforms: Tensor, child_major: Tensor, workspace: RoutingWorkspace | None
) -> tuple[Tensor, torch.Size]:
    """The votes without offsets as a strided ``(B, I, H)`` view of the products' scratch
    buffer, and their shape ``(N, L, C, I, H)``."""
    n, num_windows, children, pose_size, _ = windows.shape
    parent_types, entries = transforms.shape[1], pose_size * pose_size
    products = scratch(
        workspace, _PRODUCTS_SLOT, (children, n * num_windows, parent_types * entries), windows.dtype, windows.device
    )
    votes = kronecker_products_(products, child_major, block_diagonal_transforms(transforms))
    return votes, torch.Size((n, num_windows, parent_types, children, entries))
