"""The benchmark report: its JSON layout, a readable side-by-side table, and the JSON file.

JSON layout (``schema`` ``matcaps-bench/1``)::

    schema, command, config (the bench options), model {name, parameters, config},
    machine {cpu_model, cores, logical_cpus, platform, python_version, torch_version,
             glibc, default_threads, threads, device, device_name, load_average,
             load_average_after},
    verification {reference, max_relative_difference {impl: float}} or null,
    kernels {impl: {available, seconds}} (compiled kernels built before timing; may be empty),
    results {impl: {implementation, batch_size (the batch timed), batch_search (null, or the
                    [size, fitted] probes of --batch-size max),
                    allocator {name, applied, settings, glibc, note},
                    threads, device_name, torch_version, parameters, first_loss,
                    memory_method, profile, routing_kernel (null, compiled or fused fallback),
                    train | inference: {median_ms, min_ms, max_ms, step_ms, images_per_s,
                                        cpu_median_ms, peak_memory_bytes, routing_share, routed_ms,
                                        routing_share_steps, compile_s}}},
    ratios {impl: {train_speedup, inference_speedup, train_memory_ratio,
                   inference_memory_ratio}} or null (needs naive and another),
    ratios_vs_fused: the same relative to fused, or null (needs fused and another),
    losses_agree

``routing_share`` is the fraction of the step time spent in the routed capsule layers
(votes and EM routing, forward and backward), measured with hooks on extra steps (see
:mod:`matcaps.bench.timing`); null with ``--compile``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matcaps.bench.config import LARGEST_BATCH
from matcaps.bench.runner import PHASE_RESULT_KEYS
from matcaps.errors import ConfigError

#: Keys every report has at the top level.
REPORT_KEYS: tuple[str, ...] = (
    "schema", "command", "config", "model", "machine", "verification", "kernels", "results", "ratios",
    "ratios_vs_fused", "losses_agree",
)  # fmt: skip
#: Keys of each implementation's result.
RESULT_KEYS: tuple[str, ...] = (
    "implementation", "batch_size", "batch_search", "allocator", "threads", "device_name", "torch_version", "parameters",
    "first_loss", "memory_method", "profile", "routing_kernel", "train", "inference",
)  # fmt: skip
#: Keys of each phase (train, inference) of a result.
PHASE_KEYS: tuple[str, ...] = PHASE_RESULT_KEYS
#: Keys of the machine description.
MACHINE_KEYS: tuple[str, ...] = (
    "cpu_model", "cores", "torch_version", "threads", "device", "device_name",
)  # fmt: skip
_MIB = 1024 * 1024
_PHASE_TITLES = {"train": "train step (fwd + loss + bwd + Adam)", "inference": "inference (fwd, inference_mode)"}


def format_report(report: dict[str, Any]) -> str:
    """A readable summary: the setting, the machine, and one column per implementation."""
    config, machine, results = report["config"], report["machine"], report["results"]
    names = list(results)
    first = results[names[0]]
    allocator = ", ".join(
        f"{name}: {r['allocator']['name']}{'' if r['allocator']['applied'] or r['allocator']['name'] == 'default' else ' (not applied)'}"
        for name, r in results.items()
    )
    lines = [
        f"model {report['model']['name']} ({report['model']['parameters']:,} parameters), {_batch(config, results)}, "
        f"{config['iterations']} routing iteration{'s' if config['iterations'] > 1 else ''}, "
        f"{config['device']} {config['dtype']}{', torch.compile' if config['compile'] else ''}",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {first['threads']} threads, "
        f"device {first['device_name']}, torch {machine['torch_version']}",
        f"allocator: {allocator}; {config['warmup']} warm-up + {config['steps']} timed steps per phase",
    ]
    if machine.get("load_average") and machine.get("load_average_after"):
        before, after = machine["load_average"][0], machine["load_average_after"][0]
        busy = " (before the run above the core count: other processes shared the CPU)" if before > machine["cores"] else ""
        lines.append(f"load average (1 min) before/after: {before:.2f}/{after:.2f} on {machine['cores']} cores{busy}")
    lines.append("")
    width = max(12, *(len(n) + 2 for n in names))
    header = f"{'':<34}" + "".join(f"{name:>{width}}" for name in names)
    lines.append(header)
    ratios = report.get("ratios")
    for phase in ("train", "inference"):
        lines.append(_PHASE_TITLES[phase])
        rows = [
            ("  batch (images / step)", lambda r: str(r.get("batch_size", config["batch_size"]))),
            ("  median ms / step", lambda r: f"{r[phase]['median_ms']:.1f}"),
            ("  min - max ms", lambda r: f"{r[phase]['min_ms']:.0f}-{r[phase]['max_ms']:.0f}"),
            ("  images / s (median)", lambda r: f"{r[phase]['images_per_s']:.1f}"),
            ("  CPU ms / step (all threads)", lambda r: _number(r[phase].get("cpu_median_ms"))),
            ("  peak memory MiB", lambda r: f"{r[phase]['peak_memory_bytes'] / _MIB:.0f}"),
            ("  routed layers share", lambda r: _percent(r[phase]["routing_share"])),
        ]
        if config["compile"]:
            rows.append(("  compile s (first call)", lambda r: f"{r[phase]['compile_s']:.1f}"))
        for title, cell in rows:
            lines.append(f"{title:<34}" + "".join(f"{cell(results[n]):>{width}}" for n in names))
        if ratios:
            lines.append(
                f"{'  speed-up vs naive':<34}" + "".join(f"{ratios[n][phase + '_speedup']:>{width - 1}.2f}x" for n in names)
            )
            lines.append(
                f"{'  memory vs naive':<34}"
                + "".join(f"{_ratio(ratios[n][phase + '_memory_ratio']):>{width}}" for n in names)
            )
        to_fused = report.get("ratios_vs_fused")
        if to_fused:
            lines.append(
                f"{'  speed-up vs fused':<34}" + "".join(f"{to_fused[n][phase + '_speedup']:>{width - 1}.2f}x" for n in names)
            )
            lines.append(
                f"{'  memory vs fused':<34}"
                + "".join(f"{_ratio(to_fused[n][phase + '_memory_ratio']):>{width}}" for n in names)
            )
    if report.get("verification"):
        worst = max(report["verification"]["max_relative_difference"].values())
        lines.append("")
        lines.append(
            f"verified: outputs and gradients of {', '.join(names)} agree (max relative difference {worst:.1e})"
        )
    for name, result in results.items():
        if result.get("routing_kernel") not in (None, "compiled"):
            lines.append(f"WARNING: --impl {name} had no compiled kernel: its column measured the {result['routing_kernel']}")
    if not report["losses_agree"]:
        lines.append("WARNING: the first training losses differ between implementations: "
                     + ", ".join(f"{n}={results[n]['first_loss']:.6g}" for n in names))  # fmt: skip
    return "\n".join(lines)


def format_profiles(report: dict[str, Any]) -> str:
    """The profiler tables of every implementation (empty without ``--profile``)."""
    parts = []
    for name, result in report["results"].items():
        profile = result.get("profile")
        if not profile:
            continue
        for phase in ("train", "inference"):
            parts.append(f"== profile: {name}, one {phase} step ==\n{profile[phase]}")
        if profile.get("trace"):
            parts.append(f"chrome trace of the {name} train step: {profile['trace']}")
    return "\n".join(parts)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON (creating the folder)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--json {path}: cannot write the report: {error.strerror or error}") from None


def _batch(config: dict[str, Any], results: dict[str, Any]) -> str:
    """The batch of the title line: the number, or how ``--batch-size max`` resolved per implementation."""
    if config["batch_size"] != LARGEST_BATCH:
        return f"batch {config['batch_size']}"
    found = ", ".join(f"{name} {result.get('batch_size')}" for name, result in results.items())
    return f"batch: the largest training batch that fits ({found})"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
