"""Cache-resident EM routing on CPU: no votes-sized tensor ever goes through memory.

The routing is memory-bound when it is written with whole-tensor operations: each
elementwise step of each EM iteration streams a votes-sized tensor ``(N, L, C, I, H)``
through DRAM (29 M floats for ConvCaps1 of the smallNORB network at batch 32), forward
and backward.  The ``blocked`` implementation runs the routing in compiled code
(:mod:`matcaps.routing.cpu_kernel`) one *block* at a time, a block being one sample at
one parent position: it computes the block's votes ``V_ij = M_i · W_ij`` from the child
poses and transforms into a buffer that stays in cache, runs the M-step and the E-step
on them, and writes only per-parent statistics (``μ``, ``σ²``, ``a``, ``R``) and
per-(slot, parent type) routing values, ``1/H`` of the votes.

The E-step normalises each child over every parent that reaches it, across blocks; that
step's data is child-sized: each block emits, per window slot, the log-sum-exp of its
logits over the parent types, and between two passes these are combined per child over
the windows that read it.  So each EM iteration is one pass over the blocks.  The
backward pass recomputes the votes the same way, one pass per iteration in reverse (the
softmax's cross-window sum ``Σ_j r ḡ_r`` is child-sized too), and in its last pass turns
the votes' gradient of every iteration into the gradients of the poses and transforms
without storing it.  The equations and their gradients are those of
:mod:`matcaps.routing.fused`; the numbers are the same as ``naive`` and ``fused``.

Parent types are the innermost, vectorised dimension, padded to a multiple of
:data:`LANES` with inert types (no routing weight, no gradient).  Where the kernel does
not apply (another device, a pose size other than 4×4, or no compiler: see
:func:`matcaps.routing.cpu_kernel.load_kernel`), :func:`route_capsules_blocked` runs the
``fused`` routing instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from matcaps.routing.config import EMRoutingConfig
from matcaps.routing.cpu_kernel import load_kernel
from matcaps.routing.first_order import check_first_order, first_order_only
from matcaps.routing.fused import route_capsules_fused
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.naive import RoutingTrace
from matcaps.routing.workspace import RoutingWorkspace

#: Name of this implementation in messages (``EMRoutingConfig.implementation``).
IMPLEMENTATION = "blocked"
#: Parent types per vector chunk of the kernel (``kLanes`` in ``routing_cpu.cpp``).
LANES = 16
#: The kernel's pose size: 4×4 matrices, 16 entries (``kSide`` in ``routing_cpu.cpp``; the paper's size,
#: :data:`~matcaps.routing.capsules.PAPER_POSE_SIZE`, is the only one it is compiled for).
POSE_SIZE = 4
#: Dtypes the kernel is compiled for.
KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_applies(windows: Tensor) -> bool:
    """Whether the compiled kernel can route these ``(N, L, I, P, P)`` windows (device, dtype, pose size)."""
    return (
        windows.device.type == "cpu"
        and windows.dtype in KERNEL_DTYPES
        and windows.shape[-2:] == (POSE_SIZE, POSE_SIZE)
    )


@torch.compiler.disable
def route_capsules_blocked(
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
    """Votes and EM routing block by block in cache (same contract as :func:`matcaps.routing.route_capsules`).

    Args:
        windows: ``(N, L, I, 4, 4)`` child poses of every window.
        transforms: ``(I, C, 4, 4)``.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.
        geometry: Which child position each window slot reads.
        config: Routing hyper-parameters.
        vote_offsets: Optional ``(I, 16)`` constants added to the votes (no gradient).
        workspace: Scratch space of the ``fused`` routing, used where the kernel does not apply.

    Returns:
        ``(N, L, C, 16)`` pose means and ``(N, L, C)`` activations of the last M-step.
    """
    kernel = load_kernel() if kernel_applies(windows) else None
    if kernel is not None:
        check_first_order(IMPLEMENTATION, windows, transforms, vote_offsets, child_activations, beta_v, beta_a)
    if kernel is None:
        return route_capsules_fused(
            windows, transforms, child_activations, beta_v, beta_a, geometry, config, vote_offsets, workspace
        )
    n, num_windows, children = windows.shape[:3]
    types = transforms.shape[1]
    dtype = windows.dtype
    layout = _KernelLayout.of(geometry, config, children, types, dtype, kernel)
    flat_windows = windows.reshape(n, num_windows, children, POSE_SIZE * POSE_SIZE).contiguous()
    packed = pack_transforms(transforms.to(dtype))
    offsets = None if vote_offsets is None else vote_offsets.detach().to(dtype).contiguous()
    activations = child_activations.to(dtype).contiguous()
    padding = layout.padded_types - types
    padded_beta_v = F.pad(beta_v.to(dtype), (0, padding))
    padded_beta_a = F.pad(beta_a.to(dtype), (0, padding))
    inputs = (flat_windows, packed, offsets, activations, padded_beta_v, padded_beta_a)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        mean, activation = _BlockedRouting.apply(*inputs, layout)
    else:
        mean, activation = kernel.forward(*inputs, *layout.arguments(), False)
    # (N, L, 16, Cp) and (N, L, Cp) → (N, L, C, 16) and (N, L, C)
    return mean.transpose(2, 3)[:, :, :types].contiguous(), activation[:, :, :types].contiguous()


@torch.no_grad()
def trace_blocked_routing(
    windows: Tensor,
    transforms: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    vote_offsets: Tensor | None = None,
) -> list[RoutingTrace]:
    """Every iteration's state as the compiled kernel computed it (what it keeps for backward).

    Same arguments as :func:`route_capsules_blocked`; the counterpart of
    :func:`matcaps.routing.trace_em_routing` (same layout), to check the kernel's routing
    weights and statistics.  No gradient.

    Raises:
        RuntimeError: if the kernel is not available or does not apply to these inputs.
    """
    kernel = load_kernel() if kernel_applies(windows) else None
    if kernel is not None:
        check_first_order(IMPLEMENTATION, windows, transforms, vote_offsets, child_activations, beta_v, beta_a)
    if kernel is None:
        raise RuntimeError("the blocked routing's kernel is not available for these inputs")
    n, num_windows, children = windows.shape[:3]
    types = transforms.shape[1]
    layout = _KernelLayout.of(geometry, config, children, types, windows.dtype, kernel)
    padding = layout.padded_types - types
    _, _, routing, means, variances, activations, *_ = kernel.forward(
        windows.reshape(n, num_windows, children, POSE_SIZE * POSE_SIZE).contiguous(),
        pack_transforms(transforms),
        None if vote_offsets is None else vote_offsets.contiguous(),
        child_activations.contiguous(),
        F.pad(beta_v, (0, padding)),
        F.pad(beta_a, (0, padding)),
        *layout.arguments(),
        True,
    )
    return [
        RoutingTrace(
            routing=routing[t].transpose(2, 3)[:, :, :types],
            mean=means[t].transpose(2, 3)[:, :, :types],
            variance=variances[t].transpose(2, 3)[:, :, :types],
            activations=activations[t][:, :, :types],
        )
        for t in range(config.iterations)
    ]


def pack_transforms(transforms: Tensor) -> Tensor:
    """``(I, C, 4, 4)`` → ``(I, K, 4, 4, LANES)``: parent types innermost, padded with zero matrices to ``K·LANES``."""
    children, types = transforms.shape[:2]
    chunks = -(-types // LANES)
    padded = F.pad(transforms, (0, 0, 0, 0, 0, chunks * LANES - types))
    return padded.view(children, chunks, LANES, POSE_SIZE, POSE_SIZE).permute(0, 1, 3, 4, 2).contiguous()


@dataclass(frozen=True)
class _KernelLayout:
    """The non-tensor arguments of one routed layer's kernel calls.

    Attributes:
        prior: ``(L, I)`` routing weights of the first M-step.
        slot_child: ``(L, S)`` child position read by every window slot (``P`` = padding).
        child_positions: ``P``.
        types: ``C``; ``padded_types`` is ``C`` rounded up to a multiple of :data:`LANES`.
        inverse_temperatures: ``λ_t`` of every iteration.
        likelihood_scales: ``τ_t`` of the E-step after every iteration (the last is unused).
        cost_factor, variance_floor, epsilon: As in :class:`EMRoutingConfig`.
        kernel: The compiled module.
    """

    prior: Tensor
    slot_child: Tensor
    child_positions: int
    types: int
    padded_types: int
    inverse_temperatures: tuple[float, ...]
    likelihood_scales: tuple[float, ...]
    cost_factor: float
    variance_floor: float
    epsilon: float
    kernel: ModuleType

    @classmethod
    def of(
        cls, geometry: RoutingGeometry, config: EMRoutingConfig, children: int, types: int, dtype: torch.dtype,
        kernel: ModuleType,
    ) -> "_KernelLayout":  # fmt: skip
        with torch.inference_mode(False):  # may be kept on ctx for a backward pass after inference mode
            prior = geometry.initial_assignment(children // geometry.window_size, types, dtype).squeeze(1).contiguous()
        return cls(
            prior=prior,
            slot_child=geometry.slot_child_index.contiguous(),
            child_positions=geometry.num_child_positions,
            types=types,
            padded_types=-(-types // LANES) * LANES,
            inverse_temperatures=tuple(config.inverse_temperature(t) for t in range(config.iterations)),
            likelihood_scales=tuple(config.likelihood_scale(t) for t in range(config.iterations)),
            cost_factor=config.cost_factor(children, types),
            variance_floor=config.variance_floor,
            epsilon=config.epsilon,
            kernel=kernel,
        )

    def arguments(self) -> tuple:
        """The arguments that follow the tensors in the kernel's ``forward`` and ``backward``."""
        return (
            self.prior, self.slot_child, self.child_positions, self.types, list(self.inverse_temperatures),
            list(self.likelihood_scales), self.cost_factor, self.variance_floor, self.epsilon,
        )  # fmt: skip


