"""EM routing with a Triton kernel that keeps each window's parents in registers (GPU).

The ``"triton"`` routing implementation.  Its forward pass never writes a votes-sized
tensor: per EM iteration one launch of
:func:`matcaps.routing.triton_kernel.em_iteration_kernel` runs one program per window
(one sample, one parent position, its ``C`` parent types), which computes the votes of the
window's children from their poses and the transformation matrices in registers, recomputes
the previous iteration's routing weights from per-parent statistics, runs the M-step and
writes only per-parent results and per-slot log-sum-exp partials of the next E-step.  A
scatter over the routing geometry combines those partials into each child's maximum and
total over **every** parent that reaches it (Gritzman's first fix); the next launch reads them.

Backward pass (first version): the gradients are those of the ``"fused"`` implementation
recomputed at the same inputs (:func:`matcaps.routing.fused.route_capsules_fused` and its
hand-written backward, differentiated in the backward pass), so training recomputes the
forward pass once in PyTorch and holds the fused implementation's votes-sized scratch space
during the backward pass.  Inference (``torch.no_grad``) holds nothing votes-sized.

Devices: the kernel is compiled for CUDA tensors.  On CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported; slow, for the
tests); otherwise :func:`route_capsules_triton` raises :class:`~matcaps.errors.ConfigError`
(there is no silent fallback to another implementation).
"""

from __future__ import annotations

from contextlib import nullcontext
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from matcaps.errors import ConfigError
from matcaps.routing.config import LOG_2PI, EMRoutingConfig
from matcaps.routing.fused import em_routing_fused, route_capsules_fused
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.naive import RoutingTrace

#: Environment variable that makes Triton interpret kernels on the CPU (read by Triton).
INTERPRET_VARIABLE = "TRITON_INTERPRET"
#: One child per thread (its 16 pose entries in the thread's registers): ``I / 32`` warps.
THREADS_PER_WARP = 32
MAX_WARPS = 16


def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError as error:  # also raised for a broken installation
        return str(error)
    return None


def _kernel_module() -> ModuleType:
    """The kernel module (imports Triton), or a :class:`ConfigError` if Triton is missing."""
    problem = triton_import_error()
    if problem is not None:
        raise ConfigError(
            f"routing implementation 'triton' needs the triton package ({problem}); "
            "install it with pip install 'matcaps[triton]' or choose --routing-impl fused"
        )
    from matcaps.routing import triton_kernel

    return triton_kernel


def interpreter_active() -> bool:
    """Whether the kernel runs under Triton's interpreter (decided when it was first imported)."""
    kernel = _kernel_module().em_iteration_kernel
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_device(device: torch.device) -> None:
    """Raise :class:`ConfigError` unless the Triton kernel can run on ``device``.

    CUDA tensors always can; CPU tensors only under Triton's interpreter.
    """
    _kernel_module()
    if device.type == "cuda" or interpreter_active():
        return
    raise ConfigError(
        f"routing implementation 'triton' runs on CUDA tensors only (got {device.type}); "
        f"choose 'fused' on this device, or set {INTERPRET_VARIABLE}=1 before starting Python "
        "to run Triton's (slow) interpreter"
    )


