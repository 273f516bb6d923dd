#!/usr/bin/env python3
"""Everything to measure on a GPU lent for a few minutes, in one unattended run.

A GPU machine may be available for minutes only, without network access, with PyTorch (CUDA),
Triton, tensorboard, tqdm and matplotlib installed.  This script spends that time measuring:

1. the environment (``nvidia-smi``, versions) and the data (MNIST and Fashion-MNIST prepared from
   the raw IDX files in ``--raw`` with ``matcaps data --no-download``), while the CUDA tests of
   :data:`CUDA_TESTS` run (the compiled Triton kernel against ``naive``; none this time);
2. ``matcaps bench --device cuda`` (:data:`BENCHES`; none this time), with the GPU to itself;
3. the trainings of :data:`TRAININGS` and the continued runs of :data:`CONTINUATIONS`, side by
   side until they end or the deadline (``--max-minutes``): further seeds and longer schedules of
   the best CPU recipes;
4. ``matcaps test`` (whole test set, best validation checkpoint; runs with flips also ``--mirrored``)
   and ``matcaps plot`` of every run;
5. the results packed into at most 8 files under OUT (the device tool's limit), each under 16 MiB:
   the runs with their checkpoints, the logs, the summary.

Every training stops by itself at the deadline with a checkpoint, so a run can be continued
elsewhere with ``matcaps train --resume``.  Nothing here stops on a failure: each step's output
goes to its own log, and what failed is listed in ``summary.json``.  Earlier sessions' plans (a
learning-speed sweep, determinism checks, benchmarks, Triton tests) are in the git history of this
file; their results are in ``docs/runs/h200-2026-11-26`` and ``docs/runs/h200-2026-11-26-b``.

Usage (on the GPU machine, from the repository root)::

    python3 scripts/gpu_check.py OUT --raw gpu-data --budget 555 --reserve 70   # device tool: carry gpu-data gpu-runs

The device tool sends the working tree and the carried paths, 64 MiB in all.  The published runs
(``docs/runs``, 57 MB) leave no room for the data, so send a tree without them, from a throw-away
branch, and come back after the call::

    for d in mnist fashion-mnist; do mkdir -p gpu-data/$d/raw && cp DATASETS/$d/*.gz gpu-data/$d/raw/; done
    mkdir -p gpu-runs && cp -r runs/gpu-2026-11-27/NAME gpu-runs/   # each run of CONTINUATIONS
    git checkout -b device-tmp && git rm -r -q docs/runs && git commit -qm "tmp: no docs/runs"
    # ... the device call ...
    git checkout main && git branch -D device-tmp

``--dry-run`` runs the same flow on CPU with tiny limits (to check the script itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: The device tool returns at most 8 files of at most 16 MiB each.
MAX_RESULT_FILES = 8
MAX_RESULT_BYTES = 15 * 1024 * 1024
DATASETS = ("mnist", "fashion-mnist")

#: pytest runs on the GPU (the compiled Triton kernel needs ``TRITON_INTERPRET=0``), with their time limits.
#: Empty for the third H200 loan (2026-11-27): the Triton kernel has not changed since the second
#: loan, where its 12 compiled comparisons against naive passed (docs/runs/h200-2026-11-26-b), so
#: the trainings get the time.  Add ``("tests-triton-compiled", ["tests/test_routing_triton.py"], 180.0)``
#: back after a change to ``routing/triton_kernel.py``.
CUDA_TESTS: list[tuple[str, list[str], float]] = []
#: ``matcaps bench`` runs: (name, flags, seconds allowed).  Every bench worker is a fresh process
#: that initialises CUDA (about 10 s); on the H200 a ``--batch-size max`` search takes ~25 s per
#: implementation and a timed step at the largest batch 0.7-2 s, so allow ~80 s per implementation.
#: Empty for the third loan: what docs/performance.md lacks (bf16 at the largest batch) matters less
#: than four minutes of training.  The last plan was ``("bench-smallnorb-max-bf16", ["--batch-size",
#: "max", "--routing-impl", "fused", "triton", "naive", "--precision", "bf16", "--warmup", "1",
#: "--steps", "3", "--no-verify"], 240.0)``.
BENCH_COMMON = ["--model", "smallnorb", "--iters", "2"]
BENCHES: list[tuple[str, list[str], float]] = []
#: The recipe of the best Fashion-MNIST CPU runs (docs/runs/cpu-2026-11-27), validated once per
#: epoch as there: the deeper feature extractor (``stem_convs``) batch-normalised (``conv_norm``),
#: at 3e-3, with flips, 24 epochs.  Later seeds validate on seed 0's hold-out, as every seed did.
STEM2_BN = ["--lr", "3e-3", "--model-option", "stem_convs=2", "--model-option", "conv_norm=true"]
FASHION_HFLIP = ["--dataset", "fashion-mnist", *STEM2_BN, "--hflip"]
FASHION_24 = ["--epochs", "24", "--lr-drop-steps", "13744", "18039"]  # ×0.1 after epochs 16 and 21
FASHION_32 = ["--epochs", "32", "--lr-drop-steps", "18039", "24052"]  # ×0.1 after epochs 21 and 28
SEED1 = ["--seed", "1", "--holdout-seed", "0"]
SEED2 = ["--seed", "2", "--holdout-seed", "0"]
#: The global gradient norm clipped at 0.5: 3 iterations' first MNIST epoch 94.16 % instead of 91.32 %
#: (2 iterations: 95.52 %, 95.70 % clipped; docs/runs/cpu-2026-11-28).
CLIP = ["--clip-grad-norm", "0.5"]
#: 3 iterations with both non-final E-steps softened (τ = 0.5, then 0.2) and β_a's rate ×1000, the
#: setting that, clipped, is at least as good as 2 iterations on MNIST and Fashion-MNIST over two seeds
#: each (docs/runs/cpu-2026-11-28).
I3_SOFTER_FAST_BETA_A = ["--iters", "3", "--model-option", "routing.e_step_scales=[0.5,0.2]", "--lr-scale", "beta_a=1000"]
#: The MNIST recipe of docs/runs/h200-2026-11-27/mnist-i2-stem2-bn-shift-36: shifts of up to ±2 px on a
#: 32×32 canvas, 36 epochs, ×0.1 after epochs 28 and 33.
MNIST_SHIFT_36 = ["--dataset", "mnist", *STEM2_BN, "--canvas", "32", "--epochs", "36", "--lr-drop-steps", "24052", "28347"]

#: Trainings run side by side: (name, flags), each from scratch, and the runs of
#: :data:`CONTINUATIONS`, continued.  None of them can finish in the minutes of a loan: each is cut by
#: the deadline with a checkpoint and finished on the CPU with ``matcaps train --resume``.
#: The third loan (2026-11-27, docs/runs/h200-2026-11-27) started seeds of the 24-epoch Fashion-MNIST
#: flip recipe (all finished on the CPU: over three seeds each, 3 iterations 0.11 point behind 2,
#: inside the seeds' spread), Fashion-MNIST for 32 epochs and MNIST for 36 (both finished on the CPU
#: on 2026-11-28; seed 0 tests 0.43 point above 24 epochs, and 99.57 % on MNIST).  3 iterations
#: clipped at 0.5 with both E-steps softened, and 2-iteration controls under the same clip, were then
#: trained whole on the CPU (docs/runs/cpu-2026-11-28): two seeds each on MNIST and Fashion-MNIST.
#: The next loan trains a third Fashion-MNIST seed of that pair, and second seeds of the 36-epoch
#: MNIST and 32-epoch Fashion-MNIST runs.
#: The data for both datasets (41 MB of raw files) fits the device tool's 64 MiB only beside a
#: working tree without the published runs (docs/runs, 57 MB): see the usage.
TRAININGS: list[tuple[str, list[str]]] = [
    ("fashion-i3-stem2-bn-hflip-24-tau0.5-0.2-ba1000-clip0.5-seed2", [*FASHION_HFLIP, *FASHION_24, *I3_SOFTER_FAST_BETA_A, *CLIP, *SEED2]),
    ("fashion-i2-stem2-bn-hflip-24-clip0.5-seed2", [*FASHION_HFLIP, *FASHION_24, *CLIP, *SEED2]),
    ("fashion-i2-stem2-bn-hflip-32-seed1", [*FASHION_HFLIP, *FASHION_32, *SEED1]),
    ("mnist-i2-stem2-bn-shift-36-seed1", [*MNIST_SHIFT_36, *SEED1]),
]
#: Runs started earlier and continued here with ``matcaps train --resume``: the names of run
#: directories (with their ``last.pt``) in ``--continue-from``, copied here before they resume.  A
#: name missing there is listed in ``summary.json`` and skipped.
#: Empty now: the last one, ``fashion-i3-stem2-bn-hflip-24-tau0.5-0.2-ba1000-clip0.5-seed1``, was
#: finished on the CPU.
CONTINUATIONS: list[str] = []


@dataclass
class Job:
    """A background command with its log file."""

    name: str
    command: list[str]
    log: Path
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.monotonic)

    def start(self, env: dict[str, str]) -> "Job":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log, "w", encoding="utf-8")
        handle.write("$ " + " ".join(self.command) + "\n")
        handle.flush()
        self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.started = time.monotonic()
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Clock:
    """Seconds since the script started, and what remains of the budget."""

    def __init__(self, budget: float) -> None:
        self.start = time.monotonic()
        self.budget = budget

    def now(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.now()


def log(out: Path, clock: Clock, message: str) -> None:
    line = f"[{clock.now():6.1f}s] {message}"
    print(line, flush=True)
    with open(out / "log.txt", "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def run(command: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> int | str:
    """Run to completion (or ``timeout``); returns the exit code or ``"timeout"``."""
    job = Job(log_path.stem, command, log_path).start(env)
    try:
        return job.process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        job.stop()
        return "timeout"


def matcaps(*arguments: str) -> list[str]:
    return [PYTHON, "-m", "matcaps", *arguments]


def pack(out: Path, runs_root: Path, clock: Clock) -> list[str]:
    """Tar the run directories into at most ``MAX_RESULT_FILES - 3`` files under the size limit.

    Each file holds a few runs (one each when there are few enough), with their checkpoints
    (``last.pt`` is what ``--resume`` continues); a file too large drops ``last.pt``, then ``best.pt``.
    The other three files are ``logs.tgz``, ``summary.json`` and ``log.txt``.
    """
    run_dirs = sorted(p for p in runs_root.iterdir() if p.is_dir())
    slots = max(MAX_RESULT_FILES - 3, 1)
    groups = [run_dirs[i::slots] for i in range(min(slots, len(run_dirs)))]
    made = []
    for index, group in enumerate(groups):
        name = f"runs-{group[0].name}.tgz" if len(group) == 1 else f"runs-{index}.tgz"
        target = out / name
        for keep in ({"best.pt", "last.pt"}, {"best.pt"}, set()):
            with tarfile.open(target, "w:gz") as tar:
                for run_dir in group:
                    for path in sorted(run_dir.rglob("*")):
                        if path.is_file() and (path.suffix != ".pt" or path.name in keep):
                            tar.add(path, arcname=str(path.relative_to(runs_root)))
            if target.stat().st_size <= MAX_RESULT_BYTES:
                break
        log(out, clock, f"packed {name} ({', '.join(sorted(keep)) or 'no checkpoints'}): "
                        f"{target.stat().st_size / 2**20:.1f} MiB")
        made.append(name)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the results (at most 8 files end up there)")
    parser.add_argument("--raw", type=Path, default=REPO / "gpu-data",
                        help="folder holding <dataset>/raw/*.gz for mnist and fashion-mnist")
    parser.add_argument("--budget", type=float, default=550.0, help="seconds for everything")
    parser.add_argument("--reserve", type=float, default=60.0, help="seconds kept for testing and packing")
    parser.add_argument("--min-training", type=float, default=150.0,
                        help="seconds of training the tests and benchmarks must leave (they are cut short otherwise)")
    parser.add_argument("--continue-from", type=Path, default=REPO / "gpu-runs",
                        help="folder holding the run directories of CONTINUATIONS (carry it)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/matcaps-gpu"), help="scratch folder")
    parser.add_argument("--dry-run", action="store_true", help="the same flow on CPU with tiny limits")
    args = parser.parse_args()

    clock = Clock(args.budget)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve()
    data_root, runs_root, logs = work / "data", work / "runs", out / "logs"
    shutil.rmtree(work, ignore_errors=True)
    runs_root.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    device = "cpu" if args.dry_run else "cuda"
    summary: dict = {"device": device, "failures": [], "phases": {}}

    def time_left_for(wanted: float) -> float:
        """``wanted`` seconds, or less so that the trainings keep their minimum."""
        return max(min(wanted, clock.left() - args.reserve - args.min_training), 1.0)

    # 1. Environment and data, while the CUDA tests run.
    run(["nvidia-smi"] if shutil.which("nvidia-smi") else ["true"], logs / "nvidia-smi.txt", 20, env)
    run([PYTHON, "-c", "import torch, platform; print(platform.python_version(), torch.__version__, torch.version.cuda, "
         "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"], logs / "versions.txt", 60, env)
    preparations = []
    for dataset in DATASETS:
        raw = args.raw / dataset / "raw"
        if not raw.is_dir():
            log(out, clock, f"no {raw}: {dataset} is not prepared")
            continue
        target = data_root / dataset / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(raw.glob("*")):
            shutil.copy(path, target / path.name)
        preparations.append(Job(f"data-{dataset}", matcaps("data", dataset, "--root", str(data_root), "--no-download"),
                                logs / f"data-{dataset}.txt").start(env))
    tests = CUDA_TESTS if not args.dry_run else [("tests-dry-run", ["tests/test_bench_fit.py"], 60.0)]
    test_env = {**env, "TRITON_INTERPRET": "0" if not args.dry_run else "1"}
    if importlib.util.find_spec("pytest") is None:  # the GPU machine may lack it: the script checks the kernel
        log(out, clock, "pytest is not installed: scripts/triton_check.py checks the compiled kernel instead")
        tests = [("triton-check-scaled", None, 90.0)]
    for name, arguments, seconds in tests:
        if arguments is None:
            command = [PYTHON, str(REPO / "scripts" / "triton_check.py"), "--repeats", "5", "--iterations", "3",
                       "--e-step-scales", "1", "0.2", *(["--device", "cpu", "--batch", "2"] if args.dry_run else [])]
        else:
            command = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments]
        code = run(command, logs / f"{name}.txt", time_left_for(seconds), test_env)
        summary["phases"][name] = code
        if code != 0:
            summary["failures"].append(name)
    for job in preparations:
        if job.process.wait() != 0:
            summary["failures"].append(job.name)
    log(out, clock, f"data prepared, tests run: {summary['phases']}; failures so far: {summary['failures']}")

    # 2. Benchmarks, with the GPU to themselves.
    benches = BENCHES
    if args.dry_run:  # a tiny network, a small batch, the CPU-capable implementations
        benches = [("bench-dry-run", ["--batch-size", "4", "--routing-impl", "fused", "naive", "--warmup", "0",
                                      "--steps", "1", "--set", "conv1_channels=8"], 60.0)]
    for name, flags, seconds in benches:
        code = run(matcaps("bench", *BENCH_COMMON, *flags, "--device", device, "--json", str(logs / f"{name}.json")),
                   logs / f"{name}.txt", time_left_for(seconds), env)
        summary["phases"][name] = code
        if code != 0:
            summary["failures"].append(name)
    log(out, clock, f"benchmarks done: {summary['phases']}")

    # 3. Trainings, side by side until they end or the deadline.
    deadline = args.budget - args.reserve
    common = ["--data-root", str(data_root), "--device", device, "--routing-impl", "fused", "--no-progress",
              "--workers", "1", "--log-every", "100", "--histogram-every", "100000", "--checkpoint-every", "500"]
    if args.dry_run:
        common += ["--val-size", "256", "--max-steps", "6", "--val-every-steps", "3"]
    jobs: dict[str, Job] = {}
    minutes = max((deadline - clock.now()) / 60.0, 0.1)
    for name, flags in TRAININGS:
        command = matcaps("train", "--run-dir", str(runs_root / name), *flags, *common, "--max-minutes", f"{minutes:.3f}")
        jobs[name] = Job(name, command, logs / f"train-{name}.txt").start(env)
    for name in CONTINUATIONS:
        source = args.continue_from / name
        if not (source / "last.pt").is_file():
            log(out, clock, f"no {source / 'last.pt'}: {name} is not continued")
            summary["failures"].append(f"{name}: nothing to continue in {source}")
            continue
        shutil.copytree(source, runs_root / name)
        command = matcaps("train", "--resume", str(runs_root / name), *common, "--max-minutes", f"{minutes:.3f}")
        jobs[name] = Job(name, command, logs / f"train-{name}.txt").start(env)
    log(out, clock, f"started {len(jobs)} trainings for {minutes:.2f} min")
    while any(job.running() for job in jobs.values()) and clock.left() > args.reserve - 25:
        time.sleep(2)
    for job in jobs.values():
        if job.running():
            job.stop()
            summary["failures"].append(f"{job.name}: still running at the deadline, stopped")
        elif job.process.returncode not in (0, -15):
            summary["failures"].append(f"{job.name}: exit code {job.process.returncode}")
    log(out, clock, "trainings finished")

    # 4. Test and plot every run (in parallel).
    finals = []
    for run_dir in sorted(p for p in runs_root.iterdir() if (p / "best.pt").exists()):
        finals.append(Job(f"test-{run_dir.name}", matcaps("test", str(run_dir), "--device", device, "--no-progress",
                                                          "--workers", "1"), logs / f"test-{run_dir.name}.txt").start(env))
        finals.append(Job(f"plot-{run_dir.name}", matcaps("plot", str(run_dir)), logs / f"plot-{run_dir.name}.txt").start(env))
        if "hflip" in run_dir.name:  # trained with flips: also scored with each test image's mirror image
            finals.append(Job(f"test-mirrored-{run_dir.name}", matcaps("test", str(run_dir), "--mirrored", "--device", device,
                                                                       "--no-progress", "--workers", "1"),
                              logs / f"test-mirrored-{run_dir.name}.txt").start(env))  # fmt: skip
    for job in finals:
        try:
            job.process.wait(timeout=max(clock.left() - 15, 5))
        except subprocess.TimeoutExpired:
            job.stop()
            summary["failures"].append(f"{job.name}: timeout")
    results = {}
    for run_dir in sorted(runs_root.iterdir()):
        report = run_dir / "test-standard-best.json"
        if report.exists():
            values = json.loads(report.read_text())
            results[run_dir.name] = {"test_accuracy": values["accuracy"], "step": values["step"]}
            mirrored = run_dir / "test-standard-best-mirrored.json"
            if mirrored.exists():
                results[run_dir.name]["mirrored_test_accuracy"] = json.loads(mirrored.read_text())["accuracy"]
    summary["results"] = results
    log(out, clock, f"tests done: {json.dumps(results)}")

    # 5. Pack.
    (logs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files = pack(out, runs_root, clock)
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.copy(logs / "summary.json", out / "summary.json")
    shutil.rmtree(logs)
    log(out, clock, f"done: {files + ['logs.tgz', 'summary.json', 'log.txt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
