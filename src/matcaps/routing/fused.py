"""EM routing as autograd functions with a hand-written backward pass.

Plain autograd stores every intermediate of every EM iteration, about ten tensors the
size of the votes ``(N, L, C, I, H)`` per iteration, and each elementwise step is another
pass over memory.  The fused implementation keeps only small per-iteration statistics
(routing weights, means, variances, activations: at most ``1/H`` of the votes each) and
computes every contraction over children or pose entries as a batched matrix product on
the ``(B, I, H)`` view of the votes, ``B = N·L·C``.  :func:`route_capsules_fused` goes
further and does not keep the votes either: it recomputes them from the child poses in
the backward pass, so a routed layer holds no votes-sized tensor between the forward and
the backward pass at all; its votes-sized scratch space comes from
:mod:`matcaps.routing.workspace`.

The backward pass is the chain rule through all iterations written out by hand (no
``stop_gradient``, as in the IBM implementation).  With ``D = V − μ``, ``Q = D²``,
``w_ij = r'_ij / (R_j + ε)`` and ``W_j = Σ_i w_ij = R_j / (R_j + ε)``:

* M-step, from the gradients of ``μ``, ``σ²`` and ``a``:
  ``ḡ_u = ḡ_a a(1 − a) λ``, ``ḡ_cost = −ḡ_u``, ``ḡ_R = ḡ_cost f_L Σ_h(β_v + ½ ln σ²)``,
  ``ḡ_σ² += ḡ_cost f_L R ½ / σ²``, ``ḡ_μ,total = ḡ_μ − 2 ḡ_σ² μ (1 − W)``,
  ``ḡ_w,i = Σ_h (ḡ_μ,total V_ih + ḡ_σ²,h Q_ih)``, ``ḡ_V += w (ḡ_μ,total + 2 ḡ_σ² D)``,
  ``ḡ_r',i = (ḡ_w,i − Σ_k ḡ_w,k w_k) / (R + ε) + ḡ_R``, then ``ḡ_r = ḡ_r' a_in`` and
  ``ḡ_a_in += Σ_j ḡ_r' r``.
* E-step, from the gradient of the next routing weights:
  ``ḡ_z = r (ḡ_r − Σ_{j ∈ parents(i)} r ḡ_r)`` (softmax over every parent of the child),
  ``ḡ_a += Σ_i ḡ_z / (a + ε)``, ``ḡ_μ += Σ_i ḡ_z D / σ²``,
  ``ḡ_σ² += Σ_i ḡ_z (Q / σ² − 1) / (2σ²)``, ``ḡ_V −= ḡ_z D / σ²``.

Every term of the votes' gradient is an outer product ``column_i ⊗ row_h`` per parent,
multiplied by ``V`` or not (``D = V − μ``), and the columns are the same two families
(``w`` and ``ḡ_z``) for both kinds; so it is gathered at the end as
``ḡ_V = V ⊙ (A G_V) + A G_1`` with two batched matrix products instead of a pass per term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from matcaps.routing.config import LOG_2PI, EMRoutingConfig
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.normalise import softmax_over_parents, sum_over_parents
from matcaps.routing.votes import (
    block_diagonal_transforms,
    child_major_poses,
    kronecker_votes_,
    kronecker_votes_backward,
)
from matcaps.routing.workspace import scratch

#: Scratch-buffer slots (see :func:`matcaps.routing.workspace.scratch`).
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
) -> tuple[Tensor, Tensor]:
    """EM routing with a hand-written backward pass (same contract as ``em_routing``).

    Args:
        votes: ``(N, L, C, I, H)``.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.
        geometry: Window-to-child map of the layer.
        config: Routing hyper-parameters.

    Returns:
        ``(N, L, C, H)`` pose means and ``(N, L, C)`` activations.
    """
    return _FusedEMRouting.apply(votes.contiguous(), child_activations.contiguous(), beta_v, beta_a, geometry, config)


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
) -> tuple[Tensor, Tensor]:
    """Votes and EM routing in one function that keeps no votes-sized tensor for backward.

    Same contract as :func:`matcaps.routing.route_capsules`.
    """
    offsets = None if vote_offsets is None else vote_offsets.detach().contiguous()
    return _FusedCapsuleRouting.apply(
        windows.contiguous(), transforms, offsets, child_activations.contiguous(), beta_v, beta_a, geometry, config
    )


@dataclass
class _IterationState:
    """What one EM iteration keeps for the backward pass (all small next to the votes).

    Attributes:
        routing: ``(N, L, C, I)`` routing weights ``r`` the M-step used.
        weights: ``(N, L, C, I)`` normalised weights ``w = r a_in / (R + ε)``.
        data: ``(N, L, C)`` data received ``R``.
        mean, variance: ``(B, 1, H)`` ``μ`` and ``σ²`` (floor included).
        activations: ``(N, L, C)`` ``a``.
        inverse_temperature: ``λ_t``.
    """

    routing: Tensor
    weights: Tensor
    data: Tensor
    mean: Tensor
    variance: Tensor
    activations: Tensor
    inverse_temperature: float


def _routing_forward(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    squared_deviations: Tensor,
) -> list[_IterationState]:
    """Run the EM iterations without autograd.

    Args:
        votes: ``(N, L, C, I, H)`` contiguous.
        child_activations: ``(N, L, I)``.
        squared_deviations: ``(B, I, H)`` scratch space for ``Q``.

    Returns:
        One state per iteration; the last holds the outputs.
    """
    n, num_windows, parent_types, children, entries = votes.shape
    batch = n * num_windows * parent_types
    flat_votes = votes.view(batch, children, entries)
    cost_factor = config.cost_factor(children, parent_types)
    prior = geometry.initial_assignment(children // geometry.window_size, parent_types, votes.dtype)
    routing = prior.to(votes.device).expand(n, num_windows, parent_types, children)
    activations_in = child_activations.unsqueeze(2)  # (N, L, 1, I)

    states: list[_IterationState] = []
    for iteration in range(config.iterations):
        inverse_temperature = config.inverse_temperature(iteration)
        weighted = routing * activations_in  # r'                 (N, L, C, I)
        data = weighted.sum(dim=-1)  # R                            (N, L, C)
        weights = weighted.div_((data + config.epsilon).unsqueeze(-1))  # w
        row_weights = weights.view(batch, 1, children)
        mean = torch.bmm(row_weights, flat_votes)  # μ            (B, 1, H)
        torch.sub(flat_votes, mean, out=squared_deviations).square_()
        variance = torch.bmm(row_weights, squared_deviations).add_(config.variance_floor)  # σ²
        log_variance_sum = variance.log().sum(dim=-1).view(n, num_windows, parent_types)
        cost = cost_factor * data * (entries * beta_v + 0.5 * log_variance_sum)
        activations = torch.sigmoid(inverse_temperature * (beta_a - cost))  # (N, L, C)
        states.append(_IterationState(routing, weights, data, mean, variance, activations, inverse_temperature))
        if iteration < config.iterations - 1:
            # z = ln(a + ε) + ln p,  ln p = −½ Σ_h Q/σ² − ½ Σ_h ln(2π σ²)
            scaled_distance = torch.bmm(squared_deviations, variance.reciprocal().transpose(1, 2))  # (B, I, 1)
            log_normaliser = 0.5 * (entries * LOG_2PI + log_variance_sum)
            logits = scaled_distance.view(n, num_windows, parent_types, children).mul_(-0.5)
            logits += (torch.log(activations + config.epsilon) - log_normaliser).unsqueeze(-1)
            routing = softmax_over_parents(logits, geometry)
    return states


def _routing_backward(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    states: list[_IterationState],
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    grad_mean_out: Tensor | None,
    grad_activations_out: Tensor | None,
    squared_deviations: Tensor,
    grad_votes: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward pass through every EM iteration (see the module docstring for the formulas).

    Args:
        votes: ``(N, L, C, I, H)`` as in the forward pass.
        grad_mean_out: ``(N, L, C, H)`` or None.
        grad_activations_out: ``(N, L, C)`` or None.
        squared_deviations: ``(B, I, H)`` scratch space.
        grad_votes: ``(B, I, H)`` destination of the votes' gradient (must not alias
            ``votes`` or ``squared_deviations``).

    Returns:
        ``(grad_votes, grad_child_activations, grad_beta_v, grad_beta_a)``.
    """
    n, num_windows, parent_types, children, entries = votes.shape
    batch = n * num_windows * parent_types
    flat_votes = votes.view(batch, children, entries)
    cost_factor = config.cost_factor(children, parent_types)
    activations_in = child_activations.unsqueeze(2)
    final = states[-1]

    grad_mean = torch.zeros_like(final.mean) if grad_mean_out is None else grad_mean_out.reshape(batch, 1, entries)
    grad_activations = torch.zeros_like(final.activations) if grad_activations_out is None else grad_activations_out
    grad_child_activations = torch.zeros_like(child_activations)
    grad_beta_a = torch.zeros_like(beta_v)
    grad_beta_v = torch.zeros_like(beta_v)
    columns: list[Tensor] = []  # (N, L, C, I) each
    rows_times_votes: list[Tensor] = []  # (B, 1, H) each
    rows_plain: list[Tensor] = []
    grad_next_routing: Tensor | None = None

    for iteration in reversed(range(config.iterations)):
        state = states[iteration]
        mean, variance = state.mean, state.variance
        torch.sub(flat_votes, mean, out=squared_deviations).square_()
        grad_variance = torch.zeros_like(variance)

        if grad_next_routing is not None:
            # E-step of this iteration: the next routing weights are a softmax over parents of z.
            next_routing = states[iteration + 1].routing
            weighted_grad = next_routing * grad_next_routing
            grad_logits = weighted_grad.sub_(next_routing * sum_over_parents(weighted_grad, geometry))
            grad_logit_rows = grad_logits.view(batch, 1, children)
            grad_logit_sums = grad_logits.sum(dim=-1)  # (N, L, C)
            grad_activations = grad_activations + grad_logit_sums / (state.activations + config.epsilon)
            per_parent_sums = grad_logit_sums.view(batch, 1, 1)
            inverse_variance = variance.reciprocal()
            # ∂/∂μ of −½ Σ_h Q/σ²: Σ_i ḡ_z (V − μ)/σ²
            grad_mean = grad_mean + (torch.bmm(grad_logit_rows, flat_votes) - mean * per_parent_sums) * inverse_variance
            # ∂/∂σ² of −½ Σ_h (Q/σ² + ln σ²): Σ_i ḡ_z (Q/σ² − 1) / (2σ²)
            grad_variance += (
                0.5 * torch.bmm(grad_logit_rows, squared_deviations) * inverse_variance - 0.5 * per_parent_sums
            ) * inverse_variance
            # ∂/∂V: −ḡ_z (V − μ)/σ² = V ⊙ (ḡ_z ⊗ −1/σ²) + ḡ_z ⊗ μ/σ²
            columns.append(grad_logits)
            rows_times_votes.append(-inverse_variance)
            rows_plain.append(mean * inverse_variance)

        # M-step of this iteration.
        activations, data, weights = state.activations, state.data, state.weights
        grad_pre_sigmoid = grad_activations * activations * (1 - activations) * state.inverse_temperature
        grad_beta_a += grad_pre_sigmoid.sum(dim=(0, 1))
        grad_cost = -grad_pre_sigmoid  # (N, L, C)
        log_variance_sum = variance.log().sum(dim=-1).view(n, num_windows, parent_types)
        grad_data = grad_cost * cost_factor * (entries * beta_v + 0.5 * log_variance_sum)
        grad_beta_v += (grad_cost * cost_factor * data).sum(dim=(0, 1)) * entries
        grad_variance += (0.5 * cost_factor * grad_cost * data).view(batch, 1, 1) / variance
        weight_total = (data / (data + config.epsilon)).view(batch, 1, 1)  # W = Σ_i w
        grad_mean_total = grad_mean - 2 * grad_variance * mean * (1 - weight_total)
        grad_weights = torch.bmm(flat_votes, grad_mean_total.transpose(1, 2))
        grad_weights += torch.bmm(squared_deviations, grad_variance.transpose(1, 2))
        grad_weights = grad_weights.view(n, num_windows, parent_types, children)
        # ∂/∂V: w (ḡ_μ,total + 2 ḡ_σ² (V − μ)) = V ⊙ (w ⊗ 2ḡ_σ²) + w ⊗ (ḡ_μ,total − 2 ḡ_σ² μ)
        columns.append(weights)
        rows_times_votes.append(2 * grad_variance)
        rows_plain.append(grad_mean_total - 2 * grad_variance * mean)
        grad_weighted = (grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True)) / (
            data + config.epsilon
        ).unsqueeze(-1) + grad_data.unsqueeze(-1)  # ḡ_r'   (N, L, C, I)
        grad_child_activations += (grad_weighted * state.routing).sum(dim=2)
        if iteration > 0:  # the first routing weights are a constant prior
            grad_next_routing = grad_weighted * activations_in
        grad_mean = torch.zeros_like(mean)
        grad_activations = torch.zeros_like(activations)

    left = torch.stack([column.view(batch, children) for column in columns], dim=-1)  # (B, I, K)
    torch.bmm(left, torch.cat(rows_times_votes, dim=1), out=grad_votes).mul_(flat_votes)
    grad_votes += torch.bmm(left, torch.cat(rows_plain, dim=1), out=squared_deviations)
    return grad_votes, grad_child_activations, grad_beta_v, grad_beta_a


