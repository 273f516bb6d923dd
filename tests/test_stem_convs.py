"""``stem_convs``: extra 3×3 convolutions between the first convolution and the primary capsules."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from train_support import train_resume_and_test_tiny_mnist

from matcaps.cli import main
from matcaps.errors import ConfigError
from matcaps.models import build_model
from matcaps.models.config import CapsNetConfig, preset
from matcaps.train.checkpoint import network_differences

#: A small capsule network (few types) so the tests run in a moment.
SMALL = dict(num_classes=3, image_size=16, conv1_channels=8, primary_types=2, conv_caps1_types=2, conv_caps2_types=2)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stem_convs", [1, 2])
def test_each_extra_convolution_adds_9a2_plus_a_parameters_and_keeps_the_capsule_maps(stem_convs):
    torch.manual_seed(0)
    plain = build_model(CapsNetConfig(**SMALL))
    deeper = build_model(CapsNetConfig(**SMALL, stem_convs=stem_convs))
    channels = SMALL["conv1_channels"]
    assert count(deeper) - count(plain) == stem_convs * (9 * channels**2 + channels)
    assert deeper.capsule_map_sizes() == plain.capsule_map_sizes()
    output = deeper(torch.randn(2, 1, 16, 16))
    assert output.activations.shape == (2, 3) and output.poses.shape == (2, 3, 4, 4)


def test_the_paper_network_has_no_stem_and_draws_the_same_weights():
    torch.manual_seed(3)
    default = build_model(CapsNetConfig(**SMALL)).state_dict()
    torch.manual_seed(3)
    zero = build_model(CapsNetConfig(**SMALL, stem_convs=0)).state_dict()
    assert not any(key.startswith("stem.") for key in default)
    assert default.keys() == zero.keys() and all(torch.equal(default[k], zero[k]) for k in default)
    saved = preset("mnist").to_dict()
    del saved["stem_convs"]  # a checkpoint written before the option existed
    assert network_differences(saved, preset("mnist").to_dict()) == []
    assert network_differences(saved, dataclasses.replace(preset("mnist"), stem_convs=1).to_dict()) == ["stem_convs"]


def test_the_primary_capsules_see_relu_convolutions_of_the_first_features():
    torch.manual_seed(1)
    model = build_model(CapsNetConfig(**SMALL, stem_convs=2)).eval()
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    model = model.double()
    seen = {}

    def keep_input(module, inputs, output) -> None:
        seen["x"] = inputs[0]

    model.primary_caps.register_forward_hook(keep_input)
    model(images)
    expected = torch.relu(model.conv1(model.input_norm(images)))
    for conv in model.stem:  # written out: 3×3, stride 1, padding 1
        expected = torch.relu(F.conv2d(expected, conv.weight, conv.bias, stride=1, padding=1))
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-12)


def test_the_stem_learns():
    torch.manual_seed(2)
    model = build_model(CapsNetConfig(**SMALL, stem_convs=1))
    model(torch.randn(4, 1, 16, 16)).activations.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stem.parameters())


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_count_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=f"model option stem_convs must be a non-negative integer, got {value!r}"):
        CapsNetConfig(stem_convs=value)


def test_a_run_with_a_deeper_stem_trains_tests_and_resumes(tmp_path, capsys, single_thread):
    run, common = train_resume_and_test_tiny_mnist(tmp_path, ["stem_convs=1", "conv1_channels=8"])
    assert json.loads((run / "run.json").read_text())["model_config"]["stem_convs"] == 1
    capsys.readouterr()
    assert main(["train", "--dataset", "mnist", "--model-option", "stem_convs=-2", "--val-size", "10", *common,
                 "--run-dir", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [
        "matcaps train: error: model option stem_convs must be a non-negative integer, got -2"]
