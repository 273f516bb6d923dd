"""Model presets, configuration objects and the routing configuration."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from matcaps.errors import ConfigError
from matcaps.layers import InputNorm
from matcaps.models import PRESETS, CapsNet, CapsNetConfig, CapsNetOutput, build_model, count_parameters, preset
from matcaps.routing import EMRoutingConfig


def test_small_smallnorb_network_has_the_ibm_parameter_count_and_map_sizes():
    model = build_model("smallnorb")
    assert count_parameters(model) == 67_154
    assert model.capsule_map_sizes() == {"primary_caps": (16, 16), "conv_caps1": (7, 7), "conv_caps2": (5, 5)}


def test_parameter_count_by_layer():
    """A = 64, B = 8, C = D = 16, 5 classes, 4×4 poses: the sum the IBM code logs."""
    model = build_model("smallnorb")
    by_layer = {name: count_parameters(layer) for name, layer in model.named_children()}
    assert by_layer == {
        "input_norm": 0,
        "conv1": 5 * 5 * 64 + 64,
        "stem": 0,  # no extra convolutions in the paper's network (stem_convs = 0)
        "conv_norms": 0,  # no batch-normalised convolutions either (conv_norm = False)
        "primary_caps": 64 * 8 * 16 + 8 * 16 + 64 * 8 + 8,
        "conv_caps1": 3 * 3 * 8 * 16 * 16 + 2 * 16,
        "conv_caps2": 3 * 3 * 16 * 16 * 16 + 2 * 16,
        "class_caps": 16 * 5 * 16 + 2 * 5,
    }


@pytest.mark.parametrize(
    "name,image_size,classes,parameters", [("hinton-large", 32, 5, 316_394), ("mnist", 28, 10, 68_444)]
)
def test_other_presets(name, image_size, classes, parameters):
    model = build_model(name)
    assert count_parameters(model) == parameters
    output = model.eval()(torch.randn(2, 1, image_size, image_size))
    assert output.activations.shape == (2, classes) and output.poses.shape == (2, classes, 4, 4)


def test_full_model_forward_and_backward_on_a_batch():
    torch.manual_seed(0)
    model = build_model("smallnorb")
    images = torch.randn(8, 1, 32, 32)
    output = model(images)
    assert output.activations.shape == (8, 5) and output.poses.shape == (8, 5, 4, 4)
    assert torch.all((output.activations > 0) & (output.activations < 1))
    target = torch.arange(8) % 5
    loss = torch.nn.functional.cross_entropy(output.activations, target) + output.poses.square().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # Every layer receives gradient (nothing is accidentally detached).
    assert all(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters() if "beta_a" not in name)


def test_config_round_trip_and_replace():
    config = preset("smallnorb", routing={"iterations": 3})
    assert config.routing.iterations == 3 and PRESETS["smallnorb"].routing.iterations == 2
    assert CapsNetConfig.from_dict(config.to_dict()) == config
    assert config.replace(conv1_channels=32).conv1_channels == 32


@pytest.mark.parametrize(
    "build",
    [
        lambda: preset("no-such-model"),
        lambda: CapsNetConfig(conv1_channels=0),
        lambda: CapsNetConfig.from_dict({"conv1_channel": 3}),
        lambda: CapsNetConfig.from_dict({"routing": {"iteration": 3}}),
        lambda: EMRoutingConfig(iterations=0),
        lambda: EMRoutingConfig(implementation="fast"),
        lambda: EMRoutingConfig(inverse_temperature_decay=1.0),
        lambda: EMRoutingConfig(variance_floor=0.0),
    ],
)
def test_invalid_configurations_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_inverse_temperature_schedule():
    config = EMRoutingConfig()
    assert [round(config.inverse_temperature(t), 8) for t in range(3)] == [5e-4, 9.75e-4, 1.42625e-3]


def test_cost_factor_of_the_three_routed_layers():
    config = EMRoutingConfig()
    assert math.isclose(config.cost_factor(3 * 3 * 8, 16), 100 * 16 / 72)  # ConvCaps1: 22.2
    assert math.isclose(config.cost_factor(3 * 3 * 16, 16), 100 * 16 / 144)  # ConvCaps2: 11.1
    assert math.isclose(config.cost_factor(5 * 5 * 16, 5), 1.25)  # ClassCaps


def test_input_norm_matches_batch_norm_without_affine():
    torch.manual_seed(0)
    ours, reference = InputNorm(2), torch.nn.BatchNorm2d(2, affine=False)
    for _ in range(3):
        images = 3 + 2 * torch.randn(6, 2, 8, 8)
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval(), reference.eval()
    images = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)


def test_model_is_deterministic_in_eval_mode():
    torch.manual_seed(0)
    model = CapsNet().eval()
    images = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        first, second = model(images), model(images)
    assert torch.equal(first.activations, second.activations)


def test_the_package_exports_its_main_names_and_hides_the_internal_ones():
    import matcaps
    import matcaps.layers

    for name in matcaps.__all__:
        assert getattr(matcaps, name) is not None, name
    assert {"CapsNet", "ConvCaps", "ClassCaps", "PrimaryCaps", "EMRoutingConfig", "em_routing", "Capsules"} <= set(matcaps.__all__)
    assert matcaps.ConvCaps is matcaps.layers.ConvCaps and matcaps.CapsNetOutput is CapsNetOutput
    assert not {"RoutedCapsules", "RoutingInputs"} & set(matcaps.layers.__all__)
    # The names load on first use: importing the package alone does not import torch.
    check = "import sys, matcaps; print('torch' in sys.modules, matcaps.__version__)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.split()[0] == "False"
