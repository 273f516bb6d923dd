"""The training loop: learning-rate and margin schedules, exact resumption, non-finite steps, files."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from train_support import Crash, TinyImages, crash_at, state_dicts_equal, tiny_config, tiny_model_config

from matcaps.train import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, load_checkpoint, read_metrics, train_run


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def test_learning_rate_decays_continuously_and_margin_follows_the_schedule():
    config = tiny_config(max_steps=5, lr_decay_steps=3, val_every=0)
    trainer = Trainer(config, tiny_model_config(config), TinyImages(40))
    lrs, margins = [], []
    trainer.step_hook = lambda t: (lrs.append(t.optimizer.param_groups[0]["lr"]), margins.append(t.margin()))
    trainer.fit()
    assert lrs == pytest.approx([3e-3 * 0.96 ** (k / 3) for k in range(1, 6)], rel=1e-12)
    assert margins == pytest.approx([0.2 + 0.79 / (1 + math.exp(-(k / 50_000 - 4))) for k in range(1, 6)])


def test_learning_rate_drops_at_its_milestones_on_top_of_the_decay():
    config = tiny_config(max_steps=6, lr_decay_steps=3, lr_drop_steps=(2, 4), lr_drop=0.5, val_every=0)
    trainer = Trainer(config, tiny_model_config(config), TinyImages(40))
    lrs = []
    trainer.step_hook = lambda t: lrs.append(t.optimizer.param_groups[0]["lr"])  # the rate of the next step
    trainer.fit()
    drops = [0, 1, 1, 2, 2, 2]  # after steps 1..6: milestone 2 reached at step 2, milestone 4 at step 4
    assert lrs == pytest.approx([3e-3 * 0.96 ** (k / 3) * 0.5 ** d for k, d in zip(range(1, 7), drops)], rel=1e-12)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_clip_grad_norm_rescales_the_gradient_the_optimizer_sees(clip):
    """The optimizer steps on the gradient scaled to a global norm of at most ``clip``, same direction."""
    config = tiny_config(max_steps=1, val_every=0, clip_grad_norm=clip)
    trainer = Trainer(config, tiny_model_config(config), TinyImages(8))
    raw, seen = {}, {}
    gradients = lambda: {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    trainer.monitor.after_backward = lambda: raw.update(gradients())
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(gradients()))
    images, labels = next(iter(torch.utils.data.DataLoader(TinyImages(8), batch_size=8)))
    trainer.train_step(images, labels)
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()])).item()
    seen_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen.values()])).item()
    assert raw_norm > 1e-2  # the tiny network's gradient is far above the clip
    if clip == 0:
        assert all(torch.equal(raw[name], seen[name]) for name in raw)
    else:
        assert seen_norm == pytest.approx(clip, rel=1e-4)
        scale = seen_norm / raw_norm
        assert all(torch.allclose(seen[name], raw[name] * scale, rtol=1e-5, atol=1e-12) for name in raw)


@pytest.mark.parametrize("clip", [0.0, 1e-3, 500.0])  # off, every step, some steps (the norms are ~200-1,200)
def test_training_rows_report_the_mean_and_largest_gradient_norm_before_clipping(tmp_path, clip):
    """Each window's ``grad_norm_mean``/``grad_norm_max`` against the norms read off the raw gradients of every step."""
    config = tiny_config(max_steps=6, log_every=3, val_every=0, checkpoint_every=0, clip_grad_norm=clip)
    trainer = Trainer(config, tiny_model_config(config), TinyImages(48), run_dir=tmp_path)
    raw_norms = []
    record = trainer.monitor.after_backward

    def after_backward():
        record()
        squares = sum(float(p.grad.double().pow(2).sum()) for p in trainer.model.parameters() if p.grad is not None)
        raw_norms.append(math.sqrt(squares))

    trainer.monitor.after_backward = after_backward
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert [r["step"] for r in rows] == [3, 6] and len(raw_norms) == 6
    for row, window in zip(rows, (raw_norms[:3], raw_norms[3:])):
        assert row["grad_norm_mean"] == pytest.approx(sum(window) / 3, rel=1e-5)
        assert row["grad_norm_max"] == pytest.approx(max(window), rel=1e-5)
        if clip == 0:
            assert "clipped_fraction" not in row
        else:
            assert row["clipped_fraction"] == sum(n > clip for n in window) / 3


