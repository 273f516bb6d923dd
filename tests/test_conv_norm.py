"""``conv_norm``: batch-normalised ordinary convolutions (FeatureNorm), and bool model options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from train_support import train_resume_and_test_tiny_mnist

from matcaps.cli import main
from matcaps.errors import ConfigError
from matcaps.layers import FeatureNorm
from matcaps.models import build_model
from matcaps.models.config import CapsNetConfig

#: A small capsule network (few types) so the tests run in a moment.
SMALL = dict(num_classes=3, image_size=16, conv1_channels=8, primary_types=2, conv_caps1_types=2, conv_caps2_types=2)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("float64_statistics", [False, True], ids=["native", "float64 sums (as across processes)"])
def test_feature_norm_is_torch_batch_norm_in_training_and_in_eval(float64_statistics):
    """Outputs, gradients (input, γ, β) and running statistics against ``torch.nn.BatchNorm2d``."""
    torch.manual_seed(0)
    ours, reference = FeatureNorm(3).double(), torch.nn.BatchNorm2d(3).double()
    ours.float64_statistics = float64_statistics
    with torch.no_grad():
        for norm in (ours, reference):
            norm.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            norm.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    for _ in range(3):  # three training batches move the running statistics
        features = (2 + 3 * torch.randn(5, 3, 4, 4, dtype=torch.float64)).requires_grad_()
        weights = torch.randn(5, 3, 4, 4, dtype=torch.float64)
        grads = []
        for norm in (ours, reference):
            norm.zero_grad()
            output = norm(features)
            grads.append((output, *torch.autograd.grad((output * weights).sum(), (features, norm.weight, norm.bias))))
        for mine, theirs in zip(*grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, reference.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    features = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(features), reference.eval()(features), rtol=1e-12, atol=1e-12)


def test_feature_norm_learns_a_scale_and_a_shift_and_checks_its_channels():
    norm = FeatureNorm(4)
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    with pytest.raises(Exception, match=r"FeatureNorm\(4\) expects images \(N, 4, H, W\), got \(2, 3, 5, 5\)"):
        norm(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("stem_convs", [0, 2])
def test_each_normalised_convolution_trades_its_bias_for_a_scale_and_a_shift(stem_convs):
    torch.manual_seed(0)
    plain = build_model(CapsNetConfig(**SMALL, stem_convs=stem_convs))
    normed = build_model(CapsNetConfig(**SMALL, stem_convs=stem_convs, conv_norm=True))
    channels = SMALL["conv1_channels"]
    assert count(normed) - count(plain) == (1 + stem_convs) * channels  # + 2A (γ, β) − A (bias)
    assert normed.conv1.bias is None and all(conv.bias is None for conv in normed.stem)
    assert len(normed.conv_norms) == 1 + stem_convs and len(plain.conv_norms) == 0
    assert not any(key.startswith("conv_norms.") for key in plain.state_dict())
    assert normed.capsule_map_sizes() == plain.capsule_map_sizes()


def test_the_primary_capsules_see_relu_of_normalised_convolutions():
    """Written out with ``F.conv2d`` and ``F.batch_norm`` on the running statistics (eval mode)."""
    torch.manual_seed(1)
    model = build_model(CapsNetConfig(**SMALL, stem_convs=1, conv_norm=True)).double()
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for norm in model.conv_norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    seen = {}
    model.primary_caps.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    model(images)

    def normalise(x, norm):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=1e-5)

    expected = model.input_norm(images)
    expected = torch.relu(normalise(F.conv2d(expected, model.conv1.weight, None, stride=2, padding=2), model.conv_norms[0]))
    expected = torch.relu(normalise(F.conv2d(expected, model.stem[0].weight, None, padding=1), model.conv_norms[1]))
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-12)


def test_in_training_the_features_are_normalised_over_the_batch():
    torch.manual_seed(2)
    model = build_model(CapsNetConfig(**SMALL, conv_norm=True)).double().train()
    seen = {}
    model.conv_norms[0].register_forward_hook(lambda module, inputs, output: seen.update(y=output))
    model(torch.randn(6, 1, 16, 16, dtype=torch.float64) * 5 + 3)
    mean, variance = seen["y"].mean(dim=(0, 2, 3)), seen["y"].var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)  # γ = 1, β = 0 at the start
    torch.testing.assert_close(variance, torch.ones_like(variance), rtol=0, atol=1e-3)  # ε = 1e-5


@pytest.mark.parametrize("option", ["conv_norm", "coordinate_addition", "input_norm"])
@pytest.mark.parametrize("value", [2, "yes", None])
def test_a_bool_option_that_is_not_true_or_false_is_refused_in_one_line(option, value):
    with pytest.raises(ConfigError, match=f"^model option {option} must be true or false, got {value!r}$"):
        CapsNetConfig(**{option: value})


def test_a_run_with_normalised_convolutions_trains_tests_and_resumes(tmp_path, capsys, single_thread):
    run, common = train_resume_and_test_tiny_mnist(tmp_path, ["conv_norm=true", "stem_convs=1", "conv1_channels=8"])
    assert json.loads((run / "run.json").read_text())["model_config"]["conv_norm"] is True
    capsys.readouterr()
    assert main(["train", "--dataset", "mnist", "--model-option", "conv_norm=maybe", "--val-size", "10", *common,
                 "--run-dir", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [
        "matcaps train: error: model option conv_norm must be true or false, got 'maybe'"]
    assert not (tmp_path / "bad").exists()
