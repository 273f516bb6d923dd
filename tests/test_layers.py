"""The layers as a library: checked inputs, one output order, exact InputNorm gradients, owned scratch memory."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from matcaps.errors import InvalidInputError, MatcapsError
from matcaps.layers import ClassCaps, ConvCaps, InputNorm, PrimaryCaps, share_workspace
from matcaps.layers.routed import GEOMETRY_CACHE_SIZE
from matcaps.models import CapsNet, preset
from matcaps.routing import Capsules, EMRoutingConfig, RoutingGeometry, em_routing, route_capsules, workspace_bytes

SMALL_NETWORK = dict(conv1_channels=4, primary_types=2, conv_caps1_types=2, conv_caps2_types=2)


# ---------------------------------------------------------------------------- inputs checked at the boundary


@pytest.mark.parametrize(
    "poses_shape,activations_shape",
    [
        ((2, 8, 9, 9, 4, 4), (2, 8, 9, 9)),  # channels first
        ((2, 9, 9, 3, 4, 4), (2, 9, 9, 3)),  # wrong number of input types
        ((2, 9, 9, 8, 3, 3), (2, 9, 9, 8)),  # wrong pose size
        ((2, 9, 9, 8, 4, 4), (2, 9, 8, 8)),  # activations of another map
        ((9, 9, 8, 4, 4), (9, 9, 8)),  # no batch dimension
    ],
)
@pytest.mark.parametrize("layer", [ConvCaps(8, 4, 3, 2), ClassCaps(8, 5)], ids=["conv", "class"])
def test_routed_layers_name_the_expected_and_received_shapes(layer, poses_shape, activations_shape):
    poses, activations = torch.randn(poses_shape), torch.rand(activations_shape)
    with pytest.raises(InvalidInputError) as error:
        layer(poses, activations)
    message = str(error.value)
    assert "(N, H, W, 8, 4, 4)" in message and "(N, H, W, 8)" in message and "\n" not in message
    assert str(tuple(poses_shape)) in message and str(tuple(activations_shape)) in message
    assert isinstance(error.value, MatcapsError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("layer", [ConvCaps(8, 4, 3, 2), ClassCaps(8, 5)], ids=["conv", "class"])
def test_routed_layers_refuse_an_empty_batch(layer):
    with pytest.raises(InvalidInputError, match=r"empty batch \(N = 0\)"):
        layer(torch.randn(0, 9, 9, 8, 4, 4), torch.rand(0, 9, 9, 8))


def test_primary_caps_and_input_norm_check_their_channels():
    with pytest.raises(InvalidInputError, match=r"expects features \(N, 8, H, W\), got \(2, 3, 5, 5\)"):
        PrimaryCaps(8, 4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(InvalidInputError, match=r"expects images \(N, 1, H, W\), got \(2, 32, 32\)"):
        InputNorm(1)(torch.randn(2, 32, 32))


def test_routing_functions_reject_mixed_dtypes_and_devices():
    geometry = RoutingGeometry.conv(3, 3, 2, 1)
    windows = torch.randn(1, geometry.num_windows, 4, 4, 4, dtype=torch.float64)
    transforms = torch.randn(4, 2, 4, 4)
    with pytest.raises(InvalidInputError, match="one dtype"):
        route_capsules(windows, transforms, torch.rand(1, 4, 4), torch.zeros(2), torch.zeros(2), geometry, EMRoutingConfig())
    votes = torch.randn(1, geometry.num_windows, 2, 4, 16, device="meta")
    with pytest.raises(InvalidInputError, match="geometry is on cpu"):
        em_routing(votes, torch.rand(1, 4, 4, device="meta"), torch.zeros(2, device="meta"), torch.zeros(2, device="meta"),
                   geometry, EMRoutingConfig())  # fmt: skip


# ---------------------------------------------------------------------------- (poses, activations) everywhere


def test_every_capsule_function_returns_named_poses_then_activations():
    torch.manual_seed(0)
    capsules = PrimaryCaps(4, 2)(torch.randn(2, 4, 6, 6))
    assert isinstance(capsules, Capsules) and capsules.poses.shape == (2, 6, 6, 2, 4, 4)
    conv = ConvCaps(2, 3, 3, 1)(*capsules)
    assert isinstance(conv, Capsules) and conv.poses.shape == (2, 4, 4, 3, 4, 4) and conv.activations.shape == (2, 4, 4, 3)
    classes = ClassCaps(3, 5)(*conv)
    assert isinstance(classes, Capsules) and classes.poses.shape == (2, 5, 4, 4)
    inputs = ConvCaps(2, 3, 3, 1).routing_inputs(*capsules)
    routed = route_capsules(inputs.windows, inputs.transforms, inputs.child_activations, torch.zeros(3),
                            torch.zeros(3), inputs.geometry, EMRoutingConfig())  # fmt: skip
    assert isinstance(routed, Capsules) and routed.poses.shape == (2, 16, 3, 16)

    output = CapsNet(preset("smallnorb", **SMALL_NETWORK)).eval()(torch.randn(2, 1, 32, 32))
    assert output._fields == ("poses", "activations") == Capsules._fields
    assert output.poses.shape == (2, 5, 4, 4) and output.scores is output.activations
    poses, activations = output
    assert activations is output.activations


# ---------------------------------------------------------------------------- InputNorm gradients


def test_input_norm_gradient_is_that_of_batch_norm():
    """The batch statistics depend on the input: the gradient goes through them too."""
    torch.manual_seed(0)
    images = (3 + 2 * torch.randn(6, 2, 5, 5, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    ours = torch.autograd.grad((InputNorm(2).double()(images) * weights).sum(), images)[0]
    reference = torch.autograd.grad((torch.nn.BatchNorm2d(2, affine=False).double()(images) * weights).sum(), images)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    images_eval = images.detach().requires_grad_()
    norm = InputNorm(2).double().eval()
    torch.autograd.gradcheck(norm, (images_eval,))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _input_norm_worker(rank: int, world_size: int, port: int, images: torch.Tensor, weights: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        shard = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
        local = images[shard].clone().requires_grad_()
        norm = InputNorm(images.shape[1]).double().synchronise()
        (norm(local) * weights[shard]).sum().backward()
        torch.save({"grad": local.grad, "running_mean": norm.running_mean}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_synchronised_input_norm_gradient_across_two_gloo_processes(tmp_path):
    """Each process's input gradient is that of the sum of both processes' losses, as on one process."""
    torch.manual_seed(1)
    images = 1 + 2 * torch.randn(8, 2, 4, 4, dtype=torch.float64)
    weights = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    mp.spawn(_input_norm_worker, args=(2, _free_port(), images, weights, str(tmp_path / "grad")), nprocs=2, join=True)
    whole = images.clone().requires_grad_()
    norm = InputNorm(2).double()
    (norm(whole) * weights).sum().backward()
    shards = [torch.load(tmp_path / f"grad.{rank}") for rank in range(2)]
    torch.testing.assert_close(torch.cat([s["grad"] for s in shards]), whole.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shards[1]["running_mean"], norm.running_mean, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- construction and memory


def test_iterations_can_be_given_without_a_routing_config():
    assert ConvCaps(2, 3, 3, iterations=3).routing == EMRoutingConfig(iterations=3)
    assert ClassCaps(2, 5, iterations=1).routing.iterations == 1
    naive = ConvCaps(2, 3, 3, routing=EMRoutingConfig(implementation="naive"), iterations=1).routing
    assert naive == EMRoutingConfig(iterations=1, implementation="naive")
    with pytest.raises(MatcapsError, match="iterations"):
        ConvCaps(2, 3, 3, iterations=0)


def test_a_network_shares_one_workspace_and_frees_it_with_the_network():
    gc.collect()
    before = workspace_bytes()
    model = CapsNet(preset("smallnorb", **SMALL_NETWORK, routing={"implementation": "fused"}))  # fused keeps scratch
    routed = [model.conv_caps1, model.conv_caps2, model.class_caps]
    assert all(layer.workspace is model.workspace for layer in routed)
    model(torch.randn(2, 1, 32, 32)).activations.sum().backward()
    held = model.workspace.nbytes()
    assert held > 0 and workspace_bytes() == before + held
    model.workspace.release()
    assert model.workspace.nbytes() == 0
    model(torch.randn(2, 1, 32, 32))
    del model, routed
    gc.collect()
    assert workspace_bytes() == before


def test_routing_functions_keep_nothing_without_a_workspace():
    gc.collect()
    before = workspace_bytes()
    layer = ConvCaps(2, 3, 3, 1)
    inputs = layer.routing_inputs(torch.randn(2, 5, 5, 2, 4, 4), torch.rand(2, 5, 5, 2))
    route_capsules(*inputs[:3], layer.beta_v, layer.beta_a, inputs.geometry, layer.routing)
    assert workspace_bytes() == before


def test_copies_and_pickles_of_a_network_get_their_own_empty_workspace():
    model = CapsNet(preset("smallnorb", **SMALL_NETWORK))
    model(torch.randn(1, 1, 32, 32))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.workspace is not model.workspace and copied.workspace.nbytes() == 0
        assert copied.conv_caps1.workspace is copied.workspace is copied.class_caps.workspace
    share_workspace(model.conv_caps1)
    assert model.conv_caps1.workspace is not model.workspace


def test_the_geometry_cache_keeps_the_most_recent_sizes():
    layer = ConvCaps(1, 2, 3, 1)
    built: list[tuple[int, int]] = []
    make = layer.make_geometry
    layer.make_geometry = lambda h, w: built.append((h, w)) or make(h, w)  # type: ignore[method-assign]
    sizes = [(side, side) for side in range(3, 3 + GEOMETRY_CACHE_SIZE + 2)]
    for height, width in sizes:
        layer(torch.randn(1, height, width, 1, 4, 4), torch.rand(1, height, width, 1))
    assert built == sizes
    for height, width in sizes[-GEOMETRY_CACHE_SIZE:]:  # still cached: not built again
        layer.geometry(height, width, torch.device("cpu"))
    assert built == sizes
    layer.geometry(*sizes[0], torch.device("cpu"))  # evicted: built again
    assert built == sizes + [sizes[0]]


def test_geometry_refuses_a_child_map_of_another_size():
    geometry = RoutingGeometry.conv(5, 5, kernel_size=3)
    assert geometry.gather(torch.zeros(2, 25, 4)).shape == (2, 9, 9, 4)
    with pytest.raises(InvalidInputError, match="expected 25 child positions, got 24"):
        geometry.gather(torch.zeros(2, 24, 4))
    with pytest.raises(InvalidInputError, match="slot_child_index must have shape"):
        RoutingGeometry(5, 5, out_height=3, out_width=3, slot_child_index=torch.zeros(8, 9, dtype=torch.int64))