class _BlockedRouting(torch.autograd.Function):
    """The kernel's forward pass (keeping per-parent and per-slot state) and its backward pass.

    Saved for backward: the inputs (poses, packed transforms, activations, β) and, per
    iteration, the routing weights ``(N, L, I, Cp)`` and the per-parent statistics; no
    votes-sized tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        windows: Tensor,
        packed: Tensor,
        offsets: Tensor | None,
        activations: Tensor,
        beta_v: Tensor,
        beta_a: Tensor,
        layout: _KernelLayout,
    ) -> tuple[Tensor, Tensor]:
        mean, activation, *state = layout.kernel.forward(
            windows, packed, offsets, activations, beta_v, beta_a, *layout.arguments(), True
        )
        ctx.save_for_backward(windows, packed, offsets, activations, beta_v, beta_a, *state)
        ctx.layout = layout
        return mean, activation

    @staticmethod
    @first_order_only(IMPLEMENTATION)
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_mean: Tensor | None, grad_activation: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        windows, packed, offsets, activations, beta_v, beta_a, *state = ctx.saved_tensors
        layout: _KernelLayout = ctx.layout
        n, num_windows = windows.shape[:2]
        if grad_mean is None:
            grad_mean = windows.new_zeros(n, num_windows, POSE_SIZE * POSE_SIZE, layout.padded_types)
        if grad_activation is None:
            grad_activation = windows.new_zeros(n, num_windows, layout.padded_types)
        grads = layout.kernel.backward(
            windows, packed, offsets, activations, beta_v, beta_a, *layout.arguments(), *state,
            grad_mean.contiguous(), grad_activation.contiguous(),
        )  # fmt: skip
        grad_windows, grad_packed, grad_activations, grad_beta_v, grad_beta_a = grads
        return grad_windows, grad_packed, None, grad_activations, grad_beta_v, grad_beta_a, None
