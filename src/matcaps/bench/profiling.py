"""Per-layer and per-operator breakdown of one step with ``torch.profiler``.

Each top-level layer of the network (``conv1``, ``primary_caps``, ``conv_caps1``, ...) is
wrapped in a ``record_function`` range named ``layer:<name>`` by forward hooks, so the
operator table shows the forward time of every layer next to the operators (the backward
operators keep their autograd names, e.g. ``_FusedRoute...Backward``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

#: Prefix of the profiler ranges that mark a layer's forward pass.
LAYER_RANGE_PREFIX = "layer:"


class _LayerRanges:
    """Context manager that opens a ``record_function`` range around each child's forward."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._open: list[record_function] = []

    def __enter__(self) -> "_LayerRanges":
        for name, child in self.network.named_children():
            self._handles.append(child.register_forward_pre_hook(self._opener(LAYER_RANGE_PREFIX + name)))
            self._handles.append(child.register_forward_hook(self._close))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        while self._open:
            self._open.pop().__exit__(None, None, None)

    def _opener(self, name: str) -> Callable[..., None]:
        def open_range(module: nn.Module, inputs: object) -> None:
            scope = record_function(name)
            scope.__enter__()
            self._open.append(scope)

        return open_range

    def _close(self, module: nn.Module, inputs: object, outputs: object) -> None:
        self._open.pop().__exit__(None, None, None)


def profile_step(
    step: Callable[[], object],
    network: nn.Module,
    device: torch.device,
    rows: int,
    trace_path: str | Path | None = None,
) -> str:
    """Profile one call of ``step``; return the operator table sorted by self CPU time.

    Args:
        step: The step to profile (already warmed up).
        network: The module whose children get ``layer:<name>`` ranges.
        device: Adds CUDA activity when it is a CUDA device.
        rows: Rows of the table.
        trace_path: Write a Chrome trace (``chrome://tracing``, Perfetto) there, or None.

    Returns:
        The table followed by a per-layer forward summary.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        with _LayerRanges(network):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace_path))
    averages = profiler.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    layers = [event for event in averages if event.key.startswith(LAYER_RANGE_PREFIX)]
    summary = ["", "forward time per layer (CPU total, ms):"]
    summary += [f"  {event.key[len(LAYER_RANGE_PREFIX):]:<16} {event.cpu_time_total / 1000:10.2f}" for event in layers]
    return table + "\n".join(summary) + "\n"