@torch.compiler.disable
def route_capsules_triton(
    windows: Tensor,
    transforms: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    vote_offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Votes and EM routing in the Triton kernel (same contract as :func:`matcaps.routing.route_capsules`).

    Args:
        windows: ``(N, L, I, P, P)``.
        transforms: ``(I, C, P, P)``.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.
        geometry: Window-to-child map of the layer.
        config: Routing hyper-parameters.
        vote_offsets: Optional ``(I, P·P)``; they receive no gradient.

    Returns:
        ``(N, L, C, P·P)`` pose means and ``(N, L, C)`` activations.
    """
    check_triton_device(windows.device)
    offsets = None if vote_offsets is None else vote_offsets.detach().contiguous()
    return _TritonCapsuleRouting.apply(
        windows.contiguous(), transforms.contiguous(), offsets, child_activations.contiguous(), beta_v, beta_a,
        geometry, config,
    )  # fmt: skip


@torch.compiler.disable
def em_routing_triton(
    votes: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
) -> tuple[Tensor, Tensor]:
    """EM routing of given votes in the Triton kernel (same contract as :func:`matcaps.routing.em_routing`).

    Args:
        votes: ``(N, L, C, I, H)``.
        child_activations: ``(N, L, I)``.
        beta_v, beta_a: ``(C,)``.

    Returns:
        ``(N, L, C, H)`` pose means and ``(N, L, C)`` activations.
    """
    check_triton_device(votes.device)
    return _TritonEMRouting.apply(votes.contiguous(), child_activations.contiguous(), beta_v, beta_a, geometry, config)


def trace_route_capsules_triton(
    windows: Tensor,
    transforms: Tensor,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    vote_offsets: Tensor | None = None,
) -> list[RoutingTrace]:
    """Every iteration's routing weights, means, variances and activations, from the kernel.

    Same arguments as :func:`route_capsules_triton` and the layout of
    :func:`matcaps.routing.trace_em_routing`; not differentiable.  The kernel then also
    writes the ``(N, L, C, I)`` routing weights of each iteration (for tests and analysis).
    """
    check_triton_device(windows.device)
    offsets = None if vote_offsets is None else vote_offsets.detach().contiguous()
    with torch.no_grad():
        return _run_iterations(
            windows.contiguous(), transforms.contiguous(), offsets, child_activations.contiguous(),
            beta_v, beta_a, geometry, config, from_votes=False, keep_trace=True,
        )  # fmt: skip


def _run_iterations(
    source: Tensor,
    transforms: Tensor | None,
    offsets: Tensor | None,
    child_activations: Tensor,
    beta_v: Tensor,
    beta_a: Tensor,
    geometry: RoutingGeometry,
    config: EMRoutingConfig,
    from_votes: bool,
    keep_trace: bool = False,
    parent_block: int | None = None,
) -> list[RoutingTrace]:
    """Launch the kernel once per EM iteration, combining the per-slot partials in between.

    Args:
        source: ``(N, L, I, P, P)`` windows, or ``(N, L, C, I, H)`` votes if ``from_votes``.
        transforms: ``(I, C, P, P)`` (ignored if ``from_votes``).
        parent_block: Parent types per votes tile (a power of two); by default one on a
            GPU (more cost registers, which are the limit there), all of them under the
            interpreter (whose cost is per operation, not per element).

    Returns:
        The final iteration only, or every iteration if ``keep_trace`` (then with routing
        weights; otherwise ``routing`` is None).
    """
    kernel = _kernel_module().em_iteration_kernel
    dtype, device = source.dtype, source.device
    n, num_windows, children = child_activations.shape
    if from_votes:
        parent_types, entries = source.shape[2], source.shape[4]
        pose_size = 1  # unused: the votes are read, not computed
    else:
        parent_types, pose_size = transforms.shape[1], transforms.shape[-1]
        entries = pose_size * pose_size
    window_size = geometry.window_size
    child_types = children // window_size
    geometry = geometry.to(device)
    slot_child_index = geometry.slot_child_index.contiguous()
    prior = geometry.initial_assignment(child_types, parent_types, dtype).to(device).reshape(num_windows, children)
    prior = prior.contiguous()
    constants = _constants(config, children, parent_types, entries, dtype, device)
    beta_v = beta_v.detach().to(dtype).contiguous()
    beta_a = beta_a.detach().to(dtype).contiguous()
    child_activations = child_activations.detach()
    source = source.detach()
    transforms = source if transforms is None else transforms.detach()
    offsets_arg = source if offsets is None else offsets

    block_i = triton_next_power_of_2(children)
    block_h = triton_next_power_of_2(entries)
    block_c = parent_block or (triton_next_power_of_2(parent_types) if interpreter_active() else 1)
    warps = min(MAX_WARPS, max(1, block_i // THREADS_PER_WARP))

    slot_max = torch.empty(n, num_windows, children, dtype=dtype, device=device)
    slot_sum = torch.empty_like(slot_max)
    child_max = child_total = slot_max  # unused by the first launch
    previous: RoutingTrace | None = None
    trace: list[RoutingTrace] = []
    for iteration in range(config.iterations):
        first, last = iteration == 0, iteration == config.iterations - 1
        mean = torch.empty(n, num_windows, parent_types, entries, dtype=dtype, device=device)
        variance = torch.empty_like(mean)
        activations = torch.empty(n, num_windows, parent_types, dtype=dtype, device=device)
        routing = torch.empty(n, num_windows, parent_types, children, dtype=dtype, device=device) if keep_trace else None
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():  # launch on the tensors' GPU
            kernel[(n * num_windows,)](
                source, transforms, offsets_arg, child_activations, slot_child_index, prior, child_max, child_total,
                beta_v, beta_a, constants[iteration],
                mean if first else previous.mean, variance if first else previous.variance,
                activations if first else previous.activations,
                mean, variance, activations, slot_max, slot_sum, slot_max if routing is None else routing,
                num_windows, children, child_types, window_size, geometry.num_child_positions,
                PARENT_TYPES=parent_types, POSE=pose_size, ENTRIES=entries, BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_H=block_h, FIRST=first, LAST=last, FROM_VOTES=from_votes,
                HAS_OFFSETS=offsets is not None, STORE_ROUTING=keep_trace, num_warps=warps,
            )  # fmt: skip
        previous = RoutingTrace(routing, mean, variance, activations)
        if keep_trace:
            trace.append(previous)
        if not last:
            child_max, child_total = _combine_over_parents(slot_max, slot_sum, geometry)
    return trace if keep_trace else [previous]


def triton_next_power_of_2(value: int) -> int:
    """Smallest power of two ``≥ value`` (Triton's block shapes are powers of two)."""
    return 1 << max(0, value - 1).bit_length()


def _constants(
    config: EMRoutingConfig, children: int, parent_types: int, entries: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(T, NUM_CONSTANTS)``: per iteration ``ε``, variance floor, ``f_L``, ``λ_t``, ``H·ln 2π``,
    ``τ_{t−1}`` and ``τ_t`` (the likelihood scales of the E-steps before and after its M-step), each at
    the offset the kernel module names for it."""
    kernel = _kernel_module()

    def row(t: int) -> list[float]:
        values = {
            "EPSILON": config.epsilon,
            "VARIANCE_FLOOR": config.variance_floor,
            "COST_FACTOR": config.cost_factor(children, parent_types),
            "INVERSE_TEMPERATURE": config.inverse_temperature(t),
            "ENTRIES_LOG_2PI": entries * LOG_2PI,
            "LIKELIHOOD_SCALE_IN": config.likelihood_scale(t - 1) if t > 0 else 1.0,
            "LIKELIHOOD_SCALE_OUT": config.likelihood_scale(t),
        }
        return [values[name] for name in kernel.CONSTANT_NAMES]

    return torch.tensor([row(t) for t in range(config.iterations)], dtype=dtype).to(device)


def _combine_over_parents(slot_max: Tensor, slot_sum: Tensor, geometry: RoutingGeometry) -> tuple[Tensor, Tensor]:
    """Each child's maximum logit and total ``Σ exp(z − max)`` over every parent that reaches it.

    Args:
        slot_max, slot_sum: ``(N, L, I)`` per-slot partials over the parent types of a window.

    Returns:
        ``(N, P + 1, B)`` maximum (0 where no finite logit) and total per child position and type.
    """
    n, num_windows, children = slot_max.shape
    window_max = slot_max.view(n, num_windows, geometry.window_size, -1)
    child_max = geometry.scatter_max(window_max)
    child_max = torch.where(torch.isfinite(child_max), child_max, torch.zeros_like(child_max))
    rescaled = slot_sum.view_as(window_max) * torch.exp(window_max - geometry.gather_extended(child_max))
    return child_max.contiguous(), geometry.scatter_sum(rescaled).contiguous()


def _final_outputs(states: list[RoutingTrace]) -> tuple[Tensor, Tensor]:
    return states[-1].mean, states[-1].activations


class _TritonCapsuleRouting(torch.autograd.Function):
    """Votes plus EM routing in the kernel; backward by recomputing the fused implementation."""

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
        states = _run_iterations(
            windows, transforms, vote_offsets, child_activations, beta_v, beta_a, geometry, config, from_votes=False
        )
        ctx.save_for_backward(windows, transforms, vote_offsets, child_activations, beta_v, beta_a)
        ctx.geometry, ctx.config = geometry, config
        return _final_outputs(states)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        windows, transforms, vote_offsets, child_activations, beta_v, beta_a = ctx.saved_tensors
        inputs = {"windows": windows, "transforms": transforms, "child_activations": child_activations,
                  "beta_v": beta_v, "beta_a": beta_a}  # fmt: skip
        needs = dict(zip(["windows", "transforms", None, "child_activations", "beta_v", "beta_a"], ctx.needs_input_grad))
        grads = _recompute_gradients(
            lambda a: route_capsules_fused(
                a["windows"], a["transforms"], a["child_activations"], a["beta_v"], a["beta_a"],
                ctx.geometry, ctx.config, vote_offsets,
            ),
            inputs, needs, grad_mean, grad_activations,
        )  # fmt: skip
        return (grads["windows"], grads["transforms"], None, grads["child_activations"], grads["beta_v"],
                grads["beta_a"], None, None)  # fmt: skip


class _TritonEMRouting(torch.autograd.Function):
    """EM routing of given votes in the kernel; backward by recomputing the fused implementation."""

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
        states = _run_iterations(votes, None, None, child_activations, beta_v, beta_a, geometry, config, from_votes=True)
        ctx.save_for_backward(votes, child_activations, beta_v, beta_a)
        ctx.geometry, ctx.config = geometry, config
        return _final_outputs(states)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_mean: Tensor | None, grad_activations: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        votes, child_activations, beta_v, beta_a = ctx.saved_tensors
        inputs = {"votes": votes, "child_activations": child_activations, "beta_v": beta_v, "beta_a": beta_a}
        needs = dict(zip(["votes", "child_activations", "beta_v", "beta_a"], ctx.needs_input_grad))
        grads = _recompute_gradients(
            lambda a: em_routing_fused(
                a["votes"], a["child_activations"], a["beta_v"], a["beta_a"], ctx.geometry, ctx.config
            ),
            inputs, needs, grad_mean, grad_activations,
        )  # fmt: skip
        return grads["votes"], grads["child_activations"], grads["beta_v"], grads["beta_a"], None, None


def _recompute_gradients(
    function, inputs: dict[str, Tensor], needs: dict, grad_mean: Tensor | None, grad_activations: Tensor | None
) -> dict[str, Tensor | None]:
    """Gradients of ``function(inputs)`` (the fused routing) for the inputs that need one."""
    grads: dict[str, Tensor | None] = {name: None for name in inputs}
    wanted = [name for name in inputs if needs.get(name)]
    if not wanted:
        return grads
    with torch.enable_grad():
        leaves = {name: tensor.detach().requires_grad_(name in wanted) for name, tensor in inputs.items()}
        outputs = function(leaves)
    pairs = [(out, grad) for out, grad in zip(outputs, (grad_mean, grad_activations)) if grad is not None]
    computed = torch.autograd.grad(
        [out for out, _ in pairs], [leaves[name] for name in wanted], [grad for _, grad in pairs], allow_unused=True
    )
    for name, grad in zip(wanted, computed):
        grads[name] = torch.zeros_like(inputs[name]) if grad is None else grad
    return grads