def _outputs(states: list[_IterationState], shape: torch.Size) -> tuple[Tensor, Tensor]:
    """The routed poses and activations, as copies of the final state's tensors.

    The states live on ``ctx`` (not in ``save_for_backward``), so an output that *is* one of
    their tensors would form a reference cycle (output → grad_fn → ctx → states → output)
    that only Python's cyclic garbage collector frees: memory then grows by a whole step's
    states per step.  Copies (small: ``1/I`` of the votes) also keep in-place changes of the
    outputs from reaching the backward pass.
    """
    n, num_windows, parent_types, _, entries = shape
    final = states[-1]
    return final.mean.reshape(n, num_windows, parent_types, entries).clone(), final.activations.clone()


class _FusedEMRouting(torch.autograd.Function):
    """EM routing from given votes; keeps the votes (an input) for the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        votes: Tensor,
        child_activations: Tensor,
        beta_v: Tensor,
        beta_a: Tensor,
        geometry: RoutingGeometry,
        config: EMRoutingConfig,
    ) -> tuple[Tensor, Tensor]:
        n, num_windows, parent_types, children, entries = votes.shape
        squares = scratch(_SQUARES_SLOT, (n * num_windows * parent_types, children, entries), votes.dtype, votes.device)
        states = _routing_forward(votes, child_activations, beta_v, beta_a, geometry, config, squares)
        ctx.save_for_backward(votes, child_activations, beta_v)
        ctx.states, ctx.geometry, ctx.config = states, geometry, config
        return _outputs(states, votes.shape)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        votes, child_activations, beta_v = ctx.saved_tensors
        n, num_windows, parent_types, children, entries = votes.shape
        flat_shape = (n * num_windows * parent_types, children, entries)
        squares = scratch(_SQUARES_SLOT, flat_shape, votes.dtype, votes.device)
        grad_votes = votes.new_empty(flat_shape)
        grads = _routing_backward(
            votes, child_activations, beta_v, ctx.states, ctx.geometry, ctx.config,
            grad_mean, grad_activations, squares, grad_votes,
        )  # fmt: skip
        grad_votes, grad_child_activations, grad_beta_v, grad_beta_a = grads
        return grad_votes.view_as(votes), grad_child_activations, grad_beta_v, grad_beta_a, None, None


class _FusedCapsuleRouting(torch.autograd.Function):
    """Votes plus EM routing; recomputes the votes in the backward pass instead of keeping them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        windows: Tensor,
        transforms: Tensor,
        vote_offsets: Tensor | None,
        child_activations: Tensor,
        beta_v: Tensor,
        beta_a: Tensor,
        geometry: RoutingGeometry,
        config: EMRoutingConfig,
    ) -> tuple[Tensor, Tensor]:
        child_major = child_major_poses(windows)
        votes = _votes_into_scratch(windows, transforms, vote_offsets, child_major)
        n, num_windows, parent_types, children, entries = votes.shape
        squares = scratch(_SQUARES_SLOT, (n * num_windows * parent_types, children, entries), votes.dtype, votes.device)
        states = _routing_forward(votes, child_activations, beta_v, beta_a, geometry, config, squares)
        ctx.save_for_backward(windows, transforms, vote_offsets, child_activations, beta_v)
        ctx.states, ctx.geometry, ctx.config = states, geometry, config
        return _outputs(states, votes.shape)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        windows, transforms, vote_offsets, child_activations, beta_v = ctx.saved_tensors
        child_major = child_major_poses(windows)
        votes = _votes_into_scratch(windows, transforms, vote_offsets, child_major)
        n, num_windows, parent_types, children, entries = votes.shape
        flat_shape = (n * num_windows * parent_types, children, entries)
        squares = scratch(_SQUARES_SLOT, flat_shape, votes.dtype, votes.device)
        # The products' scratch space is free once the votes are recomputed.
        grad_votes = scratch(_PRODUCTS_SLOT, flat_shape, votes.dtype, votes.device)
        grads = _routing_backward(
            votes, child_activations, beta_v, ctx.states, ctx.geometry, ctx.config,
            grad_mean, grad_activations, squares, grad_votes,
        )  # fmt: skip
        grad_votes, grad_child_activations, grad_beta_v, grad_beta_a = grads
        # The votes' scratch space is free now: reorder the gradient into it.
        grad_products = scratch(_VOTES_SLOT, (children, n * num_windows, parent_types * entries), votes.dtype, votes.device)
        grad_windows, grad_transforms = kronecker_votes_backward(
            grad_votes.view(votes.shape), grad_products, child_major, transforms
        )
        return grad_windows, grad_transforms, None, grad_child_activations, grad_beta_v, grad_beta_a, None, None


def _votes_into_scratch(
    windows: Tensor, transforms: Tensor, vote_offsets: Tensor | None, child_major: Tensor
) -> Tensor:
    """The votes ``(N, L, C, I, H)`` computed into the votes scratch buffer."""
    n, num_windows, children, pose_size, _ = windows.shape
    parent_types, entries = transforms.shape[1], pose_size * pose_size
    products = scratch(_PRODUCTS_SLOT, (children, n * num_windows, parent_types * entries), windows.dtype, windows.device)
    votes = scratch(_VOTES_SLOT, (n, num_windows, parent_types, children, entries), windows.dtype, windows.device)
    return kronecker_votes_(votes, products, child_major, block_diagonal_transforms(transforms), vote_offsets)
