"""The E-step scales ``τ_t`` (``EMRoutingConfig.e_step_scales``): every implementation against the
loop-by-loop reference and against autograd, the paper's routing untouched at ``τ = 1``, and the
option's validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_reference import Constants, class_caps_links, conv_caps_links, em_route
from matcaps.errors import ConfigError
from matcaps.layers import ClassCaps, ConvCaps
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig
from routing_support import assert_relatively_close, outputs_and_gradients

#: Scales of the E-steps of 3 iterations: the second softened (the curriculum's case), both
#: changed, and the first sharpened with the second left at 1.
SCALES = [(1.0, 0.2), (0.3, 0.6), (2.5,)]
HAND_WRITTEN = [impl for impl in ROUTING_IMPLEMENTATIONS if impl != "naive"]


def conv_case(scales: tuple[float, ...], implementation: str) -> tuple[ConvCaps, torch.Tensor, torch.Tensor]:
    """A K3/s2 convolutional capsule layer (3 iterations, β ~ N(0, 1)) and a random float64 input."""
    torch.manual_seed(5)
    routing = EMRoutingConfig(iterations=3, implementation=implementation, e_step_scales=scales)
    layer = ConvCaps(2, 3, 3, 2, 0, routing=routing).double()
    with torch.no_grad():
        layer.beta_a.normal_(0.0, 1.0)
        layer.beta_v.normal_(0.0, 1.0)
    generator = torch.Generator().manual_seed(6)
    poses = torch.randn(2, 7, 7, 2, 4, 4, generator=generator, dtype=torch.float64)
    activations = torch.rand(2, 7, 7, 2, generator=generator, dtype=torch.float64)
    return layer, poses, activations


def conv_reference(layer: ConvCaps, poses: torch.Tensor, activations: torch.Tensor, sample: int, scales: tuple):
    votes, _ = conv_caps_links(poses[sample].numpy(), layer.weight.detach().numpy(), 3, 2, 0)
    child_activation = {(y, x, b): float(activations[sample, y, x, b]) for y in range(7) for x in range(7) for b in range(2)}
    return em_route(
        votes, child_activation, 3, 9 * 2, layer.beta_v.detach().numpy(), layer.beta_a.detach().numpy(),
        Constants(iterations=3, e_step_scales=scales),
    )  # fmt: skip


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("scales", SCALES)
def test_conv_caps_match_the_loop_reference(implementation, scales):
    layer, poses, activations = conv_case(scales, implementation)
    out_poses, out_activations = layer(poses, activations)
    for sample in range(2):
        trace = conv_reference(layer, poses, activations, sample, scales)
        paper = conv_reference(layer, poses, activations, sample, ())
        moved = max(abs(trace.activation[-1][j] - paper.activation[-1][j]) for j in paper.activation[-1])
        assert moved > 1e-3, "the scales must change the reference's result, or this test could not fail"
        for ((oy, ox), c), mean in trace.mean[-1].items():
            np.testing.assert_allclose(out_poses[sample, oy, ox, c].reshape(-1).detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(out_activations[sample, oy, ox, c].item(), trace.activation[-1][((oy, ox), c)], rtol=1e-9)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_class_caps_match_the_loop_reference(implementation):
    scales = (0.5, 0.25)
    torch.manual_seed(7)
    routing = EMRoutingConfig(iterations=3, implementation=implementation, e_step_scales=scales)
    layer = ClassCaps(2, 4, routing=routing).double()
    with torch.no_grad():
        layer.beta_a.normal_(0.0, 1.0)
        layer.beta_v.normal_(0.0, 1.0)
    poses = torch.randn(2, 3, 4, 2, 4, 4, dtype=torch.float64)
    activations = torch.rand(2, 3, 4, 2, dtype=torch.float64)
    out_poses, out_activations = layer(poses, activations)
    for sample in range(2):
        votes = class_caps_links(poses[sample].numpy(), layer.weight.detach().numpy(), True)
        child_activation = {(y, x, d): float(activations[sample, y, x, d]) for y in range(3) for x in range(4) for d in range(2)}
        trace = em_route(
            votes, child_activation, 4, 3 * 4 * 2, layer.beta_v.detach().numpy(), layer.beta_a.detach().numpy(),
            Constants(iterations=3, e_step_scales=scales),
        )  # fmt: skip
        for (_, c), mean in trace.mean[-1].items():
            np.testing.assert_allclose(out_poses[sample, c].reshape(-1).detach(), mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(out_activations[sample, c].item(), trace.activation[-1][(0, c)], rtol=1e-9)


@pytest.mark.parametrize("implementation", HAND_WRITTEN)
@pytest.mark.parametrize("scales", SCALES)
def test_hand_written_gradients_equal_autograd_of_the_naive_routing(implementation, scales):
    layer, poses, activations = conv_case(scales, implementation)
    naive, _, _ = conv_case(scales, "naive")
    naive.load_state_dict(layer.state_dict())
    got, expected = outputs_and_gradients(layer, poses, activations), outputs_and_gradients(naive, poses, activations)
    paper_layer, _, _ = conv_case((), "naive")
    paper_layer.load_state_dict(layer.state_dict())
    paper = outputs_and_gradients(paper_layer, poses, activations)
    assert_relatively_close(got, expected, 1e-9)
    assert (paper["grad weight"] - expected["grad weight"]).abs().max() > 1e-6 * expected["grad weight"].abs().max()


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_scales_of_one_are_the_papers_routing_bit_for_bit(implementation):
    layer, poses, activations = conv_case((), implementation)
    ones, _, _ = conv_case((1.0, 1.0), implementation)
    ones.load_state_dict(layer.state_dict())
    paper, explicit = outputs_and_gradients(layer, poses, activations), outputs_and_gradients(ones, poses, activations)
    for name, value in paper.items():
        assert torch.equal(explicit[name], value), name


def test_likelihood_scale_reads_the_entries_and_defaults_to_one():
    config = EMRoutingConfig(iterations=3, e_step_scales=[1, 0.2])  # a list, as from a configuration file
    assert config.e_step_scales == (1, 0.2)
    assert [config.likelihood_scale(t) for t in range(3)] == [1.0, 0.2, 1.0]
    assert EMRoutingConfig().likelihood_scale(0) == 1.0


@pytest.mark.parametrize(
    "value,message",
    [
        ((1.0, 0.0), "positive numbers"),
        ((-0.5,), "positive numbers"),
        ((float("inf"),), "positive numbers"),
        ((True,), "positive numbers"),
        (("soft",), "positive numbers"),
        (0.2, "list of positive numbers"),
        ((1.0, 0.5, 0.2), "at most 2"),
    ],
)
def test_invalid_scales_raise_one_clear_line(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        EMRoutingConfig(iterations=3, e_step_scales=value)
    assert "\n" not in str(error.value)
