"""``matcaps train --init-from``: a new run starting from the weights of another (fine-tuning)."""

from __future__ import annotations

import shutil

import pytest
import torch
from matcaps.cli import main
from matcaps.train import load_checkpoint, read_metrics


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


#: Buffers a training step updates whatever the learning rate (the input batch norm's statistics).
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def same_parameters(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    keys = [k for k in first if not k.endswith(RUNNING_STATISTICS)]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in keys)


def first_step_loss(run) -> float:
    return next(r["loss"] for r in read_metrics(run) if r["phase"] == "train")


def test_a_warm_start_begins_at_the_source_weights_with_a_fresh_optimizer(trained_run, config_file, tmp_path, capsys):
    source = load_checkpoint(trained_run / "best.pt")
    run = tmp_path / "tuned"
    # One step at a learning rate so small that Adam's update (≤ lr per parameter) cannot be seen
    # next to the weights: the run's weights are the source's, its step count starts at zero.
    argv = ["train", "--config", str(config_file), "--run-dir", str(run), "--init-from", str(trained_run),
            "--max-steps", "1", "--lr", "1e-30", "--log-every", "1"]
    assert main(argv) == 0
    assert f"starting from the weights of {trained_run / 'best.pt'}" in capsys.readouterr().out
    tuned = load_checkpoint(run / "last.pt")
    assert tuned["state"]["step"] == 1
    assert len(tuned["optimizer"]["state"]) > 0 and all(s["step"] == 1 for s in tuned["optimizer"]["state"].values())
    assert same_parameters(tuned["model"], source["model"])
    assert tuned["config"]["init_from"] == str(trained_run)

    cold = tmp_path / "cold"
    assert main(["train", "--config", str(config_file), "--run-dir", str(cold), "--max-steps", "1",
                 "--lr", "1e-30", "--log-every", "1"]) == 0  # fmt: skip
    assert not same_parameters(load_checkpoint(cold / "last.pt")["model"], source["model"])
    assert first_step_loss(run) < first_step_loss(cold)  # the trained weights fit the data better


def test_a_warm_started_run_resumes_without_its_source(trained_run, config_file, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained_run, source)
    run = tmp_path / "tuned"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), "--init-from", str(source),
                 "--max-steps", "3"]) == 0  # fmt: skip
    shutil.rmtree(source)  # the checkpoint, not the source, carries a resumed run
    assert main(["train", "--resume", str(run), "--max-steps", "5"]) == 0
    assert load_checkpoint(run / "last.pt")["state"]["step"] == 5


def test_a_warm_start_may_change_the_routing_and_says_so(trained_run, config_file, tmp_path, capsys):
    """Routing hyper-parameters shape no weight: 2 iterations can be fine-tuned with 3 (a curriculum)."""
    source = load_checkpoint(trained_run / "best.pt")
    assert source["model_config"]["routing"]["iterations"] == 2
    run = tmp_path / "three"
    argv = ["train", "--config", str(config_file), "--run-dir", str(run), "--init-from", str(trained_run),
            "--iters", "3", "--model-option", "routing.variance_floor=1e-4",
            "--model-option", "routing.e_step_scales=[1,0.2]", "--max-steps", "1", "--lr", "1e-30"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "routing changed: e_step_scales () -> (1, 0.2), iterations 2 -> 3, variance_floor 1e-09 -> 0.0001" in out
    tuned = load_checkpoint(run / "last.pt")
    assert tuned["model_config"]["routing"]["iterations"] == 3
    assert tuned["model_config"]["routing"]["variance_floor"] == 1e-4
    assert tuned["model_config"]["routing"]["e_step_scales"] == (1, 0.2)
    assert same_parameters(tuned["model"], source["model"])
    # resuming stays strict: the checkpoint's network (3 iterations) is the one continued
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["model_config"]["routing"]["iterations"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--init-from", "no-such-run"], "no-such-run is neither a run directory nor a checkpoint file nor a pretrained"),
        (["--init-from", "mnist"], "holds another network than the configured one (differs in"),
        (["--init-from", "RUN", "--model-option", "pose_size=3"], "differs in pose_size"),
    ],
)
def test_a_source_of_another_network_is_refused_before_anything_is_written(
    extra, message, trained_run, config_file, tmp_path, capsys
):
    run = tmp_path / "tuned"
    extra = [str(trained_run) if item == "RUN" else item for item in extra]
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not run.exists()


def test_a_published_run_scores_as_the_original_and_seeds_a_warm_start(trained_run, config_file, tmp_path, capsys):
    """``scripts/publish_run.py``: the reduced ``best.pt`` of ``docs/runs/`` is all that testing and
    fine-tuning need."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "publish_run.py"
    published = tmp_path / "published"
    subprocess.run([sys.executable, str(script), str(trained_run), str(published)], check=True, capture_output=True)
    payload = load_checkpoint(published / "best.pt")
    assert set(payload) == {"format", "model", "state", "config", "model_config", "class_names"}  # no optimizer, no RNG states
    assert (published / "config.toml").is_file() and (published / "metrics.jsonl").is_file()
    original = load_checkpoint(trained_run / "best.pt")
    assert all(torch.equal(payload["model"][k], v) for k, v in original["model"].items())
    assert main(["train", "--config", str(config_file), "--run-dir", str(tmp_path / "tuned"),
                 "--init-from", str(published), "--max-steps", "1"]) == 0  # fmt: skip
    assert f"starting from the weights of {published / 'best.pt'}" in capsys.readouterr().out