@pytest.mark.parametrize(
    ("checkpoint_every", "crash_step", "resumed_from"),
    [
        (4, 5, 4),  # killed on an epoch's last batch, before validation: resumes mid-epoch
        (4, 7, 5),  # resumes from the end-of-epoch checkpoint
        (4, 8, 8),  # killed right after a checkpoint
        (4, 11, 10),  # resumes at the start of an epoch
        (5, 5, 5),  # the checkpoint holds a finished epoch not yet validated
    ],
)
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, checkpoint_every, crash_step, resumed_from):
    # 40 images, batch 8: 5 steps per epoch; 3 epochs = 15 steps; last.pt every few steps and per epoch.
    config = tiny_config(epochs=3, checkpoint_every=checkpoint_every, weight_decay=1e-3)
    model_config = tiny_model_config(config)
    train_set, val_set = TinyImages(40), TinyImages(16, seed=1, augment=False)
    train_run(config, model_config, train_set, val_set, tmp_path / "whole")

    with pytest.raises(Crash):
        train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", step_hook=crash_at(crash_step))
    interrupted = load_checkpoint(tmp_path / "killed" / LAST_CHECKPOINT)
    assert interrupted["state"]["step"] == resumed_from
    torch.manual_seed(12345)  # the global RNG state must come from the checkpoint, not from here
    train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", resume=True)

    whole = load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT)
    resumed = load_checkpoint(tmp_path / "killed" / LAST_CHECKPOINT)
    assert whole["state"]["step"] == resumed["state"]["step"] == 15
    assert state_dicts_equal(whole["model"], resumed["model"])
    for a, b in zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert whole["state"]["best_val_accuracy"] == resumed["state"]["best_val_accuracy"]
    # The logged training losses agree too, once the first window after the resumption is complete.
    losses = lambda run: {r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if r["phase"] == "train"}
    whole_losses, killed_losses = losses("whole"), losses("killed")
    assert whole_losses.keys() == killed_losses.keys()
    assert all(whole_losses[s] == killed_losses[s] for s in whole_losses if s > resumed_from + 2)


def test_a_different_seed_gives_different_weights(tmp_path):
    config = tiny_config(epochs=1, val_every=0)
    first = Trainer(config, tiny_model_config(config), TinyImages(40))
    second = Trainer(config.replace(seed=1), tiny_model_config(config), TinyImages(40))
    first.fit(), second.fit()
    assert not state_dicts_equal(first.model.state_dict(), second.model.state_dict())


def test_a_step_with_a_nan_is_skipped_and_counted(tmp_path):
    train_set = TinyImages(40, augment=False)
    poisoned = 13
    train_set.images[poisoned] = float("nan")
    config = tiny_config(epochs=1, log_every=1, checkpoint_every=0)
    trainer = Trainer(config, tiny_model_config(config), train_set, TinyImages(16, seed=1), run_dir=tmp_path)
    snapshots = [{k: v.clone() for k, v in trainer.model.state_dict().items()}]
    trainer.step_hook = lambda t: snapshots.append({k: v.clone() for k, v in t.model.state_dict().items()})
    result = trainer.fit()

    assert result.skipped_steps == 1
    skipped = [i for i, batch in enumerate(trainer.sampler) if poisoned in batch]
    assert len(skipped) == 1
    before, after = snapshots[skipped[0]], snapshots[skipped[0] + 1]
    assert state_dicts_equal(before, after)  # weights and normalisation statistics untouched
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert all(not state_dicts_equal(snapshots[i], snapshots[i + 1]) for i in range(5) if i != skipped[0])
    records = [r for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert [r["skipped_steps"] for r in records] == [0.0] * skipped[0] + [1.0] * (5 - skipped[0])
    # A skipped step has no gradient norm: its one-step window reports none.
    assert ["grad_norm_mean" in r for r in records] == [r["step"] != skipped[0] + 1 for r in records]
    assert all(math.isfinite(r["grad_norm_mean"]) for r in records if "grad_norm_mean" in r)
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records if r["step"] != skipped[0] + 1)


