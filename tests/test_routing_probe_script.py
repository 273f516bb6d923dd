"""``scripts/routing_probe.py``: a trained network's validation accuracy under other routing settings."""

from __future__ import annotations

import json

import pytest

from matcaps.data import load_splits
from matcaps.scoring import evaluate_model
from matcaps.train.config import data_config
from matcaps.trained import load_trained



def test_the_saved_routing_scores_as_the_trained_network_and_other_settings_are_listed(routing_probe, trained_run, data_root, tmp_path):
    out = tmp_path / "probe.json"
    argv = [str(trained_run), "--data-root", str(data_root), "--setting", "iterations=2",
            "--setting", "iterations=3 e_step_scales=[1,0.2]", "--implementation", "naive", "--out", str(out)]  # fmt: skip
    assert routing_probe.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["setting"] for r in report["results"]] == [{"iterations": 2}, {"iterations": 3, "e_step_scales": [1, 0.2]}]
    network = load_trained(trained_run)
    assert network.model_config.routing.iterations == 2
    val = load_splits(data_config(network.config, root=data_root)).val
    counts = evaluate_model(network.model, val, network.model_config.num_classes)
    assert report["results"][0]["images"] == counts.total == len(val)
    assert report["results"][0]["accuracy"] == int(counts.confusion.diagonal().sum()) / counts.total
    assert 0.0 <= report["results"][1]["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("iterations=3 e_step_scales=[1,0.2,3]", "at most 2 E-steps run"),
        ("iterations=3 e_step_scales=[1,-1]", "must be a list of positive numbers"),
    ],
)
def test_a_bad_setting_is_one_line_and_writes_nothing(routing_probe, trained_run, data_root, tmp_path, capsys, setting, message):
    out = tmp_path / "probe.json"
    assert routing_probe.main([str(trained_run), "--data-root", str(data_root), "--setting", setting, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("routing_probe.py: error: ") and message in error
    assert not out.exists()
