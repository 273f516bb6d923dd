"""CPU training-step benchmark of our routing against yl-1993's PyTorch Matrix Capsules (side by side).

What it measures: the wall time of one full training step -- forward pass, spread loss (each
implementation's own loss function, margin 0.2), backward pass and an Adam update (lr 3e-3) --
on the same seeded random batch ``(N, 1, 32, 32)`` with labels in ``0..4``, for

* ours: the ``smallnorb`` preset (A=64, B=8, C=D=16, K=3, P=4, 32x32, 5 classes) with each
  routing implementation given by ``--impl`` (default ``blocked fused``);
* the peer: ``CapsNet(A=64, B=8, C=16, D=16, E=5, K=3, P=4, iters)`` and ``SpreadLoss(m_min=0.2)``
  at ``r=0`` from yl-1993/Matrix-Capsules-EM-PyTorch (the configuration of its ``train.py``
  for smallNORB), imported from a checkout patched to run on CPU (``--peer-dir``; the patch
  only replaces its ``torch.cuda.FloatTensor(...)`` constructors, see ``cpu.patch`` there).

Each contender runs in its own fresh Python process, one after the other, as ``matcaps
bench`` does (:mod:`matcaps.bench.runner`): the allocator regime (:func:`matcaps.allocator.apply_allocator`)
is applied first, before torch is imported; the warm-up steps are untimed; each timed step is
measured with ``time.perf_counter`` and the process CPU time (:func:`matcaps.bench.timing.time_steps`);
peak memory is the resident-set growth from just before the warm-up to just after the timed
steps (:class:`matcaps.bench.memory.PeakMemoryProbe`).  The parent records the machine
(:func:`matcaps.bench.machine.machine_info`, with the 1-minute load average before and after),
builds our compiled kernel once (:func:`matcaps.bench.kernels.prepare_kernels`), writes
everything to ``--json`` and prints a table with the speed-up of each of ours over the peer
(peer median ms / ours median ms).

Not compared: weight decay (the peer's ``train.py`` uses 2e-7; both use plain Adam here), the
peer's learning-rate decay and margin schedule (constant per step), data loading.

Run from the repository root, with nothing else using the CPU::

    source .venv/bin/activate
    python scripts/peer_bench.py --peer-dir /tmp/yl1993 --batch-size 32 --iters 2 \\
        --steps 5 --warmup 2 --threads 2 --allocator tuned --json peer-bench.json

A quick check that it works: ``--steps 1 --warmup 1 --threads 1``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from matcaps.allocator import ALLOCATOR_REGIMES, apply_allocator  # ctypes only: torch is not imported yet

#: JSON layout of the report.
REPORT_SCHEMA = "matcaps-peer-bench/1"
#: Name of the peer contender in the report.
PEER = "yl1993"
#: The peer's model and loss modules, relative to ``--peer-dir`` (first existing one is used).
PEER_MODEL_FILES: tuple[str, ...] = ("model/capsules.py", "model.py")
PEER_LOSS_FILES: tuple[str, ...] = ("loss/spread_loss.py", "loss.py")
#: What an unpatched peer checkout contains (it cannot run on a machine without CUDA).
CUDA_ONLY_CONSTRUCTOR = "torch.cuda.FloatTensor("
#: The peer network of its ``train.py`` for smallNORB (``A, B, C, D = 64, 8, 16, 16``, 5 classes).
PEER_ARCHITECTURE: dict[str, int] = {"A": 64, "B": 8, "C": 16, "D": 16, "E": 5, "K": 3, "P": 4}
#: Our preset (its defaults are the same network: 32x32 input, 5 classes).
OUR_PRESET = "smallnorb"
OUR_PREFIX = "ours-"
NUM_CLASSES = 5
IMAGE_SIZE = 32
LEARNING_RATE = 3e-3
MARGIN = 0.2
SEED = 0
DEFAULT_IMPLEMENTATIONS: tuple[str, ...] = ("blocked", "fused")


class PeerMissing(Exception):
    """The peer checkout is missing, incomplete or not patched for CPU."""


# ----------------------------------------------------------------------------- peer checkout


def peer_files(peer_dir: Path) -> tuple[Path, Path]:
    """The peer's model and loss source files; raises :class:`PeerMissing` with a one-line reason."""
    if not peer_dir.is_dir():
        raise PeerMissing(f"--peer-dir {peer_dir}: no such directory (check out yl-1993/Matrix-Capsules-EM-PyTorch there)")
    found: list[Path] = []
    for candidates in (PEER_MODEL_FILES, PEER_LOSS_FILES):
        path = next((peer_dir / name for name in candidates if (peer_dir / name).is_file()), None)
        if path is None:
            raise PeerMissing(f"--peer-dir {peer_dir}: none of {', '.join(candidates)} found (not a yl-1993 checkout?)")
        if CUDA_ONLY_CONSTRUCTOR in path.read_text(encoding="utf-8"):
            raise PeerMissing(f"--peer-dir {peer_dir}: {path.name} still uses {CUDA_ONLY_CONSTRUCTOR}...) (apply cpu.patch first)")
        found.append(path)
    return found[0], found[1]


