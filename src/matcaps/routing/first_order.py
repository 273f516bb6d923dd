"""Guards of the routing implementations whose backward pass is written by hand (first order only).

The ``fused`` and ``blocked`` routings compute their gradients by hand, without autograd: they
support first-order reverse-mode gradients only.  Double backward (``create_graph=True``),
``torch.func`` transforms and forward-mode AD raise
:class:`~matcaps.errors.UnsupportedOperationError` naming the implementation that supports them
(``naive``), instead of failing somewhere inside with a misleading message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from matcaps.errors import UnsupportedOperationError


def unsupported_message(implementation: str, what: str) -> str:
    """The one-line explanation for ``what`` (e.g. ``"double backward (create_graph=True)"``)."""
    return (
        f"the {implementation} EM routing has a hand-written backward pass that supports first-order "
        f"reverse-mode gradients only; {what} needs EMRoutingConfig(implementation=\"naive\")"
    )


def check_first_order(implementation: str, *tensors: Tensor | None) -> None:
    """Refuse ``torch.func`` transforms and forward-mode AD on ``tensors``."""
    if torch._C._are_functorch_transforms_active():
        raise UnsupportedOperationError(
            unsupported_message(implementation, "a torch.func transform (grad, vmap, jacrev, jvp, ...)")
        )
    if any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise UnsupportedOperationError(unsupported_message(implementation, "forward-mode AD (dual tensors)"))


class _RaiseOnBackward(torch.autograd.Function):
    """Identity whose backward raises: marks hand-written gradients as not differentiable."""

    @staticmethod
    def forward(ctx: FunctionCtx, implementation: str, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.implementation = implementation
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        raise UnsupportedOperationError(unsupported_message(ctx.implementation, "double backward (create_graph=True)"))


def first_order_only(implementation: str) -> Callable[[Callable[..., tuple[Tensor | None, ...]]], Callable[..., Any]]:
    """Decorate an autograd ``backward``: run it without autograd; under ``create_graph`` its
    results raise when differentiated.

    Like ``torch.autograd.function.once_differentiable``, but the results are marked whenever
    a graph of the backward pass is being built (the gradients depend on the inputs, not
    only on the incoming gradients), and the error names the implementation that supports
    double backward.
    """

    def decorate(backward: Callable[..., tuple[Tensor | None, ...]]) -> Callable[..., tuple[Tensor | None, ...]]:
        def wrapper(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
            with torch.no_grad():
                results = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # grad mode is on in a backward pass only under create_graph=True
                return results
            present = [i for i, r in enumerate(results) if r is not None]
            marked = _RaiseOnBackward.apply(
                implementation, *[results[i].detach().requires_grad_() for i in present]  # type: ignore[union-attr]
            )
            out: list[Tensor | None] = list(results)
            for i, tensor in zip(present, marked):
                out[i] = tensor
            return tuple(out)

        return wrapper

    return decorate
