"""The vectorised routing against the loop-by-loop reference in ``em_reference.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_reference import Constants, class_caps_links, conv_caps_links, em_route
from matcaps.layers import ClassCaps, ConvCaps
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig

BATCH = 2
CHILD_TYPES = 2
PARENT_TYPES = 3

# (child map side, kernel, stride, padding): stride 1 and 2, with and without padding,
# including maps whose last row/column no window reads (7 with K3/s2 reaches rows 0..6,
# 6 with K3/s2 leaves row 5 unread) and non-overlapping windows (K2/s2).
CONV_CASES = [(5, 3, 1, 0), (6, 3, 2, 0), (7, 3, 2, 0), (4, 3, 1, 1), (6, 3, 2, 1), (5, 2, 2, 0)]


def random_capsules(side: int, types: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    poses = torch.randn(BATCH, side, side, types, 4, 4, generator=generator, dtype=dtype)
    activations = torch.rand(BATCH, side, side, types, generator=generator, dtype=dtype)
    return poses, activations


def child_activation_map(activations: np.ndarray) -> dict:
    height, width, types = activations.shape
    return {(y, x, b): float(activations[y, x, b]) for y in range(height) for x in range(width) for b in range(types)}


def conv_reference(layer: ConvCaps, poses: torch.Tensor, activations: torch.Tensor, sample: int):
    votes, out_size = conv_caps_links(
        poses[sample].double().numpy(), layer.weight.detach().double().numpy(), layer.kernel_size, layer.stride, layer.padding
    )
    trace = em_route(
        votes,
        child_activation_map(activations[sample].double().numpy()),
        layer.out_types,
        layer.kernel_size**2 * layer.in_types,
        layer.beta_v.detach().double().numpy(),
        layer.beta_a.detach().double().numpy(),
        Constants(iterations=layer.routing.iterations),
    )
    return trace, out_size


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("side,kernel,stride,padding", CONV_CASES)
def test_conv_caps_outputs_match_reference(implementation, iterations, side, kernel, stride, padding):
    torch.manual_seed(side * 100 + kernel * 10 + stride + padding)
    routing = EMRoutingConfig(iterations=iterations, implementation=implementation)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, kernel, stride, padding, routing=routing).double()
    poses, activations = random_capsules(side, CHILD_TYPES, torch.float64, seed=iterations)
    out_poses, out_activations = layer(poses, activations)
    for sample in range(BATCH):
        trace, (out_h, out_w) = conv_reference(layer, poses, activations, sample)
        assert out_activations.shape == (BATCH, out_h, out_w, PARENT_TYPES)
        for (position, parent_type), mean in trace.mean[-1].items():
            oy, ox = position
            np.testing.assert_allclose(out_poses[sample, oy, ox, parent_type].reshape(-1).detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(
                out_activations[sample, oy, ox, parent_type].item(), trace.activation[-1][(position, parent_type)], rtol=1e-9
            )


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_conv_caps_float32_matches_reference_to_1e5(implementation):
    torch.manual_seed(0)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, 3, 2, 0, routing=EMRoutingConfig(iterations=3, implementation=implementation))
    poses, activations = random_capsules(7, CHILD_TYPES, torch.float32, seed=1)
    out_poses, out_activations = layer(poses, activations)
    trace, _ = conv_reference(layer, poses, activations, 0)
    for ((oy, ox), parent_type), mean in trace.mean[-1].items():
        np.testing.assert_allclose(out_poses[0, oy, ox, parent_type].reshape(-1).detach(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            out_activations[0, oy, ox, parent_type].item(), trace.activation[-1][((oy, ox), parent_type)], atol=1e-5
        )


@pytest.mark.parametrize("side,kernel,stride,padding", CONV_CASES)
def test_conv_caps_every_iteration_matches_reference(side, kernel, stride, padding):
    """Means, variances, activations and routing weights of every iteration."""
    torch.manual_seed(1)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, kernel, stride, padding, routing=EMRoutingConfig(iterations=3)).double()
    poses, activations = random_capsules(side, CHILD_TYPES, torch.float64, seed=2)
    trace = layer.trace(poses, activations)
    reference, (_, out_w) = conv_reference(layer, poses, activations, 0)
    assert len(trace) == 3
    for t, state in enumerate(trace):
        for ((oy, ox), c), mean in reference.mean[t].items():
            window = oy * out_w + ox
            np.testing.assert_allclose(state.mean[0, window, c].detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(state.variance[0, window, c].detach(), reference.variance[t][((oy, ox), c)], rtol=1e-9)
            np.testing.assert_allclose(state.activations[0, window, c].item(), reference.activation[t][((oy, ox), c)], rtol=1e-9)
        for (((oy, ox), c), (y, x, b)), weight in reference.routing[t].items():
            slot = (y - oy * stride + padding) * kernel + (x - ox * stride + padding)
            child = slot * CHILD_TYPES + b
            np.testing.assert_allclose(state.routing[0, oy * out_w + ox, c, child].item(), weight, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("coordinate_addition", [True, False])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_class_caps_matches_reference(implementation, coordinate_addition, iterations):
    torch.manual_seed(iterations)
    routing = EMRoutingConfig(iterations=iterations, implementation=implementation)
    layer = ClassCaps(CHILD_TYPES, 4, routing=routing, coordinate_addition=coordinate_addition).double()
    poses = torch.randn(BATCH, 3, 4, CHILD_TYPES, 4, 4, dtype=torch.float64)
    activations = torch.rand(BATCH, 3, 4, CHILD_TYPES, dtype=torch.float64)
    out_poses, out_activations = layer(poses, activations)
    assert out_poses.shape == (BATCH, 4, 4, 4) and out_activations.shape == (BATCH, 4)
    for sample in range(BATCH):
        votes = class_caps_links(poses[sample].numpy(), layer.weight.detach().numpy(), coordinate_addition)
        trace = em_route(
            votes,
            child_activation_map(activations[sample].numpy()),
            4,
            3 * 4 * CHILD_TYPES,
            layer.beta_v.detach().numpy(),
            layer.beta_a.detach().numpy(),
            Constants(iterations=iterations),
        )
        for (_, c), mean in trace.mean[-1].items():
            np.testing.assert_allclose(out_poses[sample, c].reshape(-1).detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(out_activations[sample, c].item(), trace.activation[-1][(0, c)], rtol=1e-9)


def test_coordinate_addition_changes_only_translation_entries():
    layer = ClassCaps(1, 2, routing=EMRoutingConfig(iterations=1)).double()
    offsets = layer.coordinate_offsets(5, 5, torch.device("cpu"), torch.float64).view(5, 5, 4, 4)
    expected_steps = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    torch.testing.assert_close(offsets[2, :, 0, 3], expected_steps)  # column coordinate along a row
    torch.testing.assert_close(offsets[:, 2, 1, 3], expected_steps)  # row coordinate along a column
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = mask[1, 3] = True
    assert torch.all(offsets[:, :, ~mask] == 0)


@pytest.mark.parametrize("side,kernel,stride,padding", [(6, 3, 2, 1), (5, 2, 2, 0)])
def test_trace_on_map_places_every_iteration_on_the_capsule_maps(side, kernel, stride, padding):
    """``routing[n, oy, ox, c, y, x, b]`` is the reference weight of child (y, x, b) for parent (oy, ox, c), else 0."""
    torch.manual_seed(2)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, kernel, stride, padding, routing=EMRoutingConfig(iterations=2)).double()
    poses, activations = random_capsules(side, CHILD_TYPES, torch.float64, seed=3)
    trace = layer.trace_on_map(poses, activations)
    reference, (out_h, out_w) = conv_reference(layer, poses, activations, 1)
    assert len(trace) == 2
    for t, state in enumerate(trace):
        assert state.routing.shape == (BATCH, out_h, out_w, PARENT_TYPES, side, side, CHILD_TYPES)
        expected = np.zeros(state.routing.shape[1:])
        for (((oy, ox), c), (y, x, b)), weight in reference.routing[t].items():
            expected[oy, ox, c, y, x, b] = weight
        np.testing.assert_allclose(state.routing[1].detach(), expected, rtol=1e-9, atol=1e-12)
        for ((oy, ox), c), mean in reference.mean[t].items():
            np.testing.assert_allclose(state.mean[1, oy, ox, c].reshape(-1).detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(state.variance[1, oy, ox, c].reshape(-1).detach(), reference.variance[t][((oy, ox), c)], rtol=1e-9)
            np.testing.assert_allclose(state.activations[1, oy, ox, c].item(), reference.activation[t][((oy, ox), c)], rtol=1e-9)


def test_class_caps_trace_on_map_has_the_layout_of_its_outputs():
    layer = ClassCaps(CHILD_TYPES, 4, routing=EMRoutingConfig(iterations=2)).double()
    poses, activations = random_capsules(3, CHILD_TYPES, torch.float64, seed=4)
    last = layer.trace_on_map(poses, activations)[-1]
    out_poses, out_activations = layer(poses, activations)
    assert last.routing.shape == (BATCH, 4, 3, 3, CHILD_TYPES)
    torch.testing.assert_close(last.mean, out_poses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last.activations, out_activations, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last.routing.sum(dim=1), torch.ones(BATCH, 3, 3, CHILD_TYPES, dtype=torch.float64))
