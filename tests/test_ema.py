"""``--ema-decay``: an exponential moving average of the weights is validated, kept and resumed exactly."""

from __future__ import annotations

import pytest
import torch
from train_support import Crash, TinyImages, crash_at, state_dicts_equal, tiny_config, tiny_model_config

from matcaps.cli import main
from matcaps.errors import CheckpointError, ConfigError
from matcaps.scoring import evaluate_model
from matcaps.train import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, load_checkpoint, train_run
from matcaps.train.config import TrainConfig
from matcaps.train.ema import warmed_up_decay


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def test_the_decay_warms_up_as_tensorflows_moving_average():
    assert warmed_up_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmed_up_decay(0.999, 100) == pytest.approx(101 / 110)
    assert warmed_up_decay(0.999, 10_000) == 0.999  # (1 + t) / (10 + t) passes 0.999 near t = 8,990
    assert warmed_up_decay(0.5, 3) == pytest.approx(4 / 13) and warmed_up_decay(0.5, 20) == 0.5


def test_the_average_is_the_recurrence_over_the_weights_of_every_step(tmp_path):
    """Recorded after each step, the trained weights give the average by the recurrence written out
    in float64; the checkpoint's ``model`` is that average, ``training_model`` the trained weights."""
    decay = 0.6
    config = tiny_config(epochs=2, ema_decay=decay, checkpoint_every=0, precision="fp64")
    trainer = Trainer(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1, augment=False),
                      run_dir=tmp_path / "run")  # fmt: skip
    snapshot = lambda: {k: v.detach().clone().double() for k, v in trainer.model.named_parameters()}
    trained = [snapshot()]
    trainer.step_hook = lambda t: trained.append(snapshot())
    trainer.fit()
    assert len(trained) == 11  # the initial weights, then 2 epochs of 5 steps
    expected = dict(trained[0])
    for t, weights in enumerate(trained[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    saved = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    for name, value in expected.items():
        torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(saved["training_model"][name], trained[-1][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(saved["model"]["conv1.weight"], saved["training_model"]["conv1.weight"])
    buffers = dict(trainer.model.named_buffers())
    assert all(torch.equal(saved["model"][k], v) for k, v in buffers.items())  # buffers are copied


def test_validation_scores_the_average_and_best_pt_holds_it(tmp_path):
    config = tiny_config(epochs=3, ema_decay=0.9)
    val_set = TinyImages(16, seed=1, augment=False)
    model_config = tiny_model_config(config)
    result = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / BEST_CHECKPOINT)
    trainer = Trainer(config, model_config, TinyImages(40))
    trainer.model.load_state_dict(best["model"])
    counts = evaluate_model(trainer.model, val_set, model_config.num_classes, batch_size=16, margin=trainer.margin())
    assert counts.accuracy == result.best_val_accuracy == best["state"]["best_val_accuracy"]
    trainer.model.load_state_dict(best["training_model"])
    trained = evaluate_model(trainer.model, val_set, model_config.num_classes, batch_size=16, margin=trainer.margin())
    assert trained.loss != counts.loss  # not the trained weights' score


def test_without_a_decay_the_checkpoint_holds_the_trained_weights_only(tmp_path):
    config = tiny_config(epochs=1)
    trainer = Trainer(config, tiny_model_config(config), TinyImages(40), run_dir=tmp_path / "run")
    assert trainer.weight_average is None and trainer.evaluated_model is trainer.model
    trainer.fit()
    saved = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert "training_model" not in saved and state_dicts_equal(saved["model"], trainer.model.state_dict())


@pytest.mark.parametrize("crash_step", [3, 7])
def test_a_resumed_run_ends_with_the_same_average_and_weights(tmp_path, crash_step):
    config = tiny_config(epochs=3, checkpoint_every=2, ema_decay=0.8)
    model_config = tiny_model_config(config)
    val_set = TinyImages(16, seed=1, augment=False)
    train_run(config, model_config, TinyImages(40), val_set, tmp_path / "whole")
    with pytest.raises(Crash):
        train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", step_hook=crash_at(crash_step))
    train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", resume=True)
    whole, resumed = (load_checkpoint(tmp_path / run / LAST_CHECKPOINT) for run in ("whole", "killed"))
    assert whole["state"]["step"] == resumed["state"]["step"] == 15
    assert state_dicts_equal(whole["model"], resumed["model"])
    assert state_dicts_equal(whole["training_model"], resumed["training_model"])
    assert whole["state"]["best_val_accuracy"] == resumed["state"]["best_val_accuracy"]


def test_a_warm_start_starts_the_average_at_the_initial_weights(tmp_path):
    source_config = tiny_config(epochs=1)
    model_config = tiny_model_config(source_config)
    train_run(source_config, model_config, TinyImages(40), None, tmp_path / "source")
    config = tiny_config(epochs=1, ema_decay=0.99, init_from=str(tmp_path / "source" / LAST_CHECKPOINT))
    trainer = Trainer(config, model_config, TinyImages(40))
    trainer.load_initial_weights(config.init_from)
    source = load_checkpoint(tmp_path / "source" / LAST_CHECKPOINT)["model"]
    assert state_dicts_equal(trainer.weight_average.average.state_dict(), source)


def test_a_checkpoint_without_trained_weights_is_refused_for_an_averaging_run(tmp_path):
    config = tiny_config(epochs=1)
    model_config = tiny_model_config(config)
    train_run(config, model_config, TinyImages(40), None, tmp_path / "plain")
    averaging = Trainer(config.replace(ema_decay=0.9), model_config, TinyImages(40))
    with pytest.raises(CheckpointError, match="^the checkpoint holds no trained weights beside the evaluated ones"):
        averaging.load_checkpoint(load_checkpoint(tmp_path / "plain" / LAST_CHECKPOINT))


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_a_decay_outside_zero_to_one_is_refused(decay):
    with pytest.raises(ConfigError, match=r"^option ema_decay must be in \[0, 1\) \(0: off\), got "):
        TrainConfig(ema_decay=decay)


def test_the_command_line_refuses_a_bad_decay_and_a_changed_one_on_resume(tmp_path, tiny_mnist_run, capsys):
    run, data = tiny_mnist_run
    common = ["--data-root", str(data), "--no-progress", "--workers", "0"]
    bad = tmp_path / "bad"
    assert main(["train", "--dataset", "mnist", "--ema-decay", "1", "--run-dir", str(bad), *common]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "matcaps train: error: --ema-decay must be in [0, 1) (0: off), got 1.0"]
    assert not bad.exists()
    assert main(["train", "--resume", str(run), "--ema-decay", "0.9", *common]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("matcaps train: error: cannot change --ema-decay when resuming")
