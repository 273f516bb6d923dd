"""Gradients of EM routing: gradcheck in float64, and the fused backward against autograd."""

from __future__ import annotations

import pytest
import torch

from matcaps.errors import UnsupportedOperationError
from matcaps.layers import ClassCaps, ConvCaps
from matcaps.models import CapsNet, preset
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig, RoutingGeometry, em_routing, route_capsules


def tiny_inputs(side: int, child_types: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    poses = torch.randn(1, side, side, child_types, 4, 4, generator=generator, dtype=torch.float64)
    # Activations away from 0 keep the routing smooth enough for finite differences.
    activations = 0.2 + 0.6 * torch.rand(1, side, side, child_types, generator=generator, dtype=torch.float64)
    return poses.requires_grad_(), activations.requires_grad_()


def fast_for_the_interpreter(implementation: str) -> bool:
    """gradcheck's fast mode (one random projection of the Jacobian) for the Triton kernel.

    The full check runs two forward passes per input element, minutes under Triton's
    interpreter; the fast mode compares ``vᵀ J u`` for random ``u``, ``v`` with two.
    """
    return implementation == "triton"


def with_large_betas(layer):
    """β values that make parent activations depend visibly on the cost (default β_a ≈ −1000 saturates)."""
    with torch.no_grad():
        layer.beta_a.normal_(0.0, 1.0)
        layer.beta_v.normal_(0.0, 1.0)
    return layer


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", [0, 1])
def test_conv_caps_gradcheck(implementation, padding):
    torch.manual_seed(3)
    routing = EMRoutingConfig(iterations=3, implementation=implementation, final_inverse_temperature=1.0)
    layer = with_large_betas(ConvCaps(1, 2, 2, 1, padding, routing=routing).double())
    poses, activations = tiny_inputs(3, 1, seed=padding)

    def function(poses, activations, weight, beta_a, beta_v):
        layer.weight, layer.beta_a, layer.beta_v = weight, beta_a, beta_v
        return layer.forward(poses, activations)

    parameters = [torch.nn.Parameter(p.detach().clone()) for p in (layer.weight, layer.beta_a, layer.beta_v)]
    assert torch.autograd.gradcheck(
        function, (poses, activations, *parameters), eps=1e-6, atol=1e-5, rtol=1e-4,
        fast_mode=fast_for_the_interpreter(implementation),
    )  # fmt: skip


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_class_caps_with_coordinate_addition_gradcheck(implementation):
    torch.manual_seed(4)
    routing = EMRoutingConfig(iterations=2, implementation=implementation, final_inverse_temperature=1.0)
    layer = with_large_betas(ClassCaps(1, 2, routing=routing).double())
    poses, activations = tiny_inputs(2, 1, seed=5)

    def function(poses, activations, weight):
        layer.weight = weight
        return layer.forward(poses, activations)

    weight = torch.nn.Parameter(layer.weight.detach().clone())
    assert torch.autograd.gradcheck(
        function, (poses, activations, weight), eps=1e-6, atol=1e-5, rtol=1e-4,
        fast_mode=fast_for_the_interpreter(implementation),
    )  # fmt: skip


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_em_routing_on_votes_gradcheck(implementation):
    """The routing of precomputed votes (the ``em_routing`` entry point), with 3 pose entries."""
    geometry = RoutingGeometry.conv(3, 3, 2, 1)
    generator = torch.Generator().manual_seed(6)
    votes = torch.randn(1, geometry.num_windows, 2, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    child_activations = (0.2 + 0.6 * torch.rand(1, geometry.num_windows, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    beta_v = torch.randn(2, generator=generator, dtype=torch.float64, requires_grad=True)
    beta_a = torch.randn(2, generator=generator, dtype=torch.float64, requires_grad=True)
    config = EMRoutingConfig(iterations=3, final_inverse_temperature=1.0, implementation=implementation)
    assert torch.autograd.gradcheck(
        lambda *args: em_routing(*args, geometry, config), (votes, child_activations, beta_v, beta_a), eps=1e-6, atol=1e-5,
        fast_mode=fast_for_the_interpreter(implementation),
    )  # fmt: skip


def small_network(implementation: str) -> CapsNet:
    config = preset("smallnorb").replace(
        conv1_channels=8, primary_types=4, conv_caps1_types=4, conv_caps2_types=4,
        routing={"iterations": 3, "implementation": implementation},
    )  # fmt: skip
    return CapsNet(config)


def test_fused_and_naive_give_the_same_gradients_for_the_whole_network():
    torch.manual_seed(7)
    fused = small_network("fused").double()
    naive = small_network("naive").double()
    naive.load_state_dict(fused.state_dict())
    images = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    results = []
    for model in (fused, naive):
        output = model(images)
        (output.activations.sum() + 0.01 * output.poses.square().sum()).backward()
        results.append((output, {name: p.grad for name, p in model.named_parameters()}))
    (fused_out, fused_grads), (naive_out, naive_grads) = results
    torch.testing.assert_close(fused_out.activations, naive_out.activations, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused_out.poses, naive_out.poses, rtol=1e-9, atol=1e-12)
    for name, grad in fused_grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, naive_grads[name], rtol=1e-7, atol=1e-10, msg=name)


def test_route_capsules_rejects_mismatched_shapes():
    geometry = RoutingGeometry.conv(3, 3, 2, 1)
    windows = torch.randn(1, geometry.num_windows, 4, 4, 4)
    transforms = torch.randn(5, 2, 4, 4)  # 5 children per window instead of 4
    with pytest.raises(ValueError, match="do not match"):
        route_capsules(windows, transforms, torch.rand(1, 4, 4), torch.zeros(2), torch.zeros(2), geometry, EMRoutingConfig())


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_torch_compile_traces_the_network(implementation):
    """Dynamo traces a fresh network (the fused routing runs eagerly inside it); results and gradients unchanged."""
    torch.manual_seed(8)
    model, fresh = small_network(implementation), small_network(implementation)
    fresh.load_state_dict(model.state_dict())
    images = torch.randn(2 if implementation == "triton" else 4, 1, 32, 32)  # the interpreter is slow
    compiled = torch.compile(fresh, backend="eager")  # first call traced: no cached geometry yet
    result = compiled(images)
    grads = torch.autograd.grad(result.activations.sum(), list(fresh.parameters()))
    expected = model(images)
    expected_grads = torch.autograd.grad(expected.activations.sum(), list(model.parameters()))
    torch.testing.assert_close(result.activations, expected.activations)
    torch.testing.assert_close(grads, expected_grads)


#: Implementations whose backward pass is written by hand (first-order gradients only).
HAND_WRITTEN = ("fused", "blocked")


@pytest.mark.parametrize("implementation", HAND_WRITTEN)
def test_hand_written_routing_refuses_double_backward_with_a_clear_error(implementation):
    torch.manual_seed(9)
    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation=implementation))
    poses = torch.randn(1, 4, 4, 2, 4, 4, requires_grad=True)
    activations = torch.rand(1, 4, 4, 2)
    out = layer(poses, activations)
    grad = torch.autograd.grad(out.activations.sum(), poses, create_graph=True)[0]  # first order: fine
    with pytest.raises(UnsupportedOperationError, match=rf'the {implementation} EM routing.*double backward .*implementation="naive"'):
        grad.square().sum().backward()


def test_the_naive_routing_supports_double_backward():
    """What the fused error message recommends works: second derivatives by gradgradcheck."""
    torch.manual_seed(10)
    routing = EMRoutingConfig(iterations=2, implementation="naive", final_inverse_temperature=1.0)
    layer = with_large_betas(ConvCaps(1, 2, 2, 1, routing=routing).double())
    poses, activations = tiny_inputs(2, 1, seed=11)
    assert torch.autograd.gradgradcheck(lambda p, a: layer(p, a), (poses, activations), eps=1e-6, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("implementation", HAND_WRITTEN)
@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_hand_written_routing_refuses_torch_func_with_a_clear_error_and_naive_supports_it(transform, implementation):
    torch.manual_seed(12)
    poses, activations = torch.randn(1, 4, 4, 2, 4, 4, dtype=torch.float64), torch.rand(1, 4, 4, 2, dtype=torch.float64)
    layers = {impl: ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation=impl)).double() for impl in ROUTING_IMPLEMENTATIONS}
    layers["naive"].load_state_dict(layers["fused"].state_dict())

    def apply(implementation: str):
        f = lambda p: layers[implementation](p, activations).poses.sum()  # noqa: E731
        if transform == "grad":
            return torch.func.grad(f)(poses)
        if transform == "vmap":
            return torch.func.vmap(lambda p: layers[implementation](p, activations[:1]).poses)(poses.unsqueeze(1))
        return torch.func.jvp(f, (poses,), (torch.ones_like(poses),))[1]

    with pytest.raises(UnsupportedOperationError, match=rf'the {implementation} EM routing.*torch\.func.*implementation="naive"'):
        apply(implementation)
    result = apply("naive")
    if transform == "grad":  # the same gradient as ordinary autograd through the fused routing
        expected_input = poses.clone().requires_grad_()
        layers["fused"](expected_input, activations).poses.sum().backward()
        torch.testing.assert_close(result, expected_input.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("implementation", HAND_WRITTEN)
def test_hand_written_routing_refuses_forward_mode_ad_with_a_clear_error(implementation):
    import torch.autograd.forward_ad as fwAD

    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation=implementation))
    poses, activations = torch.randn(1, 4, 4, 2, 4, 4), torch.rand(1, 4, 4, 2)
    with fwAD.dual_level(), pytest.raises(UnsupportedOperationError, match="forward-mode AD"):
        layer(fwAD.make_dual(poses, torch.ones_like(poses)), activations)


def test_the_fused_backward_saves_its_state_through_saved_tensor_hooks():
    """Hooks such as ``save_on_cpu`` see every tensor the fused routing keeps for backward."""
    torch.manual_seed(13)
    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="fused"))
    poses, activations = torch.randn(2, 5, 5, 2, 4, 4, requires_grad=True), torch.rand(2, 5, 5, 2)
    packed: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(tensor)
        return tensor.clone()  # what the backward gets back is a copy

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(poses, activations)
    inputs = 4  # windows, transforms, child activations, β_v
    assert len(packed) >= inputs + 5 * layer.routing.iterations  # and per iteration r, w, R, σ², a
    out.poses.sum().backward()
    expected = poses.detach().clone().requires_grad_()
    layer(expected, activations).poses.sum().backward()
    torch.testing.assert_close(poses.grad, expected.grad, rtol=0, atol=0)
