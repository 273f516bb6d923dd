"""``--lr-scale GROUP=FACTOR``: a learning-rate factor per kind of parameter."""

from __future__ import annotations

import json

import pytest
import torch

from matcaps.cli import main
from matcaps.errors import ConfigError
from matcaps.models import build_model
from matcaps.models.cnn import CNNBaselineConfig
from matcaps.models.config import CapsNetConfig
from matcaps.train.checkpoint import load_checkpoint
from matcaps.train.config import TrainConfig
from matcaps.train.param_groups import LR_GROUPS, optimizer_groups, parameter_groups
from matcaps.tomlread import tomllib

#: A small capsule network (few types) so the tests run in a moment.
SMALL = dict(num_classes=3, image_size=16, conv1_channels=8, primary_types=2, conv_caps1_types=2, conv_caps2_types=2)
ROUTED = ("conv_caps1", "conv_caps2", "class_caps")


def test_every_parameter_is_in_exactly_one_group_named_by_what_it_is():
    model = build_model(CapsNetConfig(**SMALL, stem_convs=1))
    groups = parameter_groups(model)
    assert list(groups) == list(LR_GROUPS)
    names = {id(p): name for name, p in model.named_parameters()}
    by_group = {group: sorted(names[id(p)] for p in params) for group, params in groups.items()}
    assert by_group["transforms"] == sorted(f"{layer}.weight" for layer in ROUTED)
    assert by_group["beta_a"] == sorted(f"{layer}.beta_a" for layer in ROUTED)
    assert by_group["beta_v"] == sorted(f"{layer}.beta_v" for layer in ROUTED)
    assert sorted(sum(by_group.values(), [])) == sorted(names.values())  # a partition: nothing twice, nothing lost
    assert "stem.0.weight" in by_group["features"] and "conv1.weight" in by_group["features"]


def test_the_cnn_has_only_features():
    cnn = build_model(CNNBaselineConfig(num_classes=3, image_size=16))
    assert list(parameter_groups(cnn)) == ["features"]


def test_without_factors_the_optimizer_keeps_one_group():
    model = build_model(CapsNetConfig(**SMALL))
    (group,) = optimizer_groups(model, 3e-3, {})
    assert group["lr"] == 3e-3 and len(group["params"]) == len(list(model.parameters()))


def test_adams_first_step_moves_each_group_by_its_own_learning_rate():
    """Adam's first step is ``−lr · g / (|g| + ε)`` (bias corrections cancel): written out per parameter."""
    torch.manual_seed(0)
    model = build_model(CapsNetConfig(**SMALL)).double()
    scales = {"transforms": 10.0, "beta_a": 1000.0, "features": 0.5}
    optimizer = torch.optim.Adam(optimizer_groups(model, 1e-3, scales), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(4, 1, 16, 16, dtype=torch.float64)).activations.square().sum().backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        routed = name.split(".")[0] in ROUTED
        scale = (scales["transforms"] if routed and leaf == "weight" else scales["beta_a"] if leaf == "beta_a"
                 else 1.0 if leaf == "beta_v" else scales["features"])  # fmt: skip
        g = gradients[name]
        expected = before[name] - 1e-3 * scale * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("scales", "message"),
    [({"conv1": 2.0}, "unknown parameter group 'conv1'; choose from features, transforms, beta_a, beta_v"),
     ({"transforms": 0.0}, "the factor of transforms must be a positive number, got 0.0"),
     ({"beta_a": float("inf")}, "the factor of beta_a must be a positive number, got inf"),
     ({"beta_v": "2"}, "the factor of beta_v must be a positive number, got '2'")],
)  # fmt: skip
def test_bad_factors_are_refused_in_one_line(scales, message):
    with pytest.raises(ConfigError, match=f"^option lr_scales: {message}$".replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(lr_scales=scales)


@pytest.fixture
def tiny_mnist(tiny_mnist_run):
    """The prepared tiny MNIST of the shared ``tiny_mnist_run`` fixture."""
    return tiny_mnist_run[1]


def test_a_run_with_factors_saves_them_resumes_with_its_groups_and_refuses_new_ones(tmp_path, tiny_mnist, capsys,
                                                                                     single_thread):
    run = tmp_path / "run"
    common = ["--data-root", str(tiny_mnist), "--no-progress", "--workers", "0"]
    assert main(["train", "--dataset", "mnist", "--model-option", "conv1_channels=8", "--lr-scale", "transforms=10",
                 "--lr-scale", "beta_a=1e3", "--val-size", "10", "--batch-size", "5", "--max-steps", "2",
                 "--log-every", "1", "--run-dir", str(run), *common]) == 0  # fmt: skip
    assert ("learning rate per parameter group: features 0.003 (x1), transforms 0.03 (x10), beta_a 3 (x1000), "
            "beta_v 0.003 (x1)") in capsys.readouterr().out
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["lr_scales"] == {"transforms": 10.0, "beta_a": 1000.0}
    groups = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert [(g["group"], g["lr_scale"]) for g in groups] == [
        ("features", 1.0), ("transforms", 10.0), ("beta_a", 1000.0), ("beta_v", 1.0)]
    assert main(["train", "--resume", str(run), "--max-steps", "3", *common]) == 0
    groups = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert len(lrs) == 3 and all(lr == pytest.approx(3e-3, rel=1e-3) for lr in lrs)  # the unscaled schedule is logged
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr-scale", "transforms=3", *common]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "matcaps train: error: --resume continues a run with its saved configuration; do not combine it with "
        "--config, --model-option or --lr-scale"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--lr-scale", "transforms"], "--lr-scale expects GROUP=FACTOR, got 'transforms'"),
     (["--lr-scale", "transforms=fast"], "--lr-scale transforms: the factor must be a number, got 'fast'"),
     (["--lr-scale", "gates=2"], "--lr-scale: unknown parameter group 'gates'; choose from features, transforms, "
                                 "beta_a, beta_v"),
     (["--lr-scale", "beta_v=-1"], "--lr-scale: the factor of beta_v must be a positive number, got -1.0"),
     (["--model", "cnn-baseline", "--lr-scale", "transforms=2"],
      "option lr_scales: transforms are capsule parameters; cnn-baseline has only features")],
)  # fmt: skip
def test_bad_flags_end_in_one_line_and_write_nothing(tmp_path, tiny_mnist, capsys, flags, message):
    run = tmp_path / "bad"
    assert main(["train", "--dataset", "mnist", "--data-root", str(tiny_mnist), "--no-progress", "--workers", "0",
                 "--val-size", "10", "--run-dir", str(run), *flags]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [f"matcaps train: error: {message}"]
    assert not run.exists()
