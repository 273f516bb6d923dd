"""Invariants of EM routing: conservation of each child's routing weight, unreached children, geometry."""

from __future__ import annotations

import pytest
import torch

from matcaps.layers import ClassCaps, ConvCaps
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig, RoutingGeometry
from matcaps.routing.blocked import trace_blocked_routing

BATCH = 2
CHILD_TYPES = 2
PARENT_TYPES = 3


def child_weight_totals(routing: torch.Tensor, side: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Sum of each child's routing weights over every parent, by explicit loops over windows.

    Args:
        routing: ``(N, L, C, K·K·B)`` routing weights of a ConvCaps layer.

    Returns:
        ``(N, side, side, B)`` totals.
    """
    n, _, _, children = routing.shape
    child_types = children // (kernel * kernel)
    out_side = (side + 2 * padding - kernel) // stride + 1
    totals = torch.zeros(n, side, side, child_types, dtype=routing.dtype)
    for oy in range(out_side):
        for ox in range(out_side):
            for ky in range(kernel):
                for kx in range(kernel):
                    y, x = oy * stride + ky - padding, ox * stride + kx - padding
                    for b in range(child_types):
                        weight = routing[:, oy * out_side + ox, :, (ky * kernel + kx) * child_types + b].sum(dim=1)
                        if 0 <= y < side and 0 <= x < side:
                            totals[:, y, x, b] += weight
                        else:
                            assert torch.all(weight == 0), "a padding slot received routing weight"
    return totals


def reached_positions(side: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``(side, side)`` bool: the child position lies in at least one window."""
    out_side = (side + 2 * padding - kernel) // stride + 1
    reached = torch.zeros(side, side, dtype=torch.bool)
    for o in range(out_side):
        for k in range(kernel):
            i = o * stride + k - padding
            if 0 <= i < side:
                reached[i, :] |= True  # rows; columns are symmetric
    return reached & reached.T


def routing_trace(layer, poses: torch.Tensor, activations: torch.Tensor, tracer: str):
    """Every iteration's state, from the straightforward implementation or from the blocked kernel."""
    if tracer == "naive":
        return layer.trace(poses, activations)
    inputs = layer.routing_inputs(poses, activations)
    return trace_blocked_routing(
        inputs.windows, inputs.transforms, inputs.child_activations, layer.beta_v, layer.beta_a,
        inputs.geometry, layer.routing, inputs.vote_offsets,
    )  # fmt: skip


TRACERS = ["naive", "blocked"]


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("side,kernel,stride,padding", [(5, 3, 1, 0), (7, 3, 2, 0), (8, 3, 2, 0), (6, 3, 2, 1), (5, 2, 2, 0)])
def test_each_child_routing_weights_sum_to_one_over_every_parent_it_reaches(side, kernel, stride, padding, tracer):
    torch.manual_seed(0)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, kernel, stride, padding, routing=EMRoutingConfig(iterations=3)).double()
    poses = torch.randn(BATCH, side, side, CHILD_TYPES, 4, 4, dtype=torch.float64)
    activations = torch.rand(BATCH, side, side, CHILD_TYPES, dtype=torch.float64)
    reached = reached_positions(side, kernel, stride, padding)
    expected = reached.to(torch.float64).view(1, side, side, 1).expand(BATCH, side, side, CHILD_TYPES)
    for iteration, state in enumerate(routing_trace(layer, poses, activations, tracer)):
        totals = child_weight_totals(state.routing.detach(), side, kernel, stride, padding)
        torch.testing.assert_close(totals, expected, rtol=0, atol=1e-12, msg=f"iteration {iteration}")
        assert torch.all(state.routing >= 0)


@pytest.mark.parametrize("tracer", TRACERS)
def test_class_caps_routing_weights_sum_to_one_per_child(tracer):
    torch.manual_seed(0)
    layer = ClassCaps(CHILD_TYPES, 5, routing=EMRoutingConfig(iterations=3)).double()
    poses = torch.randn(BATCH, 3, 3, CHILD_TYPES, 4, 4, dtype=torch.float64)
    activations = torch.rand(BATCH, 3, 3, CHILD_TYPES, dtype=torch.float64)
    for state in routing_trace(layer, poses, activations, tracer):
        totals = state.routing.sum(dim=2)  # over classes: (N, 1, H·W·D)
        torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-12)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_children_that_no_parent_reaches_do_not_influence_anything(implementation):
    """16×16 → K3/s2 reads rows and columns 0..14: the 31 positions in row or column 15 are unreached."""
    torch.manual_seed(0)
    layer = ConvCaps(CHILD_TYPES, PARENT_TYPES, 3, 2, routing=EMRoutingConfig(iterations=2, implementation=implementation)).double()
    poses = torch.randn(BATCH, 16, 16, CHILD_TYPES, 4, 4, dtype=torch.float64, requires_grad=True)
    activations = torch.rand(BATCH, 16, 16, CHILD_TYPES, dtype=torch.float64, requires_grad=True)
    unreached = ~reached_positions(16, 3, 2, 0)
    assert int(unreached.sum()) == 31
    assert int((layer.make_geometry(16, 16).parents_per_child() == 0).sum()) == 31

    out_poses, out_activations = layer(poses, activations)
    (out_poses.sum() + out_activations.sum()).backward()
    assert torch.all(poses.grad[:, unreached] == 0) and torch.all(activations.grad[:, unreached] == 0)
    assert torch.all(poses.grad[:, ~unreached].abs().sum(dim=(-1, -2, -3)) > 0)

    with torch.no_grad():
        perturbed_poses, perturbed_activations = poses.clone(), activations.clone()
        perturbed_poses[:, unreached] = 1e3
        perturbed_activations[:, unreached] = 1.0
        again_poses, again_activations = layer(perturbed_poses, perturbed_activations)
    assert torch.equal(again_poses, out_poses.detach()) and torch.equal(again_activations, out_activations.detach())


@pytest.mark.parametrize(
    "side,kernel,stride,counts",
    [
        (16, 3, 2, {0: 31, 1: 81, 2: 108, 4: 36}),  # PrimaryCaps → ConvCaps1 of the smallNORB net
        (7, 3, 1, {1: 4, 2: 8, 3: 12, 4: 4, 6: 12, 9: 9}),  # ConvCaps1 → ConvCaps2
    ],
)
def test_parents_per_child_of_the_smallnorb_layers(side, kernel, stride, counts):
    geometry = RoutingGeometry.conv(side, side, kernel, stride)
    per_child = geometry.parents_per_child()
    assert dict(zip(*[v.tolist() for v in per_child.unique(return_counts=True)])) == counts
    # Each window slot reads one child, so the counts add up to the links.
    assert int(per_child.sum()) == geometry.num_windows * kernel * kernel


def test_initial_assignment_splits_each_child_evenly_over_its_parents():
    geometry = RoutingGeometry.conv(7, 7, 3, 2, padding=1)
    prior = geometry.initial_assignment(child_types=2, parent_types=3, dtype=torch.float64)  # (L, 1, S·B)
    totals = geometry.scatter_sum(prior.expand(-1, 3, -1).sum(dim=1).view(1, geometry.num_windows, 9, 2))[0]
    torch.testing.assert_close(totals[:-1], torch.ones(49, 2, dtype=torch.float64))
    assert torch.all(totals[-1] == 0)  # padding slots carry no weight


def test_geometry_rejects_a_kernel_that_does_not_fit():
    from matcaps.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit a 2x2"):
        RoutingGeometry.conv(2, 2, 3, 1)
    with pytest.raises(ConfigError, match="stride 0"):
        RoutingGeometry.conv(5, 5, 3, 0)
