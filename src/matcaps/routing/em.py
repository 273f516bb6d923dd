"""EM routing between capsule layers (Hinton, Sabour & Frosst 2018, Procedure 1).

The public entry points :func:`route_capsules` and :func:`em_routing` dispatch to one of
four implementations that give the same numbers:

* ``"fused"`` (:mod:`matcaps.routing.fused`): a custom autograd function that keeps one
  votes-sized buffer per iteration and computes the backward pass by hand;
* ``"blocked"`` (:mod:`matcaps.routing.blocked`): a compiled CPU kernel that computes the
  votes block by block in cache and never stores them (``route_capsules`` only: given
  votes, and off the CPU, it runs ``fused``);
* ``"naive"`` (:mod:`matcaps.routing.naive`): every intermediate materialised and
  differentiated by autograd;
* ``"triton"`` (:mod:`matcaps.routing.triton_routing`): a Triton kernel per EM iteration
  that keeps each window's votes in registers (CUDA, or Triton's interpreter on CPU).

All follow the IBM implementation's three corrections (Gritzman 2019): routing weights
normalised over every parent a child reaches (positions and types), a variance floor and
log-space E-step for parents with a single child, and a cost scaled by the data a parent
receives and by the layer factor ``f_L``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from matcaps.errors import InvalidInputError
from matcaps.routing.capsules import Capsules
from matcaps.routing.blocked import route_capsules_blocked
from matcaps.routing.config import EMRoutingConfig
from matcaps.routing.fused import em_routing_fused, route_capsules_fused
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.naive import em_routing_naive
from matcaps.routing.triton_routing import em_routing_triton, route_capsules_triton
from matcaps.routing.votes import compute_votes
from matcaps.routing.workspace import RoutingWorkspace

#: Dtypes that routing never runs in: under autocast its inputs are cast to float32, because
#: ``ln σ²`` of nearly one-child parents and the log-space E-step need float32's range.
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def em_routing(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    workspace: RoutingWorkspace | None = None,
) -> Capsules:
    """Route ``I`` children per window to ``C`` parent types at each of ``L`` positions.

    For every parent ``j`` (one position, one type) the M-step fits a Gaussian to the
    votes of the children in its window weighted by ``r'_ij = r_ij a_i``:

        R_j = Σ_i r'_ij,  μ_jh = Σ_i r'_ij V_ijh / (R_j + ε),
        σ²_jh = Σ_i r'_ij (V_ijh − μ_jh)² / (R_j + ε) + floor,
        cost_j = f_L · R_j · Σ_h (β_v + ½ ln σ²_jh),  a_j = sigmoid(λ_t (β_a − cost_j)),

    and the E-step (all iterations but the last) reassigns each child over **all** the
    parents that reach it, at every position and of every type:

        ln p_ij = −Σ_h (V_ijh − μ_jh)² / (2σ²_jh) − ½ Σ_h ln(2π σ²_jh),
        r_ij = softmax_{j ∈ parents(i)} (ln(a_j + ε) + ln p_ij).

    The first M-step uses ``r_ij = 1 / (|P(x_i)| · C)`` where ``|P(x_i)|`` is the number of
    parent positions whose window contains the child.

    Args:
        votes: ``(N, L, C, I, H)``, votes ``V_ij`` of the ``I = S·B`` children of each
            window for each parent type (``H`` pose entries, 16 for 4×4 poses).
        child_activations: ``(N, L, I)``, activation ``a_i`` of each child of each window
            (zero for slots in the zero padding).
        beta_v: ``(C,)``, cost offset per parent type.
        beta_a: ``(C,)``, activation offset per parent type.
        geometry: Which child position each window slot reads.
        config: Hyper-parameters, including which implementation to use.
        workspace: Scratch space the ``"fused"`` implementation reuses between calls on CPU
            (None: fresh allocations, nothing kept).

    Returns:
        :class:`Capsules` ``(poses, activations)``: ``(N, L, C, H)`` pose means ``μ_j`` and
        ``(N, L, C)`` activations ``a_j`` of the final M-step.

    Raises:
        InvalidInputError: The shapes, dtypes or devices of the inputs do not match.
    """
    if votes.dim() != 5:
        raise InvalidInputError(f"votes must have shape (N, L, C, I, H), got {tuple(votes.shape)}")
    _check_routing_inputs(votes.shape[:4], child_activations, beta_v, beta_a, geometry)
    # Given votes, the blocked routing has nothing to save: it runs the fused one.
    with torch.autocast(votes.device.type, enabled=False):
        votes, child_activations, beta_v, beta_a = _full_precision(votes, child_activations, beta_v, beta_a)
        _check_dtypes_and_devices(votes=votes, child_activations=child_activations, beta_v=beta_v, beta_a=beta_a)
        if config.implementation == "naive":
            return Capsules(*em_routing_naive(votes, child_activations, beta_v, beta_a, geometry, config))
        if config.implementation == "triton":
            return Capsules(*em_routing_triton(votes, child_activations, beta_v, beta_a, geometry, config))
        return Capsules(*em_routing_fused(votes, child_activations, beta_v, beta_a, geometry, config, workspace))


def route_capsules(
    windows: Tensor,
    transforms: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    vote_offsets: Tensor | None = None,
    workspace: RoutingWorkspace | None = None,
) -> Capsules:
    """Votes ``V_ij = M_i · W_ij`` (plus optional offsets) followed by :func:`em_routing`.

    This is what a routed capsule layer computes.  With the ``"fused"`` implementation
    the votes are never kept for the backward pass (they are recomputed from the poses),
    so memory does not grow with the number of votes; with ``"blocked"`` they never
    leave the cache.

    Args:
        windows: ``(N, L, I, P, P)``, poses of the ``I`` children of each window.
        transforms: ``(I, C, P, P)``, one transformation matrix per child slot and parent type.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.
        geometry: Which child position each window slot reads.
        config: Hyper-parameters, including which implementation to use.
        vote_offsets: Optional ``(I, P·P)`` constants added to the votes of each child slot
            (coordinate addition); they receive no gradient.
        workspace: Scratch space the ``"fused"`` implementation reuses between calls on CPU
            (None: fresh allocations, nothing kept).

    Returns:
        :class:`Capsules` ``(poses, activations)``: ``(N, L, C, P·P)`` pose means and
        ``(N, L, C)`` activations.

    Raises:
        InvalidInputError: The shapes, dtypes or devices of the inputs do not match.
    """
    _check_windows(windows, transforms)
    n, num_windows, children = windows.shape[:3]
    _check_routing_inputs((n, num_windows, transforms.shape[1], children), child_activations, beta_v, beta_a, geometry)
    with torch.autocast(windows.device.type, enabled=False):  # votes in full precision for both implementations
        windows, transforms, child_activations, beta_v, beta_a, vote_offsets = _full_precision(
            windows, transforms, child_activations, beta_v, beta_a, vote_offsets
        )
        _check_dtypes_and_devices(
            windows=windows, transforms=transforms, child_activations=child_activations, beta_v=beta_v, beta_a=beta_a,
            vote_offsets=vote_offsets,
        )  # fmt: skip
        if config.implementation == "naive":
            votes = compute_votes(windows, transforms, vote_offsets)
            return Capsules(*em_routing_naive(votes, child_activations, beta_v, beta_a, geometry, config))
        if config.implementation == "triton":
            return Capsules(*route_capsules_triton(
                windows, transforms, child_activations, beta_v, beta_a, geometry, config, vote_offsets
            ))  # fmt: skip
        route = route_capsules_blocked if config.implementation == "blocked" else route_capsules_fused
        return Capsules(*route(
            windows, transforms, child_activations, beta_v, beta_a, geometry, config, vote_offsets, workspace
        ))  # fmt: skip


def _full_precision(*tensors: Tensor | None) -> tuple[Tensor, ...]:
    return tuple(t.float() if t is not None and t.dtype in _REDUCED_PRECISION else t for t in tensors)  # type: ignore[misc]


def _check_dtypes_and_devices(**tensors: Tensor | None) -> None:
    """Every tensor a floating-point tensor of one dtype on one device."""
    given = {name: t for name, t in tensors.items() if t is not None}
    if len({(t.dtype, t.device) for t in given.values()}) > 1 or not all(t.is_floating_point() for t in given.values()):
        found = ", ".join(f"{name} {str(t.dtype).removeprefix('torch.')} on {t.device}" for name, t in given.items())
        raise InvalidInputError(f"routing inputs must be floating-point tensors of one dtype on one device, got {found}")


def _check_windows(windows: Tensor, transforms: Tensor) -> None:
    if windows.dim() != 5 or transforms.dim() != 4 or windows.shape[2] != transforms.shape[0]:
        raise InvalidInputError(
            f"windows (N, L, I, P, P) and transforms (I, C, P, P) do not match: "
            f"{tuple(windows.shape)} and {tuple(transforms.shape)}"
        )
    if windows.shape[3:] != transforms.shape[2:] or transforms.shape[2] != transforms.shape[3]:
        raise InvalidInputError(
            f"poses and transforms must be square matrices of one size, got {tuple(windows.shape)}, {tuple(transforms.shape)}"
        )


def _check_routing_inputs(
    sizes: tuple[int, ...], child_activations: Tensor, beta_v: Tensor, beta_a: Tensor, geometry: RoutingGeometry
) -> None:
    """Check ``(N, L, C, I)`` against the activations, the ``β`` and the geometry."""
    n, num_windows, parent_types, children = sizes
    if num_windows != geometry.num_windows or children % geometry.window_size:
        raise InvalidInputError(
            f"{num_windows} windows of {children} children do not match the routing geometry "
            f"(L={geometry.num_windows} windows of S={geometry.window_size} positions)"
        )
    if geometry.device != child_activations.device:
        raise InvalidInputError(
            f"the routing geometry is on {geometry.device} but the inputs are on {child_activations.device}; "
            "move it with geometry.to(device)"
        )
    if child_activations.shape != (n, num_windows, children):
        raise InvalidInputError(
            f"child_activations must have shape {(n, num_windows, children)}, got {tuple(child_activations.shape)}"
        )
    for name, beta in (("beta_v", beta_v), ("beta_a", beta_a)):
        if beta.shape != (parent_types,):
            raise InvalidInputError(f"{name} must have shape ({parent_types},), got {tuple(beta.shape)}")