def test_run_directory_holds_config_checkpoints_metrics_and_tensorboard(tmp_path):
    config = tiny_config(epochs=2, histogram_every=2)
    result = train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1), tmp_path / "run")
    run = tmp_path / "run"
    assert {"config.toml", "run.json", LAST_CHECKPOINT, BEST_CHECKPOINT, "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    records = read_metrics(run)
    train = [r for r in records if r["phase"] == "train"]
    val = [r for r in records if r["phase"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert {"loss", "accuracy", "lr", "margin", "images_per_s", "step_time_s", "peak_memory_mib"} <= set(train[0])
    assert [r["step"] for r in val] == [5, 10] and all(0 <= r["accuracy"] <= 1 for r in val)
    best = load_checkpoint(run / BEST_CHECKPOINT)
    assert best["state"]["best_val_accuracy"] == max(r["accuracy"] for r in val) == result.best_val_accuracy
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["conv1_channels"] == 8 and info["world_size"] == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert {"train/loss", "train/accuracy", "train/lr", "train/margin", "val/accuracy"} <= set(events.Tags()["scalars"])
    histograms = set(events.Tags()["histograms"])
    assert {"activations/class_caps", "activations/primary_caps", "beta/class_caps.beta_a"} <= histograms


def test_max_steps_stops_mid_epoch_and_validates(tmp_path):
    config = tiny_config(epochs=5, max_steps=7)
    result = train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert result.step == 7 and last["state"]["epoch"] == 1 and last["state"]["batch_in_epoch"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["phase"] == "val"] == [5, 7]


def test_bf16_on_cpu_is_rejected_with_a_clear_error():
    from matcaps.errors import ConfigError

    config = tiny_config(precision="bf16")
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        Trainer(config, tiny_model_config(config), TinyImages(40))


class FakeClock:
    """Stands in for ``time.monotonic`` in the trainer: advanced by hand, one minute per step."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_minutes_stops_with_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import matcaps.train.trainer as trainer_module

    config = tiny_config(epochs=3, checkpoint_every=0)  # 5 steps per epoch, 15 in all
    model_config = tiny_model_config(config)
    val_set = TinyImages(16, seed=1, augment=False)
    whole = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "whole")

    clock = FakeClock()
    monkeypatch.setattr(trainer_module.time, "monotonic", clock)

    def tick(trainer: Trainer) -> None:
        clock.now += 60.0

    boxed = config.replace(max_minutes=6.5)  # stops after the 7th step, mid-epoch
    result = train_run(boxed, model_config, TinyImages(40), val_set, tmp_path / "boxed", step_hook=tick)
    assert result.step == 7
    last = load_checkpoint(tmp_path / "boxed" / LAST_CHECKPOINT)
    assert last["state"]["step"] == 7 and last["state"]["epoch"] == 1 and last["state"]["batch_in_epoch"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "boxed") if r["phase"] == "val"] == [5, 7]

    monkeypatch.undo()
    resumed = train_run(boxed.replace(max_minutes=None), model_config, TinyImages(40), val_set, tmp_path / "boxed",
                        resume=True)  # fmt: skip
    assert resumed.step == whole.step == 15
    final = load_checkpoint(tmp_path / "boxed" / LAST_CHECKPOINT)["model"]
    assert state_dicts_equal(final, load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT)["model"])


def test_without_progress_bars_a_line_is_printed_per_log_step_and_metrics_reach_the_disk_at_once(tmp_path):
    lines: list[str] = []
    flushed_steps: list[list[int]] = []
    config = tiny_config(epochs=1, log_every=2, histogram_every=0)  # 5 steps

    def look_at_the_file(trainer: Trainer) -> None:  # what another process would read now
        text = (tmp_path / "run" / "metrics.jsonl").read_text()
        flushed_steps.append([json.loads(line)["step"] for line in text.splitlines() if '"train"' in line])

    trainer = Trainer(config, tiny_model_config(config), TinyImages(40), run_dir=tmp_path / "run",
                      step_hook=look_at_the_file, log=lines.append)  # fmt: skip
    trainer.fit()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/5", "4/5"]
    assert all("loss" in line and "images/s" in line and "ETA" in line and "epoch 1" in line for line in progress)
    assert flushed_steps[1] == [2] and flushed_steps[3] == [2, 4]  # on disk right after the step that logged it


def test_histograms_cover_every_routing_iteration_and_gradient_norms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(epochs=1, histogram_every=5, log_every=5, model_options={**tiny_config().model_options,
                                                                                   "routing": {"iterations": 3}})
    train_run(config, tiny_model_config(config), TinyImages(40), None, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    histograms = set(events.Tags()["histograms"])
    for layer in ("conv_caps1", "conv_caps2", "class_caps"):
        for iteration in (1, 2, 3):
            assert f"routing/{layer}/iteration{iteration}/activations" in histograms
            assert f"routing/{layer}/iteration{iteration}/log_variance" in histograms
    assert "grad_norm/all_parameters" in histograms
    norms = [r for r in read_metrics(tmp_path / "run") if r["phase"] == "grad_norm"]
    assert [r["step"] for r in norms] == [5]
    assert "class_caps.weight" in norms[0] and all(v >= 0 for k, v in norms[0].items() if "." in k)


def test_the_cnn_baseline_trains_with_cross_entropy_and_resumes(tmp_path):
    from matcaps.models import CNN_BASELINE, CNNBaseline

    config = tiny_config(epochs=2, model=CNN_BASELINE, model_options={"hidden_units": 16})
    model_config = tiny_model_config(config)
    train_set, val_set = TinyImages(40), TinyImages(16, seed=1, augment=False)
    trainer = Trainer(config, model_config, train_set, val_set)
    assert isinstance(trainer.model, CNNBaseline) and trainer.model.classifier[1].out_features == 16
    counts = trainer.validate()  # the validation loss is the cross-entropy, not a spread loss
    assert counts is not None
    assert counts.loss == pytest.approx(float(_mean_cross_entropy(trainer.model, val_set)), rel=1e-5)
    whole = train_run(config, model_config, train_set, val_set, tmp_path / "whole")
    with pytest.raises(Crash):
        train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", step_hook=crash_at(6))
    resumed = train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", resume=True)
    assert resumed.step == whole.step == 10
    assert state_dicts_equal(load_checkpoint(tmp_path / "killed" / LAST_CHECKPOINT)["model"],
                             load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT)["model"])  # fmt: skip


def _mean_cross_entropy(model: torch.nn.Module, dataset) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.stack([dataset[i][1] for i in range(len(dataset))])
        loss = torch.nn.functional.cross_entropy(model(images).logits, labels)
    model.train(was_training)
    return loss


def test_val_every_steps_adds_mid_epoch_validations_and_keeps_resumption_exact(tmp_path):
    config = tiny_config(epochs=2, val_every_steps=2, checkpoint_every=3)  # 5 steps per epoch
    model_config = tiny_model_config(config)
    val_set = TinyImages(16, seed=1, augment=False)
    train_run(config, model_config, TinyImages(40), val_set, tmp_path / "whole")
    assert [r["step"] for r in read_metrics(tmp_path / "whole") if r["phase"] == "val"] == [2, 4, 5, 6, 8, 10]
    with pytest.raises(Crash):
        train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", step_hook=crash_at(8))
    train_run(config, model_config, TinyImages(40), val_set, tmp_path / "killed", resume=True)
    assert state_dicts_equal(load_checkpoint(tmp_path / "killed" / LAST_CHECKPOINT)["model"],
                             load_checkpoint(tmp_path / "whole" / LAST_CHECKPOINT)["model"])  # fmt: skip
    best = load_checkpoint(tmp_path / "whole" / BEST_CHECKPOINT)
    val = [r for r in read_metrics(tmp_path / "whole") if r["phase"] == "val"]
    assert best["state"]["best_val_accuracy"] == max(r["accuracy"] for r in val)


def test_deterministic_option_turns_on_deterministic_algorithms(tmp_path):
    config = tiny_config(epochs=1, deterministic=True)
    try:
        trainer = Trainer(config, tiny_model_config(config), TinyImages(40))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        trainer.fit()  # the routing's operations all have deterministic versions (an error would be raised)
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_validation_is_on_disk_before_the_next_step(tmp_path):
    seen: list[list[int]] = []
    config = tiny_config(epochs=1, log_every=100, val_every_steps=2, histogram_every=0)

    def look(trainer: Trainer) -> None:
        text = (tmp_path / "run" / "metrics.jsonl").read_text()
        seen.append([json.loads(line)["step"] for line in text.splitlines() if '"val"' in line])

    train_run(config, tiny_model_config(config), TinyImages(40), TinyImages(16, seed=1), tmp_path / "run", step_hook=look)
    assert seen[1] == [2] and seen[3] == [2, 4]