def import_file(name: str, path: Path) -> ModuleType:
    """Import the Python file ``path`` as a module called ``name`` (without touching ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- worker (one contender)


def make_batch(batch_size: int, seed: int) -> tuple[Any, Any]:
    """Standard-normal images ``(N, 1, 32, 32)`` and labels in ``0..4``: the draws of ``matcaps bench``'s workload."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator)
    return images, labels


def build_ours(implementation: str, spec: dict[str, Any]) -> tuple[Any, Callable[[], float], dict[str, Any]]:
    """Our network, a training-step closure (returns the loss as a float) and the network's configuration."""
    import torch

    from matcaps.bench.workload import make_workload
    from matcaps.losses import spread_loss
    from matcaps.models import preset

    config = preset(OUR_PRESET, routing={"iterations": spec["iters"], "implementation": implementation})
    if (config.image_size, config.num_classes) != (IMAGE_SIZE, NUM_CLASSES):
        raise RuntimeError(f"preset {OUR_PRESET} is no longer {IMAGE_SIZE}x{IMAGE_SIZE} with {NUM_CLASSES} classes")
    workload = make_workload(config, spec["batch_size"], torch.device("cpu"), "fp32", spec["seed"])
    network, optimiser = workload.network, workload.optimiser  # Adam, lr 3e-3 (matcaps.bench.workload.LEARNING_RATE)
    if optimiser.param_groups[0]["lr"] != LEARNING_RATE:
        optimiser = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
    images, labels = make_batch(spec["batch_size"], spec["seed"])

    def step() -> float:
        network.train()
        optimiser.zero_grad(set_to_none=True)
        loss = spread_loss(network(images).activations, labels, MARGIN)
        loss.backward()
        optimiser.step()
        return loss.item()

    return network, step, config.to_dict()


def build_peer(spec: dict[str, Any]) -> tuple[Any, Callable[[], float], dict[str, Any]]:
    """The peer's network, a training-step closure (returns the loss as a float) and its architecture."""
    import torch

    model_file, loss_file = peer_files(Path(spec["peer_dir"]))
    capsules = import_file("yl1993_capsules", model_file)
    losses = import_file("yl1993_spread_loss", loss_file)
    torch.manual_seed(spec["seed"])
    model = capsules.CapsNet(**PEER_ARCHITECTURE, iters=spec["iters"])
    criterion = losses.SpreadLoss(m_min=MARGIN, m_max=0.9, num_class=NUM_CLASSES)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    images, labels = make_batch(spec["batch_size"], spec["seed"])

    def step() -> float:
        model.train()
        optimiser.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels, 0.0)  # r = 0: margin = m_min = 0.2
        loss.backward()
        optimiser.step()
        return loss.item()

    architecture = {**PEER_ARCHITECTURE, "iters": spec["iters"], "model_file": str(model_file), "loss_file": str(loss_file)}
    return model, step, architecture


