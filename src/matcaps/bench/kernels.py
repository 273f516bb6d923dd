"""Compiled routing kernels: built (or loaded from the cache) in the parent before any timing.

The ``blocked`` routing compiles its C++ kernel on first use (about a minute; see
:mod:`matcaps.routing.cpu_kernel`).  The bench builds it once in the parent process, so
that the workers only load the cached library during their untimed warm-up, and records
whether the kernel was available: where it is not, the ``blocked`` column measured the
``fused`` routing, and the report says so.
"""

from __future__ import annotations

import time
from typing import Any

#: Implementations that run a compiled kernel on CPU (others need nothing prepared).
COMPILED_IMPLEMENTATIONS: tuple[str, ...] = ("blocked",)


def prepare_kernels(implementations: tuple[str, ...], device: str) -> dict[str, dict[str, Any]]:
    """Build or load the kernel of every compiled implementation in ``implementations``.

    Returns:
        ``{impl: {"available": bool, "seconds": float}}`` (the time to build or load it);
        empty when no compiled implementation is measured, or off the CPU.
    """
    if device != "cpu":
        return {}
    prepared: dict[str, dict[str, Any]] = {}
    for name in implementations:
        if name in COMPILED_IMPLEMENTATIONS:
            start = time.perf_counter()
            available = kernel_available()
            prepared[name] = {"available": available, "seconds": round(time.perf_counter() - start, 3)}
    return prepared


def kernel_available() -> bool:
    """Whether the blocked routing's kernel can be loaded in this process (builds it if needed)."""
    from matcaps.routing.cpu_kernel import load_kernel

    return load_kernel() is not None


def routing_kernel_status(implementation: str, device: str) -> str | None:
    """What a worker routed with: None for implementations without a kernel, else ``compiled`` or ``fused fallback``."""
    if implementation not in COMPILED_IMPLEMENTATIONS:
        return None
    if device != "cpu":
        return "fused fallback (not on CPU)"
    return "compiled" if kernel_available() else "fused fallback (no kernel)"
