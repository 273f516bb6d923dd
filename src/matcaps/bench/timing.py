"""Wall-clock timing of steps, and the share of a step spent in the routed capsule layers.

Step times are measured with ``time.perf_counter`` around each step, with the device
synchronised before and after (on CUDA), and summarised by :class:`TimingStats`.  The
process's CPU time (``time.process_time``, all threads) is recorded too: on a shared
machine it is much less sensitive than wall time to other processes competing for the
cores (it measures work, not waiting).

The routing share is measured by :class:`RoutedLayerTimer` with module and tensor hooks,
during a few *extra* steps run after the timed ones (so the timed steps carry no hook at
all; on CUDA each hook synchronises the device, which would perturb them):

* forward: a forward pre-hook and a forward hook on each routed layer (:class:`ConvCaps`,
  :class:`ClassCaps`) time the layer's forward pass;
* backward: the layer's backward starts when the last of its output gradients is complete
  and ends when the last of its input gradients is (gradient hooks on those tensors); the
  layers form a chain, so nothing else runs in between.

A routed layer's time is its whole ``forward``: gathering the windows, the votes and the
EM routing (plus their backward passes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matcaps.layers import RoutedCapsules

#: Extra steps (per phase) run with hooks to measure the routing share.
ROUTING_SHARE_STEPS = 2


@dataclass(frozen=True)
class TimingStats:
    """Summary of the step times of one phase.

    Attributes:
        step_ms: Every timed step, in milliseconds.
        median_ms, min_ms, max_ms: Their median, minimum and maximum.
        images_per_s: ``batch / median`` step time.
        cpu_median_ms: Median CPU time of the process per step (all threads), or None.
    """

    step_ms: tuple[float, ...]
    median_ms: float
    min_ms: float
    max_ms: float
    images_per_s: float
    cpu_median_ms: float | None = None

    @classmethod
    def from_seconds(
        cls, seconds: Iterable[float], batch_size: int, cpu_seconds: Iterable[float] | None = None
    ) -> "TimingStats":
        """Summarise step durations (and optionally CPU times) given in seconds."""
        ms = tuple(1000.0 * s for s in seconds)
        if not ms:
            raise ValueError("no step was timed")
        median = statistics.median(ms)
        cpu = None if cpu_seconds is None else 1000.0 * statistics.median(cpu_seconds)
        return cls(ms, median, min(ms), max(ms), 1000.0 * batch_size / median, cpu)


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepTimes:
    """Raw times of ``count`` calls of a step.

    Attributes:
        wall: Wall-clock duration of each call, in seconds.
        cpu: CPU time of the process (all threads) during each call, in seconds.
        first_value: What the first call returned.
    """

    wall: list[float]
    cpu: list[float]
    first_value: object


def time_steps(step: Callable[[], object], count: int, device: torch.device) -> StepTimes:
    """Run ``step`` ``count`` times and time each call."""
    wall, cpu, first = [], [], None
    for index in range(count):
        synchronise(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        value = step()
        synchronise(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if index == 0:
            first = value
    return StepTimes(wall, cpu, first)


class RoutedLayerTimer:
    """Times the forward and backward passes of every routed capsule layer of ``model`` with hooks.

    Use as a context manager around the steps to attribute; hooks are removed on exit.
    ``routed_seconds`` then holds the summed time of all routed layers, forward and
    backward, over those steps; ``forward_calls`` and ``backward_calls`` count the layer
    passes that were timed.

    Args:
        model: The network (its :class:`RoutedCapsules` sub-modules are hooked).
        device: Synchronised in every hook so that times are the device's.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, RoutedCapsules)]
        self.device = device
        self.routed_seconds = 0.0
        self.forward_calls = 0
        self.backward_calls = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[int, _LayerCall] = {}

    def __enter__(self) -> "RoutedLayerTimer":
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._before_forward))
            self._handles.append(layer.register_forward_hook(self._after_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _now(self) -> float:
        synchronise(self.device)
        return time.perf_counter()

    def _before_forward(self, layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        state = _LayerCall(forward_start=self._now())
        self._calls[id(layer)] = state
        if torch.is_grad_enabled():
            differentiable = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
            state.inputs_pending = len(differentiable)
            for tensor in differentiable:
                tensor.register_hook(lambda grad, state=state: self._input_gradient(state))

    def _after_forward(self, layer: nn.Module, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> None:
        state = self._calls.pop(id(layer))
        self.routed_seconds += self._now() - state.forward_start
        self.forward_calls += 1
        if torch.is_grad_enabled():
            for tensor in outputs:
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad, state=state: self._output_gradient(state))

    def _output_gradient(self, state: "_LayerCall") -> None:
        """An output gradient is complete: the layer's backward can start after the last one."""
        state.backward_start = self._now()

    def _input_gradient(self, state: "_LayerCall") -> None:
        """An input gradient is complete: after the last one, the layer's backward is over."""
        state.inputs_pending -= 1
        if state.inputs_pending == 0 and state.backward_start is not None:
            self.routed_seconds += self._now() - state.backward_start
            self.backward_calls += 1

    def reset(self) -> None:
        """Forget the time and calls accumulated so far."""
        self.routed_seconds = 0.0
        self.forward_calls = self.backward_calls = 0


@dataclass
class _LayerCall:
    """Book-keeping of one call of one routed layer."""

    forward_start: float
    backward_start: float | None = None
    inputs_pending: int = 0


def routing_share(
    step: Callable[[], object], model: nn.Module, device: torch.device, count: int = ROUTING_SHARE_STEPS
) -> tuple[float, float]:
    """Run ``step`` ``count`` extra times with :class:`RoutedLayerTimer` hooks.

    Returns:
        ``(share, routed_ms)``: the fraction of the step time spent in routed layers, and
        their time per step in milliseconds.
    """
    with RoutedLayerTimer(model, device) as timer:
        total = sum(time_steps(step, count, device).wall)
    share = timer.routed_seconds / total if total > 0 else 0.0
    return share, 1000.0 * timer.routed_seconds / count