def measure(spec: dict[str, Any], allocator: dict[str, Any]) -> dict[str, Any]:
    """Build one contender, run its warm-up and timed training steps in this process; returns its result."""
    import torch

    from matcaps.bench.kernels import routing_kernel_status
    from matcaps.bench.memory import PeakMemoryProbe
    from matcaps.bench.timing import TimingStats, time_steps
    from matcaps.models import count_parameters

    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    if spec["contender"] == PEER:
        network, step, architecture = build_peer(spec)
        kernel = None
    else:
        implementation = spec["contender"].removeprefix(OUR_PREFIX)
        network, step, architecture = build_ours(implementation, spec)
        kernel = routing_kernel_status(implementation, "cpu")
    probe = PeakMemoryProbe(device)
    probe.start()
    warmup_losses = [step() for _ in range(spec["warmup"])]
    timed = time_steps(step, spec["steps"], device)
    peak = probe.peak_bytes()
    stats = TimingStats.from_seconds(timed.wall, spec["batch_size"], timed.cpu)
    losses = [*warmup_losses, timed.first_value]
    return {
        "contender": spec["contender"],
        **{key: value for key, value in stats.__dict__.items() if key != "step_ms"},
        "step_ms": list(stats.step_ms),
        "cpu_ms": [1000.0 * seconds for seconds in timed.cpu],
        "peak_memory_bytes": peak,
        "memory_method": probe.method,
        "parameters": count_parameters(network),
        "first_loss": losses[0],
        "first_timed_loss": timed.first_value,
        "losses_finite": all(math.isfinite(value) for value in losses),
        "routing_kernel": kernel,
        "architecture": architecture,
        "allocator": allocator,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def worker_main(spec_json: str, result_path: str) -> int:
    """Entry of a worker process: allocator first, then torch; writes the result as JSON."""
    spec = json.loads(spec_json)
    allocator = apply_allocator(spec["allocator"])
    result = measure(spec, allocator)
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ----------------------------------------------------------------------------- parent


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one contender in a fresh Python process; returns its result (raises on failure)."""
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), str(result_path)]
        sys.stdout.flush()
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the worker measuring {spec['contender']} failed with exit code {completed.returncode} (its output is above)")
        return json.loads(result_path.read_text(encoding="utf-8"))


def speedups(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """For each of ours: the peer's median (wall, CPU) time per step over ours, and our peak memory over the peer's."""
    peer = results[PEER]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, result in results.items():
        if name == PEER:
            continue
        cpu = result["cpu_median_ms"]
        ratios[name] = {
            "train_speedup": peer["median_ms"] / result["median_ms"],
            "cpu_speedup": peer["cpu_median_ms"] / cpu if cpu and peer["cpu_median_ms"] else None,
            "memory_ratio": result["peak_memory_bytes"] / peer["peak_memory_bytes"] if peer["peak_memory_bytes"] else None,
        }
    return ratios


def format_table(report: dict[str, Any]) -> str:
    """A small text table of the report."""
    results, ratios, config, machine = report["results"], report["speedups"], report["config"], report["machine"]
    names = list(results)
    width = max(14, *(len(name) + 2 for name in names))
    before, after = machine["load_average"], machine["load_average_after"]
    allocator = next(iter(results.values()))["allocator"]
    lines = [
        f"training step (forward + spread loss + backward + Adam), batch {config['batch_size']}, {config['iters']} EM iterations, "
        f"{config['warmup']} warm-up + {config['steps']} timed steps",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {config['threads']} threads, torch {machine['torch_version']}, "
        f"allocator {allocator['name']}{'' if allocator['applied'] or allocator['name'] == 'default' else ' (not applied)'}",
    ]
    if before and after:
        lines.append(f"load average (1 min) before/after: {before[0]:.2f}/{after[0]:.2f} on {machine['cores']} cores")
    lines.append("")
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("median ms / step", lambda n: f"{results[n]['median_ms']:.1f}"),
        ("min - max ms", lambda n: f"{results[n]['min_ms']:.0f}-{results[n]['max_ms']:.0f}"),
        ("images / s", lambda n: f"{results[n]['images_per_s']:.1f}"),
        ("CPU ms / step", lambda n: f"{results[n]['cpu_median_ms']:.0f}"),
        ("peak RSS growth MiB", lambda n: f"{results[n]['peak_memory_bytes'] / 2**20:.0f}"),
        ("parameters", lambda n: f"{results[n]['parameters']:,}"),
        ("first loss", lambda n: f"{results[n]['first_loss']:.4f}"),
        ("speed-up vs peer (wall)", lambda n: f"{ratios[n]['train_speedup']:.2f}x" if n in ratios else "1.00x"),
        ("speed-up vs peer (CPU)", lambda n: f"{ratios[n]['cpu_speedup']:.2f}x" if n in ratios and ratios[n]["cpu_speedup"] else "-"),
    ]
    lines.append(f"{'':<26}" + "".join(f"{name:>{width}}" for name in names))
    lines.extend(f"{title:<26}" + "".join(f"{cell(name):>{width}}" for name in names) for title, cell in rows)
    kernels = [f"{n}: {r['routing_kernel']}" for n, r in results.items() if r.get("routing_kernel")]
    if kernels:
        lines.append("routing kernel: " + "; ".join(kernels))
    if not all(r["losses_finite"] for r in results.values()):
        lines.append("WARNING: a loss was not finite: " + ", ".join(n for n, r in results.items() if not r["losses_finite"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from matcaps.routing import MAX_ITERATIONS, ROUTING_IMPLEMENTATIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-dir", type=Path, required=True, help="yl-1993 checkout patched for CPU (e.g. /tmp/yl1993)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=2, choices=range(1, MAX_ITERATIONS + 1), help="EM iterations (both)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every worker")
    parser.add_argument("--allocator", choices=ALLOCATOR_REGIMES, default="tuned", help="C allocator regime of every worker")
    parser.add_argument("--impl", nargs="+", choices=ROUTING_IMPLEMENTATIONS, default=list(DEFAULT_IMPLEMENTATIONS),
                        help="our routing implementations to measure")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    for option in ("batch_size", "steps", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be a positive integer")
    if args.warmup < 0:
        parser.error("--warmup must be a non-negative integer")
    return args


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--worker"]:
        if len(argv) != 3:
            print("usage: peer_bench.py --worker SPEC_JSON RESULT_PATH", file=sys.stderr)
            return 2
        return worker_main(argv[1], argv[2])
    args = parse_args(argv)
    try:
        peer_files(args.peer_dir)
    except PeerMissing as error:
        print(f"peer_bench: {error}", file=sys.stderr)
        return 2

    from matcaps.bench.kernels import prepare_kernels
    from matcaps.bench.machine import load_average, machine_info
    from matcaps.fsutil import write_text_atomic

    implementations = tuple(dict.fromkeys(args.impl))
    machine = machine_info("cpu")  # holds the load average before the run
    kernels = prepare_kernels(implementations, "cpu")  # build/load the compiled kernel once, outside the workers
    contenders = [OUR_PREFIX + name for name in implementations] + [PEER]
    base = {
        "batch_size": args.batch_size, "iters": args.iters, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "allocator": args.allocator, "seed": SEED, "peer_dir": str(args.peer_dir.resolve()),
    }  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        print(f"peer_bench: measuring {contender} ...", flush=True)
        try:
            results[contender] = run_worker({**base, "contender": contender})
        except RuntimeError as error:
            print(f"peer_bench: {error}", file=sys.stderr)
            return 1
    machine["load_average_after"] = load_average()
    report = {
        "schema": REPORT_SCHEMA,
        "command": [sys.executable, *sys.argv],
        "config": {**base, "implementations": list(implementations), "margin": MARGIN, "learning_rate": LEARNING_RATE,
                   "optimiser": "Adam (no weight decay)"},
        "machine": machine,
        "kernels": kernels,
        "results": results,
        "speedups": speedups(results),
    }
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
