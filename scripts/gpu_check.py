#!/usr/bin/env python3
"""Everything to measure on a GPU lent for a few minutes, in one unattended run.

A GPU machine may be available for minutes only, without network access, with PyTorch (CUDA),
Triton, tensorboard, tqdm and matplotlib installed.  This script spends that time measuring:

1. the environment (``nvidia-smi``, versions) and the data (MNIST and Fashion-MNIST prepared from
   the raw IDX files in ``--raw`` with ``matcaps data --no-download``);
2. ``matcaps bench --device cuda`` for the routing implementations (and ``scripts/triton_check.py``
   when it exists);
3. a learning-speed sweep: several settings of the capsule network trained side by side on MNIST
   (2 routing iterations) with frequent validation; after ``--sweep-seconds`` the setting with the
   best validation accuracy (at the last step every sweep run reached) is the winner, the other
   sweep runs stop (the IBM setting and the winner continue), and the winner's setting trains the
   other routing-iteration counts and Fashion-MNIST until the deadline; the CNN baseline trains on
   both datasets from the start;
4. ``matcaps test`` (whole test set, best validation checkpoint) and ``matcaps plot`` of every run;
5. the results packed into at most 8 files under OUT (the device tool's limit), each under 16 MiB.

Every training stops by itself at the deadline (``--max-minutes``) with a checkpoint, so the runs
can be continued elsewhere with ``matcaps train --resume``.  Nothing here stops on a failure: each
step's output goes to its own log, and what failed is listed in ``summary.json``.

Usage (on the GPU machine, from the repository root)::

    python3 scripts/gpu_check.py OUT --raw gpu-data --budget 570

``--dry-run`` runs the same flow on CPU with tiny time limits (to check the script itself).
"""

from __future__ import annotations

import argparse
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

#: Settings of the learning-speed sweep (MNIST, 2 iterations), as `matcaps train` flags.  "ibm" is
#: the IBM recipe (the project's defaults until the sweep says otherwise).
SWEEP: dict[str, list[str]] = {
    "ibm": [],
    "lr1e-2": ["--lr", "1e-2"],
    "lr1e-3": ["--lr", "1e-3"],
    "wstd0.3": ["--model-option", "transform_init_std=0.3"],
    "lam0.1-ba100": ["--model-option", "routing.final_inverse_temperature=0.1",
                     "--model-option", "beta_a_init_mean=-100", "--model-option", "beta_a_init_std=50"],
    "lam0.03-ba333": ["--model-option", "routing.final_inverse_temperature=0.03",
                      "--model-option", "beta_a_init_mean=-333", "--model-option", "beta_a_init_std=167"],
    "margin-fast": ["--margin-steps", "2000"],
    "floor1e-4": ["--model-option", "routing.variance_floor=1e-4"],
}
#: Runs started with the winner's setting once the sweep is decided: (name, flags).
WINNER_RUNS: list[tuple[str, list[str]]] = [
    ("mnist-i1", ["--dataset", "mnist", "--iters", "1"]),
    ("mnist-i3", ["--dataset", "mnist", "--iters", "3"]),
    ("fashion-i2", ["--dataset", "fashion-mnist", "--iters", "2"]),
    ("fashion-i3", ["--dataset", "fashion-mnist", "--iters", "3"]),
]
#: Runs that train from the start to the deadline whatever the sweep finds.
BASELINE_RUNS: list[tuple[str, list[str]]] = [
    ("mnist-cnn", ["--dataset", "mnist", "--model", "cnn-baseline", "--lr", "1e-3"]),
    ("fashion-cnn", ["--dataset", "fashion-mnist", "--model", "cnn-baseline", "--lr", "1e-3"]),
]
DATASETS = ("mnist", "fashion-mnist")
#: Pairs of short identical trainings: with --deterministic their weights must be bit-identical.
DETERMINISM_RUNS: list[tuple[str, list[str]]] = [
    ("det-a", ["--deterministic"]), ("det-b", ["--deterministic"]), ("nondet-a", []), ("nondet-b", []),
]
DETERMINISM_STEPS = 30
#: Longest wait for those runs once the sweep is decided (they take seconds on a GPU).
DETERMINISM_WAIT_SECONDS = 30


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


def validation_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("phase") == "val" and record.get("accuracy") is not None:
            records.append(record)
    return records


def choose_winner(runs_root: Path, names: list[str]) -> tuple[str, dict]:
    """The sweep setting with the best validation accuracy at the last step every run reached."""
    curves = {name: {r["step"]: r["accuracy"] for r in validation_records(runs_root / name)} for name in names}
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        return "sweep-ibm", {"reason": "no sweep run validated; keeping the IBM setting", "curves": {}}
    common = set.intersection(*(set(curve) for curve in curves.values()))
    step = max(common) if common else None
    if step is None:  # compare each run's latest validation
        scores = {name: curve[max(curve)] for name, curve in curves.items()}
    else:
        scores = {name: curve[step] for name, curve in curves.items()}
    winner = max(scores, key=lambda name: (scores[name], name == "ibm"))
    return winner, {"step": step, "scores": scores, "curves": {n: sorted(c.items()) for n, c in curves.items()}}


