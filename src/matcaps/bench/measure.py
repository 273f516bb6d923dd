"""Measure one phase (train or inference) of one routing implementation in the current process.

This is what each worker process runs (see :mod:`matcaps.bench.worker`): build the
workload, run the warm-up steps, the timed steps (reading the peak memory right after
them), a few hooked steps that give the routing share, and, with ``--profile``, one
profiled step.  The result is a plain JSON-serialisable dict.

Each phase gets its own process because a process's peak memory cannot be split between
phases (freed memory stays resident: the fused routing's scratch pool, a tuned
allocator's heap), and because tensors first created under ``torch.inference_mode()``
(the layers' cached routing geometry, the scratch pool) cannot be used by a later
training step in the same process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from matcaps.bench.config import BenchConfig
from matcaps.bench.kernels import routing_kernel_status
from matcaps.bench.memory import PeakMemoryProbe
from matcaps.bench.profiling import profile_step
from matcaps.bench.timing import ROUTING_SHARE_STEPS, TimingStats, routing_share, time_steps
from matcaps.bench.workload import make_workload
from matcaps.models import count_parameters

#: The two phases, in the order they are measured.
PHASES: tuple[str, ...] = ("train", "inference")


def measure_phase(config: BenchConfig, implementation: str, phase: str, allocator: dict[str, Any]) -> dict[str, Any]:
    """Time ``phase`` of ``config`` with ``implementation``.

    Args:
        config: The bench options.
        implementation: A name from ``ROUTING_IMPLEMENTATIONS``.
        phase: ``train`` or ``inference``.
        allocator: What :func:`matcaps.bench.allocator.apply_allocator` applied (recorded).

    Returns:
        The :class:`TimingStats` fields and ``peak_memory_bytes``, ``memory_method``,
        ``routing_share``, ``routed_ms``, ``routing_share_steps``, ``compile_s``,
        ``first_value`` (the first training loss; None for inference), ``profile`` (the
        profiler table or None), ``trace`` (its Chrome trace path or None) and the process
        facts ``allocator``, ``threads``, ``device_name``, ``torch_version``, ``parameters``,
        ``routing_kernel`` (see :func:`matcaps.bench.kernels.routing_kernel_status`).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    workload = make_workload(
        config.model_config(implementation), config.batch_size, device, config.dtype, config.seed, config.compile
    )
    step = workload.step(phase)
    probe = PeakMemoryProbe(device)
    probe.start()
    compile_s = None
    if config.compile:  # the first call compiles: keep it out of the warm-up and the timed steps
        start = time.perf_counter()
        first_value = step()
        compile_s = time.perf_counter() - start
    else:
        first_value = None
    for _ in range(config.warmup):
        value = step()
        first_value = value if first_value is None else first_value
    timed = time_steps(step, config.steps, device)
    first_value = timed.first_value if first_value is None else first_value
    stats = TimingStats.from_seconds(timed.wall, config.batch_size, timed.cpu)
    peak = probe.peak_bytes()  # before the hooked steps and the profiler, which add book-keeping
    share, routed_ms = (None, None) if config.compile else routing_share(step, workload.network, device)
    trace = trace_path_for(config, implementation) if config.profile and phase == "train" else None
    table = profile_step(step, workload.network, device, config.profile_rows, trace) if config.profile else None
    return {
        **stats.__dict__,
        "step_ms": list(stats.step_ms),
        "peak_memory_bytes": peak,
        "memory_method": probe.method,
        "routing_share": share,
        "routed_ms": routed_ms,
        "routing_share_steps": None if config.compile else ROUTING_SHARE_STEPS,
        "compile_s": compile_s,
        "first_value": first_value if phase == "train" else None,
        "profile": table,
        "trace": trace,
        "allocator": allocator,
        "threads": torch.get_num_threads(),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "parameters": count_parameters(workload.network),
        "routing_kernel": routing_kernel_status(implementation, device.type),
    }


def trace_path_for(config: BenchConfig, implementation: str) -> str | None:
    """Where the Chrome trace of ``implementation`` goes (``name-<impl>.json`` if several are measured)."""
    if config.trace_path is None:
        return None
    if len(config.implementations) == 1:
        return config.trace_path
    path = Path(config.trace_path)
    return str(path.with_name(f"{path.stem}-{implementation}{path.suffix or '.json'}"))


def device_name(device: torch.device) -> str:
    """A readable name of ``device``: the GPU's name on CUDA, ``cpu`` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
