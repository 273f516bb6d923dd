"""Run a benchmark: check the options, verify the implementations agree, measure each in fresh processes.

Each phase (train, inference) of each implementation is measured by its own worker
process (:mod:`matcaps.bench.worker`), one after the other, so that peak memory is per
implementation and phase, and one measurement's allocator state (a grown heap, the fused
routing's scratch pool) cannot help or hurt the next.  The parent only collects the results and derives the ratios to ``naive``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from matcaps.bench.config import LARGEST_BATCH, BenchConfig
from matcaps.bench.kernels import prepare_kernels
from matcaps.bench.machine import load_average, machine_info
from matcaps.bench.measure import PHASES
from matcaps.bench.verify import compare_implementations
from matcaps.bench.worker import FIT_PHASE
from matcaps.errors import ConfigError, MatcapsError

#: Version of the JSON report's layout.
REPORT_SCHEMA = "matcaps-bench/1"
#: What a phase's result holds in the report (the rest of a worker's answer is per process).
PHASE_RESULT_KEYS: tuple[str, ...] = (
    "median_ms", "min_ms", "max_ms", "step_ms", "images_per_s", "cpu_median_ms", "peak_memory_bytes",
    "routing_share", "routed_ms", "routing_share_steps", "compile_s",
)  # fmt: skip
#: The implementation that ratios are relative to.
BASELINE_IMPLEMENTATION = "naive"
#: The implementation that the second set of ratios is relative to (the default before ``blocked``).
FUSED_IMPLEMENTATION = "fused"
#: First-step losses of the implementations must agree to this relative tolerance.
LOSS_RELATIVE_TOLERANCE = 1e-4


class BenchWorkerError(MatcapsError):
    """A worker process failed (its own output, printed above, says why)."""


def resolve_device(name: str) -> str:
    """The device to measure on: ``auto`` → ``cuda`` if a GPU is visible, else ``cpu``.

    Raises :class:`ConfigError` if a CUDA device is asked for and not available.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ConfigError(f"--device {name}: CUDA is not available (torch {torch.__version__} {build}, "
                              "or no GPU visible)")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: no such GPU ({torch.cuda.device_count()} visible)")
    return name