def compare_weights(root: Path, jobs: list[Job]) -> dict:
    """Whether pairs of runs ended bit-identical: two deterministic runs, two default runs, and a
    deterministic run against one stopped half-way and resumed (resumption on the GPU)."""
    deadline = time.monotonic() + DETERMINISM_WAIT_SECONDS
    for job in jobs:
        try:
            job.process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            job.stop()
    import torch

    result = {}
    pairs = {"det": ("det-a", "det-b"), "nondet": ("nondet-a", "nondet-b"), "resumed": ("det-a", "det-resumed")}
    for pair, names in pairs.items():
        try:
            first, second = (torch.load(root / name / "last.pt", map_location="cpu", weights_only=True)["model"]
                             for name in names)
            differing = [name for name in first if not torch.equal(first[name], second[name])]
            result[pair] = {"identical": not differing, "differing_tensors": differing}
        except Exception as error:  # noqa: BLE001 - reported, never fatal
            result[pair] = {"error": f"{type(error).__name__}: {error}"}
    return result


def pack(out: Path, runs_root: Path, clock: Clock) -> list[str]:
    """Tar the run directories into a few files under the device tool's size limit."""
    made = []
    groups: dict[str, list[Path]] = {"runs-cnn": [], "runs-capsules": []}
    for run_dir in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        groups["runs-cnn" if run_dir.name.endswith("cnn") else "runs-capsules"].append(run_dir)

    def add(tar: tarfile.TarFile, run_dir: Path, keep_checkpoints: set[str]) -> None:
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and (path.suffix != ".pt" or path.name in keep_checkpoints):
                tar.add(path, arcname=str(path.relative_to(runs_root)))

    plans = {"runs-cnn": [set()], "runs-capsules": [{"best.pt", "last.pt"}, {"best.pt"}, set()]}
    for group, run_dirs in groups.items():
        if not run_dirs:
            continue
        for keep in plans[group]:
            target = out / f"{group}.tgz"
            with tarfile.open(target, "w:gz") as tar:
                for run_dir in run_dirs:
                    add(tar, run_dir, keep)
            if target.stat().st_size <= MAX_RESULT_BYTES:
                break
        log(out, clock, f"packed {target.name}: {target.stat().st_size / 2**20:.1f} MiB")
        made.append(target.name)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the results (at most 8 files end up there)")
    parser.add_argument("--raw", type=Path, default=REPO / "gpu-data",
                        help="folder holding <dataset>/raw/*.gz for mnist and fashion-mnist")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for everything")
    parser.add_argument("--sweep-seconds", type=float, default=150.0, help="seconds before the sweep is decided")
    parser.add_argument("--reserve", type=float, default=60.0, help="seconds kept for testing and packing")
    parser.add_argument("--min-training", type=float, default=380.0,
                        help="seconds of training the benchmarks must leave (they are cut short otherwise)")
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

    # 1. Environment and data.
    run(["nvidia-smi"] if shutil.which("nvidia-smi") else ["true"], logs / "nvidia-smi.txt", 20, env)
    run([PYTHON, "-c", "import torch, platform; print(platform.python_version(), torch.__version__, torch.version.cuda, "
         "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"], logs / "versions.txt", 60, env)
    preparations = []
    for dataset in DATASETS:
        raw = args.raw / dataset / "raw"
        target = data_root / dataset / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(raw.glob("*")):
            shutil.copy(path, target / path.name)
        preparations.append(Job(f"data-{dataset}", matcaps("data", dataset, "--root", str(data_root), "--no-download"),
                                logs / f"data-{dataset}.txt").start(env))
    for job in preparations:
        if job.process.wait() != 0:
            summary["failures"].append(job.name)
    log(out, clock, f"data prepared ({', '.join(DATASETS)}); failures so far: {summary['failures']}")

    # 2. Benchmarks (before the trainings, so they have the GPU to themselves).
    bench_common = ["--device", device, "--warmup", "2", "--steps", "3" if args.dry_run else "8"]
    benches = [
        ("bench-smallnorb-b64-fp32", ["--model", "smallnorb", "--batch-size", "64", "--iters", "2",
                                      "--routing-impl", "fused", "naive"]),
        ("bench-smallnorb-b64-bf16", ["--model", "smallnorb", "--batch-size", "64", "--iters", "2",
                                      "--routing-impl", "fused", "--precision", "bf16"]),
    ]
    if args.dry_run:
        benches = [(name, [*flags, "--set", "conv1_channels=8", "--batch-size", "4"]) for name, flags in benches[:1]]
        benches = [(name, [a if a != "bf16" else "fp32" for a in flags]) for name, flags in benches]
    for index, (name, flags) in enumerate(benches):
        checks = [] if index == 0 else ["--no-verify"]  # the implementations are compared once, in float64
        code = run(matcaps("bench", *flags, *bench_common, *checks, "--json", str(logs / f"{name}.json")),
                   logs / f"{name}.txt", min((45, 25)[index] if not args.dry_run else 60,
                                                        clock.left() - args.reserve - args.min_training), env)
        summary["phases"][name] = code
        if code != 0:
            summary["failures"].append(name)
    triton_check = REPO / "scripts" / "triton_check.py"
    if triton_check.exists() and not args.dry_run:
        summary["phases"]["triton_check"] = run([PYTHON, str(triton_check)], logs / "triton-check.txt",
                                                min(40, clock.left() - args.reserve - args.min_training), env)
    log(out, clock, f"benchmarks done: {summary['phases']}")

    # 3. Trainings: sweep + baselines now, the winner's runs after the sweep, all until the deadline.
    deadline = args.budget - args.reserve
    common = ["--data-root", str(data_root), "--device", device, "--no-progress", "--workers", "1",
              "--log-every", "100", "--histogram-every", "2000", "--checkpoint-every", "1000", "--epochs", "200",
              "--val-every-steps", "150" if not args.dry_run else "4"]
    if args.dry_run:
        common += ["--val-size", "256", "--model-option", "conv1_channels=8"]

    def train(name: str, flags: list[str]) -> Job:
        minutes = max((deadline - clock.now()) / 60.0, 0.1)
        command = matcaps("train", "--run-dir", str(runs_root / name), *common, *flags, "--max-minutes", f"{minutes:.3f}")
        return Job(name, command, logs / f"train-{name}.txt").start(env)

    sweep, winner_runs, baseline_runs = SWEEP, WINNER_RUNS, BASELINE_RUNS
    if args.dry_run:  # the same flow with fewer processes
        sweep = {name: SWEEP[name] for name in list(SWEEP)[:2]}
        winner_runs, baseline_runs = WINNER_RUNS[2:3], BASELINE_RUNS[:1]
    jobs: dict[str, Job] = {}
    for name, flags in baseline_runs:
        jobs[name] = train(name, flags)
    sweep_names = [f"sweep-{name}" for name in sweep]
    for name, flags in sweep.items():
        jobs[f"sweep-{name}"] = train(f"sweep-{name}", ["--dataset", "mnist", "--iters", "2", *flags])
    determinism_root = work / "determinism"
    steps = DETERMINISM_STEPS if not args.dry_run else 4

    def short_run(name: str, max_steps: int, *flags: str) -> list[str]:
        return matcaps("train", "--run-dir", str(determinism_root / name), "--data-root", str(data_root), "--device",
                       device, "--no-progress", "--workers", "0", "--dataset", "mnist", "--no-validation",
                       "--checkpoint-every", "0", "--max-steps", str(max_steps), *flags)

    determinism_jobs = [Job(name, short_run(name, steps, *flags), logs / f"determinism-{name}.txt").start(env)
                        for name, flags in DETERMINISM_RUNS]
    # Resume on CUDA: half the steps, then --resume to the end; must equal det-a bit for bit.
    resume_first = " ".join(short_run("det-resumed", steps // 2, "--deterministic"))
    resume_rest = " ".join(matcaps("train", "--resume", str(determinism_root / "det-resumed"), "--max-steps", str(steps),
                                   "--no-progress"))
    determinism_jobs.append(Job("det-resumed", ["sh", "-c", f"{resume_first} && {resume_rest}"],
                                logs / "determinism-det-resumed.txt").start(env))
    log(out, clock, f"started {len(jobs)} trainings")
    sweep_end = clock.now() + args.sweep_seconds
    while clock.now() < sweep_end and any(jobs[n].running() for n in sweep_names):
        time.sleep(2)
    summary["determinism"] = compare_weights(determinism_root, determinism_jobs)
    log(out, clock, f"determinism: {summary['determinism']}")
    winner, decision = choose_winner(runs_root, sweep_names)
    winner_setting = winner.removeprefix("sweep-")
    summary["sweep"] = {"winner": winner_setting, "flags": SWEEP.get(winner_setting, []), **decision}
    log(out, clock, f"sweep winner: {winner_setting} {decision.get('scores')}")
    keep = {"sweep-ibm", winner}
    if winner == "sweep-ibm":
        scores = decision.get("scores", {})
        runner_up = max((n for n in scores if n != "sweep-ibm"), key=lambda n: scores[n], default=None)
        if runner_up:
            keep.add(runner_up)
    for name in sweep_names:
        if name not in keep:
            jobs[name].stop()
    for name, flags in winner_runs:
        jobs[name] = train(name, [*flags, *SWEEP.get(winner_setting, [])])
    log(out, clock, f"kept {sorted(keep)}; started {[n for n, _ in winner_runs]} with {winner_setting}")
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
                                                          "--workers", "2"), logs / f"test-{run_dir.name}.txt").start(env))
        finals.append(Job(f"plot-{run_dir.name}", matcaps("plot", str(run_dir)), logs / f"plot-{run_dir.name}.txt").start(env))
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
