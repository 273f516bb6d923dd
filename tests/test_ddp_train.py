"""Data parallelism: 2 CPU processes (gloo) with batch 4 each train exactly like 1 process with batch 8.

The comparison runs in float64: in float32 the gradient of a batch of 8 and the mean of
the gradients of its two halves differ by rounding (up to ~5e-4 relative through the
routing), which Adam turns into visible weight differences after a few steps; in float64
the weights agree to ~1e-8 after 10 steps (Adam still amplifies rounding where a
gradient is near zero), the losses to ~1e-8.
"""

from __future__ import annotations

import json

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from data_fixtures import write_tiny_smallnorb
from train_support import TINY_MODEL_OPTIONS, TinyImages, tiny_config, tiny_model_config

from matcaps.cli import main
from matcaps.data import prepare
from matcaps.train import LAST_CHECKPOINT, load_checkpoint, read_metrics, setup_distributed, teardown_distributed, train_run
from matcaps.train.sampler import EpochBatchSampler

GLOBAL_BATCH = 8
WORLD_SIZE = 2
#: 40 training images, global batch 8: 5 steps per epoch; 2 epochs.
CONFIG_CHANGES = dict(epochs=2, batch_size=GLOBAL_BATCH, checkpoint_every=0, log_every=1, weight_decay=1e-3,
                      precision="fp64")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Batch-normalised convolutions (``conv_norm``): their statistics, and their gradients, span both processes.
CONV_NORM_OPTIONS = dict(TINY_MODEL_OPTIONS, stem_convs=1, conv_norm=True)


