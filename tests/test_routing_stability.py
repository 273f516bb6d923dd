"""EM routing stays finite where the untreated equations break down."""

from __future__ import annotations

import pytest
import torch

from matcaps.layers import ClassCaps, ConvCaps
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig

DTYPES = [torch.float32, torch.float64]


def run_layer(layer, poses: torch.Tensor, activations: torch.Tensor) -> None:
    """Forward and backward; every output and gradient must be finite."""
    poses = poses.clone().requires_grad_()
    activations = activations.clone().requires_grad_()
    out_poses, out_activations = layer(poses, activations)
    assert torch.isfinite(out_poses).all() and torch.isfinite(out_activations).all()
    assert torch.all((out_activations >= 0) & (out_activations <= 1))
    (out_poses.square().mean() + out_activations.sum()).backward()
    for name, grad in [("poses", poses.grad), ("activations", activations.grad)] + [
        (name, p.grad) for name, p in layer.named_parameters()
    ]:
        assert grad is not None and torch.isfinite(grad).all(), f"non-finite gradient of {name}"


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parents_with_a_single_child(implementation, dtype):
    """A 1×1 kernel over one child type: every parent has exactly one child, so σ² = 0 + floor."""
    torch.manual_seed(0)
    layer = ConvCaps(1, 3, 1, 1, routing=EMRoutingConfig(iterations=3, implementation=implementation)).to(dtype)
    run_layer(layer, torch.randn(2, 4, 4, 1, 4, 4, dtype=dtype), torch.rand(2, 4, 4, 1, dtype=dtype))


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_active_child_per_window(implementation, dtype):
    torch.manual_seed(1)
    layer = ConvCaps(2, 3, 3, 2, routing=EMRoutingConfig(iterations=3, implementation=implementation)).to(dtype)
    activations = torch.zeros(2, 7, 7, 2, dtype=dtype)
    activations[:, 1::2, 1::2, 0] = 0.9  # window centres only
    run_layer(layer, torch.randn(2, 7, 7, 2, 4, 4, dtype=dtype), activations)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_kind", ["conv", "class"])
def test_all_zero_activations(implementation, dtype, layer_kind):
    routing = EMRoutingConfig(iterations=3, implementation=implementation)
    layer = ConvCaps(2, 3, 3, 1, routing=routing) if layer_kind == "conv" else ClassCaps(2, 3, routing=routing)
    layer = layer.to(dtype)
    run_layer(layer, torch.randn(2, 5, 5, 2, 4, 4, dtype=dtype), torch.zeros(2, 5, 5, 2, dtype=dtype))


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_tiny_and_huge_poses(implementation, dtype, scale):
    torch.manual_seed(2)
    layer = ConvCaps(2, 3, 3, 1, padding=1, routing=EMRoutingConfig(iterations=3, implementation=implementation)).to(dtype)
    run_layer(layer, scale * torch.randn(2, 5, 5, 2, 4, 4, dtype=dtype), torch.rand(2, 5, 5, 2, dtype=dtype))


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_identical_votes_and_tiny_activations(implementation):
    """Zero spread everywhere and activations near the float32 limit."""
    layer = ConvCaps(1, 2, 3, 1, routing=EMRoutingConfig(iterations=3, implementation=implementation))
    poses = torch.ones(1, 5, 5, 1, 4, 4)
    run_layer(layer, poses, torch.full((1, 5, 5, 1), 1e-30))


def test_bfloat16_inputs_are_routed_in_float32():
    torch.manual_seed(3)
    layer = ConvCaps(2, 3, 3, 1)
    poses, activations = torch.randn(2, 5, 5, 2, 4, 4), torch.rand(2, 5, 5, 2)
    reference_poses, reference_activations = layer(poses, activations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_poses, out_activations = layer(poses.bfloat16(), activations.bfloat16())
    assert out_poses.dtype == torch.float32
    torch.testing.assert_close(out_activations, reference_activations, rtol=0.05, atol=0.02)
    torch.testing.assert_close(out_poses, reference_poses, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_both_implementations_route_in_float32_under_autocast(implementation):
    torch.manual_seed(4)
    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation=implementation))
    other = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="naive" if implementation == "fused" else "fused"))
    other.load_state_dict(layer.state_dict())
    poses, activations = torch.randn(2, 5, 5, 2, 4, 4), torch.rand(2, 5, 5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = layer(poses, activations), other(poses, activations)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_training_works_after_inference_mode(implementation):
    """Cached geometry and the scratch pool must not become inference tensors."""
    from matcaps.models import CapsNet, preset
    from matcaps.routing import release_workspace

    release_workspace()
    config = preset("smallnorb", conv1_channels=4, primary_types=2, conv_caps1_types=2, conv_caps2_types=2)
    model = CapsNet(config.replace(routing={"implementation": implementation}))
    images = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        model.eval()(images)
    with torch.no_grad():
        model(images)
    model.train()(images).activations.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