def run_bench(config: BenchConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Measure every implementation of ``config``; returns the report (layout: :mod:`matcaps.bench.report`).

    Args:
        config: The bench options (``device`` ``auto`` is resolved first; the report holds the device used).
        command: The command line, stored in the report.
    """
    config = dataclasses.replace(config, device=resolve_device(config.device))
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "command": command,
        "config": config.to_dict(),
        "model": {"name": config.model, "config": config.model_config().to_dict()},
        "machine": machine_info(config.device),
        "verification": None,
        "kernels": prepare_kernels(config.implementations, config.device),
    }
    if config.verify and len(config.implementations) > 1:
        differences = compare_implementations(
            config.model_config(), config.implementations, seed=config.seed, device=config.device
        )
        report["verification"] = {
            "reference": config.implementations[0],
            "max_relative_difference": {
                name: max(d.relative for d in diffs) for name, diffs in differences.items()
            },
        }
    results = {name: measure_implementation(config, name) for name in config.implementations}
    report["results"] = results
    report["model"]["parameters"] = next(iter(results.values()))["parameters"]
    report["machine"]["threads"] = next(iter(results.values()))["threads"]
    report["machine"]["load_average_after"] = load_average()
    report["ratios"] = ratios_to_baseline(results)
    report["ratios_vs_fused"] = ratios_to_baseline(results, FUSED_IMPLEMENTATION)
    report["losses_agree"] = losses_agree(results)
    return report


def measure_implementation(config: BenchConfig, implementation: str) -> dict[str, Any]:
    """Measure both phases of ``implementation``, each in a fresh worker process.

    With ``--batch-size max``, a first worker finds the largest training batch that fits
    (:func:`matcaps.bench.fit.find_largest_batch`) and both phases are timed at that batch.

    Returns:
        ``{"implementation", "batch_size", "batch_search", "allocator", "threads", "device_name",
        "torch_version", "parameters", "first_loss", "memory_method", "profile", "train",
        "inference"}``; ``batch_search`` is None or ``[[size, fitted], ...]`` (every size the
        search tried); ``profile`` is None or ``{"train": table, "inference": table, "trace": path}``.
    """
    search = None
    if config.batch_size == LARGEST_BATCH:
        search = run_worker(config, implementation, FIT_PHASE)
        if search["batch_size"] is None:
            raise BenchWorkerError(
                f"--batch-size {LARGEST_BATCH}: not even {search['tried'][0][0]} images per training step fit in the "
                f"memory of {config.device} with --routing-impl {implementation}"
            )
        config = dataclasses.replace(config, batch_size=search["batch_size"])
    phases = {phase: run_worker(config, implementation, phase) for phase in PHASES}
    train = phases["train"]
    result: dict[str, Any] = {
        "implementation": implementation,
        "batch_size": config.batch_size,
        "batch_search": None if search is None else search["tried"],
        **{
            key: train[key]
            for key in ("allocator", "threads", "device_name", "torch_version", "parameters", "memory_method", "routing_kernel")
        },
        "first_loss": train["first_value"],
        "profile": None,
    }
    if config.profile:
        result["profile"] = {**{phase: phases[phase]["profile"] for phase in PHASES}, "trace": train["trace"]}
    for phase, measured in phases.items():
        result[phase] = {key: measured[key] for key in PHASE_RESULT_KEYS}
    return result


def run_worker(config: BenchConfig, implementation: str, phase: str) -> dict[str, Any]:
    """Measure ``phase`` of ``implementation`` in a fresh Python process; returns its result dict."""
    with tempfile.TemporaryDirectory(prefix="matcaps-bench-") as folder:
        result_path = Path(folder) / "result.json"
        command = [
            sys.executable, "-m", "matcaps.bench.worker",
            json.dumps(config.to_dict()), implementation, phase, str(result_path),
        ]  # fmt: skip
        sys.stdout.flush()
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not result_path.exists():
            raise BenchWorkerError(
                f"the worker measuring the {phase} phase of --routing-impl {implementation} failed with exit code "
                f"{completed.returncode} (its output is above)"
            )
        return json.loads(result_path.read_text(encoding="utf-8"))


def ratios_to_baseline(
    results: dict[str, dict[str, Any]], baseline_name: str = BASELINE_IMPLEMENTATION
) -> dict[str, dict[str, float | None]] | None:
    """Speed-up (this one's images per second / the baseline's) and memory ratio of every implementation, per phase.

    The images per second are the median step times and each result's ``batch_size`` (which
    differ between implementations with ``--batch-size max``; a result without one counts as
    the same batch as the baseline).  None unless the baseline (``naive`` by default) and
    another implementation were both measured.
    """
    if baseline_name not in results or len(results) < 2:
        return None
    baseline = results[baseline_name]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, result in results.items():
        ratios[name] = {}
        for phase in ("train", "inference"):
            batch_ratio = result.get("batch_size", 1) / baseline.get("batch_size", 1)
            ratios[name][f"{phase}_speedup"] = batch_ratio * baseline[phase]["median_ms"] / result[phase]["median_ms"]
            memory = result[phase]["peak_memory_bytes"]
            ratios[name][f"{phase}_memory_ratio"] = (
                memory / baseline[phase]["peak_memory_bytes"] if baseline[phase]["peak_memory_bytes"] else None
            )
    return ratios


def losses_agree(results: dict[str, dict[str, Any]]) -> bool:
    """Whether every implementation's first training loss is the same (the same computation was timed)."""
    losses = [result["first_loss"] for result in results.values()]
    return all(math.isclose(loss, losses[0], rel_tol=LOSS_RELATIVE_TOLERANCE, abs_tol=1e-7) for loss in losses)
