"""Ctrl-C / SIGTERM stop a training after the step, with a checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from data_fixtures import write_tiny_mnist
from torch.utils.data import get_worker_info
from train_support import NUM_CLASSES, TinyImages, state_dicts_equal, tiny_config, tiny_model_config

from matcaps.data import prepare
from matcaps.train import LAST_CHECKPOINT, load_checkpoint, read_metrics, train_run
from matcaps.data.loader_workers import ignore_stop_signals, stop_signals_held
from matcaps.models import build_model
from matcaps.scoring import evaluate_model
from matcaps.train.interrupt import SIGNAL_EXIT_BASE, StopSignals


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def test_the_first_signal_is_recorded_the_second_interrupts_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            assert stop.requested() is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert stop.requested() == "SIGTERM" and stop.received is signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)  # the second one: at once
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def enter() -> None:
        with StopSignals() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested()

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}


def test_data_loader_workers_ignore_the_stop_signals():
    def child() -> None:  # in a forked process, as a worker would be
        ignore_stop_signals(0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os._exit(7)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        child()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_a_signal_that_reaches_a_worker_before_it_sets_the_signals_aside_is_dropped():
    """Workers are forked with the signals held; PyTorch's worker handler would die of a SIGTERM."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_signals_held():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, a worker before its worker_init_fn
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what PyTorch's handler falls back to
            os.kill(os.getpid(), signal.SIGTERM)  # the terminal's or the batch system's, to the whole group
            ignore_stop_signals(0)
            os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_a_signal_sent_while_workers_are_forked_still_reaches_the_trainer():
    """Held by this thread, it comes on release; taken by another thread of the process (PyTorch's
    own threads do not hold it), at once: either way the trainer sees it, and nothing is lost."""
    with StopSignals() as stop:
        with stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        time.sleep(0.01)
        assert stop.requested() == "SIGTERM"


class SignalledInWorkers(TinyImages):
    """Images whose worker receives SIGTERM and SIGINT while it loads the first one (a Ctrl-C to the group)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 0 and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(index)


@pytest.mark.parametrize("progress", [False, True])
def test_validation_workers_outlive_a_stop_signal_and_score_every_image(progress):
    """A stop signal during validation is the trainer's to handle: the scoring loader's workers ignore it."""
    model = build_model(tiny_model_config(tiny_config()))
    dataset = SignalledInWorkers(12, augment=False)
    alone = evaluate_model(model, dataset, NUM_CLASSES, batch_size=4)
    with_a_worker = evaluate_model(model, dataset, NUM_CLASSES, batch_size=4, workers=1, progress=progress)
    assert with_a_worker.total == 12 and torch.equal(with_a_worker.confusion, alone.confusion)


def test_a_signal_stops_training_after_the_step_and_the_run_resumes_to_the_uninterrupted_weights(tmp_path):
    config = tiny_config(epochs=3, checkpoint_every=0)  # 5 steps per epoch, 15 in all
    model_config = tiny_model_config(config)
    val_set = TinyImages(16, seed=1, augment=False)
    whole = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "whole")

    def interrupt_at_step_7(trainer) -> None:
        if trainer.state.step == 7:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)

    with StopSignals() as stop:
        result = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "stopped",
                           step_hook=interrupt_at_step_7, stop_requested=stop.requested)  # fmt: skip
    assert result.step == 7 and result.stopped_by == "SIGINT"
    last = load_checkpoint(tmp_path / "stopped" / LAST_CHECKPOINT)
    assert last["state"]["step"] == 7 and last["state"]["batch_in_epoch"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "stopped") if r["phase"] == "val"] == [5, 7]

    resumed = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "stopped", resume=True)
    assert resumed.step == whole.step == 15 and resumed.stopped_by is None
    final = load_checkpoint(tmp_path / "stopped" / LAST_CHECKPOINT)["model"]
    assert state_dicts_equal(final, load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT)["model"])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_matcaps_train_stopped_by_a_signal_exits_128_plus_n_with_a_checkpoint_and_resumes(tmp_path, stop_signal):
    """The real command, with a data-loader worker (which the terminal's Ctrl-C would also reach)."""
    root = tmp_path / "data"
    write_tiny_mnist(root, n_train=60, n_test=10)
    prepare("mnist", root, download=False, progress=False, verify=False)
    run = tmp_path / "run"
    options = ["--data-root", str(root), "--no-progress", "--workers", "1", "--device", "cpu"]
    small = ["--model-option", "conv1_channels=8", "--model-option", "primary_types=2",
             "--model-option", "conv_caps1_types=2", "--model-option", "conv_caps2_types=2"]  # fmt: skip
    command = [sys.executable, "-m", "matcaps", "train", "--dataset", "mnist", "--val-size", "10", "--batch-size", "5",
               "--epochs", "1000", "--log-every", "1", "--checkpoint-every", "0", "--run-dir", str(run), *options, *small]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # its own process group, as a terminal's job
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        steps = [r["step"] for r in read_metrics(run) if r["phase"] == "train"] if (run / "metrics.jsonl").exists() else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    os.killpg(process.pid, stop_signal)  # the whole group: the worker too, as Ctrl-C in a terminal
    out, err = process.communicate(timeout=120)
    assert process.returncode == SIGNAL_EXIT_BASE + int(stop_signal), err[-2000:]
    assert f"received {stop_signal.name}: stopping after this step with a checkpoint" in err
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and f"by {stop_signal.name}, with a checkpoint; continue with --resume" in stopped[0]
    step = int(stopped[0].split()[3])
    assert load_checkpoint(run / LAST_CHECKPOINT)["state"]["step"] == step >= 3
    assert "Traceback" not in err

    resumed = subprocess.run([sys.executable, "-m", "matcaps", "train", "--resume", str(run), "--max-steps",
                              str(step + 2), *options], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} at step {step}" in resumed.stdout
    assert load_checkpoint(run / LAST_CHECKPOINT)["state"]["step"] == step + 2
    assert json.loads((run / "run.json").read_text())["world_size"] == 1
    assert torch.get_num_threads() == 1  # the fixture's setting, untouched by the subprocesses