def _as_torchrun_process(rank: int, world_size: int, port: int) -> None:
    """Set what ``torchrun`` sets for process ``rank``, and run torch on one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)


def _worker(rank: int, world_size: int, port: int, run_dir: str, model_options: dict | None = None) -> None:
    _as_torchrun_process(rank, world_size, port)
    context = setup_distributed("cpu")
    try:
        config = tiny_config(**CONFIG_CHANGES, model_options=dict(model_options or TINY_MODEL_OPTIONS))
        train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1, augment=False), run_dir,
                  context=context)  # fmt: skip
    finally:
        teardown_distributed(context)


def test_process_shards_of_the_sampler_make_up_the_global_batches():
    whole = EpochBatchSampler(43, GLOBAL_BATCH, seed=3)
    shards = [EpochBatchSampler(43, GLOBAL_BATCH // 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in (whole, *shards):
        sampler.set_epoch(1)
    assert len(whole) == len(shards[0]) == 5  # the incomplete last global batch is dropped
    for batch, first, second in zip(whole, *shards):
        assert batch == first + second


@pytest.mark.parametrize("model_options", [TINY_MODEL_OPTIONS, CONV_NORM_OPTIONS], ids=["paper", "conv_norm"])
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, model_options):
    single = tmp_path / "single"
    config = tiny_config(**CONFIG_CHANGES, model_options=dict(model_options))
    train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1, augment=False), single)

    parallel = tmp_path / "parallel"
    mp.spawn(_worker, args=(WORLD_SIZE, free_port(), str(parallel), model_options), nprocs=WORLD_SIZE, join=True)

    one, two = load_checkpoint(single / LAST_CHECKPOINT), load_checkpoint(parallel / LAST_CHECKPOINT)
    assert one["state"]["step"] == two["state"]["step"] == 10
    # Adam amplifies float64 rounding where a gradient is near zero; more so behind a batch norm,
    # whose output does not change with its input's scale (measured: up to 1.3e-6 after 10 steps).
    tolerance = 1e-5 if model_options.get("conv_norm") else 1e-6
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=tolerance, atol=tolerance, msg=name)
    # The input statistics are those of the global batch (InputNorm.synchronise).
    assert torch.allclose(two["model"]["input_norm.running_mean"], one["model"]["input_norm.running_mean"], atol=1e-12)
    if model_options.get("conv_norm"):  # so are the feature statistics (FeatureNorm.synchronise)
        for index in range(2):
            key = f"conv_norms.{index}.running_var"
            torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-6, atol=1e-9, msg=key)
    train = lambda run: [r for r in read_metrics(run) if r["phase"] == "train"]
    assert [r["loss"] for r in train(parallel)] == pytest.approx([r["loss"] for r in train(single)], rel=1e-6)
    assert [r["accuracy"] for r in train(parallel)] == [r["accuracy"] for r in train(single)]
    val = lambda run, key: [r[key] for r in read_metrics(run) if r["phase"] == "val"]
    assert val(parallel, "accuracy") == val(single, "accuracy") and len(val(single, "accuracy")) == 2
    assert val(parallel, "loss") == pytest.approx(val(single, "loss"), rel=1e-5)
    records = [json.loads(line) for line in (parallel / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["phase"] == "train" and r["step"] == 1 for r in records) == 1  # rank 1 wrote nothing


def test_matcaps_train_under_torchrun_matches_a_single_process(tmp_path):
    """The real launcher: ``torchrun --standalone --nproc-per-node 2 -m matcaps train`` on the tiny smallNORB."""
    write_tiny_smallnorb(tmp_path / "data")
    prepare("smallnorb", tmp_path / "data", download=False, progress=False, verify=False)
    options = ["--data-root", str(tmp_path / "data"), "--batch-size", "8", "--max-steps", "6", "--workers", "0",
               "--no-progress", "--precision", "fp64", "--device", "cpu", "--log-every", "2"]  # fmt: skip
    options += [item for key, value in TINY_MODEL_OPTIONS.items() for item in ("--model-option", f"{key}={value}")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "matcaps"]
    result = subprocess.run([*launcher, "train", *options, "--run-dir", str(tmp_path / "ddp")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished at step 6") == 1  # only rank 0 reports
    assert main(["train", *options, "--run-dir", str(tmp_path / "single")]) == 0

    parallel, single = load_checkpoint(tmp_path / "ddp" / LAST_CHECKPOINT), load_checkpoint(tmp_path / "single" / LAST_CHECKPOINT)
    assert parallel["state"]["step"] == single["state"]["step"] == 6
    for name, value in single["model"].items():
        torch.testing.assert_close(parallel["model"][name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert __import__("json").loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


def _stopping_worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    """Rank 1 alone is asked to stop after step 3 (a signal that reached one process)."""
    _as_torchrun_process(rank, world_size, port)
    context = setup_distributed("cpu")
    steps = []
    try:
        config = tiny_config(**CONFIG_CHANGES)
        result = train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1, augment=False),
                           run_dir, context=context, step_hook=lambda trainer: steps.append(trainer.state.step),
                           stop_requested=lambda: "SIGTERM" if rank == 1 and steps and steps[-1] >= 3 else None)  # fmt: skip
        torch.save({"step": result.step, "stopped_by": result.stopped_by}, f"{run_dir}.rank{rank}")
    finally:
        teardown_distributed(context)


def test_a_stop_request_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    run = tmp_path / "stopped"
    mp.spawn(_stopping_worker, args=(WORLD_SIZE, free_port(), str(run)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(f"{run}.rank{rank}") for rank in range(WORLD_SIZE)]
    assert [r["step"] for r in ranks] == [3, 3]
    assert ranks[1]["stopped_by"] == "SIGTERM" and ranks[0]["stopped_by"] == "a stop request of another process"
    assert load_checkpoint(run / LAST_CHECKPOINT)["state"]["step"] == 3


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _thread_counting_worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    """Record this process's thread count before joining the group, after training and after leaving it."""
    _as_torchrun_process(rank, world_size, port)
    counts = {"before": _thread_count()}
    context = setup_distributed("cpu")
    config = tiny_config(**dict(CONFIG_CHANGES, epochs=1))
    train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1, augment=False), run_dir,
              context=context)  # fmt: skip
    counts["trained"] = _thread_count()
    teardown_distributed(context)
    counts["after"] = _thread_count()
    torch.save(counts, f"{run_dir}.threads{rank}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_leaving_the_group_ends_its_threads_before_the_process_exits(tmp_path):
    """A gloo thread alive while the interpreter shuts down can abort the process (SIGABRT): the
    trainer's DDP wrapper must not keep the process group alive past :func:`teardown_distributed`."""
    run = tmp_path / "threads"
    mp.spawn(_thread_counting_worker, args=(WORLD_SIZE, free_port(), str(run)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        counts = torch.load(f"{run}.threads{rank}")
        assert counts["trained"] > counts["before"], counts  # the group runs threads while it lives
        assert counts["after"] == counts["before"], counts
