"""``matcaps viewpoints``: Hinton et al.'s Table 2 protocol end to end on generated smallNORB data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_tiny_smallnorb
from train_support import TINY_MODEL_OPTIONS, state_dicts_equal
from matcaps.cli import main
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.train import TrainConfig, load_checkpoint
from matcaps.train.config import data_config, resolve_model_config, to_toml
from matcaps.train.run import train_run
from matcaps.viewpoints import ViewpointSettings, run_protocol

#: The tiny smallNORB's azimuths are 0, 40, 80 and 300°: 0, 40 and 300 are familiar, 80 is novel.
COMMON = {"batch_size": 8, "workers": 0, "progress": False, "log_every": 2, "device": "cpu", "val_every": 0}
CAPSULES = {**COMMON, "model_options": TINY_MODEL_OPTIONS}
CNN = {**COMMON, "model": "cnn-baseline", "lr": 1e-3, "model_options": {"hidden_units": 16}}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("norb")
    write_tiny_smallnorb(root)
    prepare("smallnorb", root, download=False, progress=False, verify=False)
    return root


def test_familiar_and_novel_test_viewpoints_split_the_test_set(norb_root):
    novel = load_splits(DataConfig(root=norb_root, split="azimuth")).test
    familiar = load_splits(DataConfig(root=norb_root, split="azimuth", test_viewpoints="familiar")).test
    assert set(novel.metadata["azimuth_deg"].tolist()) == {80}
    assert set(familiar.metadata["azimuth_deg"].tolist()) == {0, 40, 300}
    assert len(novel) + len(familiar) == len(load_splits(DataConfig(root=norb_root)).test)


def error_of(run: Path, viewpoints: str) -> float:
    assert main(["test", str(run), "--checkpoint", "last", "--split", "azimuth", "--viewpoints", viewpoints,
                 "--no-progress", "--workers", "0"]) == 0  # fmt: skip
    name = "azimuth" if viewpoints == "novel" else "azimuth-familiar"
    return json.loads((run / f"test-{name}-last.json").read_text())["error_rate"]


def test_the_protocol_stops_each_network_at_the_familiar_error_and_scores_the_novel_viewpoints(norb_root, tmp_path):
    configs = [(name, TrainConfig(data_root=str(norb_root), **values)) for name, values in
               (("capsules", CAPSULES), ("cnn", CNN))]  # fmt: skip
    reachable = ViewpointSettings(split="azimuth", familiar_error=1.0, check_every=3, max_steps=9)
    results, path = run_protocol(configs, reachable, tmp_path / "reached", log=lambda line: None)
    assert [(r.label, r.steps, r.reached) for r in results] == [("capsules", 3, True), ("cnn", 3, True)]
    report = json.loads(path.read_text())
    assert path.name == "viewpoints-azimuth.json" and report["settings"]["familiar_error"] == 1.0
    for result in results:
        run = Path(result.run_dir)
        assert result.familiar_error == pytest.approx(error_of(run, "familiar"))
        assert result.novel_error == pytest.approx(error_of(run, "novel"))
        assert (result.familiar_images, result.novel_images) == (120, 40)

    unreachable = ViewpointSettings(split="azimuth", familiar_error=0.0, check_every=3, max_steps=7)
    (result,), _ = run_protocol(configs[:1], unreachable, tmp_path / "unreached", log=lambda line: None)
    assert (result.steps, result.reached) == (7, False) and [c[0] for c in result.checks] == [3, 6, 7]
    assert result.familiar_error > 0
    # training in chunks is the same as training straight through
    config = configs[0][1].replace(split="azimuth", max_steps=7)
    splits = load_splits(data_config(config))
    model_config = resolve_model_config(config, 5, 32, 1)
    train_run(config, model_config, splits.train, splits.val, tmp_path / "straight")
    chunked = load_checkpoint(Path(result.run_dir) / "last.pt")["model"]
    assert state_dicts_equal(chunked, load_checkpoint(tmp_path / "straight" / "last.pt")["model"])


def test_viewpoints_command_prints_the_table(norb_root, tmp_path, capsys):
    files = []
    for name, values in (("caps", CAPSULES), ("cnn", CNN)):
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml({**values, "data_root": str(norb_root)}))
        files.append(str(path))
    out = tmp_path / "out"
    assert main(["viewpoints", "--split", "elevation", "--familiar-error", "0.9", "--out", str(out), "--config", *files,
                 "--check-every", "2", "--max-steps", "4", "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "novel viewpoints (elevation)" in text and "caps" in text and "cnn" in text
    report = json.loads((out / "viewpoints-elevation.json").read_text())
    assert [r["label"] for r in report["results"]] == ["caps", "cnn"]
    assert all(r["novel_images"] == 80 and r["familiar_images"] == 80 for r in report["results"])
    assert np.isfinite([r["novel_error"] for r in report["results"]]).all()


@pytest.mark.parametrize("arguments, message", [
    (["--familiar-error", "2"], "--familiar-error must be between 0 and 1"),
    (["--check-every", "0"], "--check-every must be at least 1"),
    (["--models", "smallnorb", "--config", "x.toml"], "either with --models or with --config"),
    (["--dataset", "mnist"], "needs viewpoint information"),
    (["--models", "cnn-baseline", "cnn-baseline"], "the networks need different names"),
])  # fmt: skip
def test_bad_viewpoint_options_give_one_line(norb_root, tmp_path, arguments, message, capsys):
    base = ["viewpoints", "--split", "azimuth", "--familiar-error", "0.1", "--out", str(tmp_path / "o"),
            "--data-root", str(norb_root), "--no-progress"]  # fmt: skip
    assert main([*base, *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
