"""The blocked routing (compiled CPU kernel) against naive, the loop-by-loop reference, and its fallback.

The invariant, stability, gradcheck and reference tests of the other modules run over
every implementation (``ROUTING_IMPLEMENTATIONS``); this module adds what is particular
to the kernel: its internal routing weights and statistics, parent-type counts that are
not a multiple of its vector width, threads, and the ``fused`` fallback when it cannot be
built.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from em_reference import Constants, conv_caps_links, em_route
from matcaps.layers import ClassCaps, ConvCaps, RoutedCapsules
from matcaps.routing import EMRoutingConfig, RoutingGeometry, route_capsules
from matcaps.routing import blocked, cpu_kernel
from matcaps.routing.blocked import LANES, trace_blocked_routing
from routing_support import assert_relatively_close, outputs_and_gradients

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"


def blocked_trace(layer: RoutedCapsules, poses: torch.Tensor, activations: torch.Tensor):
    """The kernel's per-iteration states for a layer's input (the counterpart of ``layer.trace``)."""
    inputs = layer.routing_inputs(poses, activations)
    return trace_blocked_routing(
        inputs.windows, inputs.transforms, inputs.child_activations, layer.beta_v, layer.beta_a,
        inputs.geometry, layer.routing, inputs.vote_offsets,
    )  # fmt: skip


def conv_layer(in_types: int, out_types: int, kernel: int, stride: int, padding: int = 0):
    return lambda routing: ConvCaps(in_types, out_types, kernel, stride, padding, routing=routing)


#: Layers and their input shapes (N, H, W, B); parent types 3 (one vector chunk, mostly
#: padding lanes), 16 (one full chunk), 20 (two chunks), 5 classes with coordinate addition.
LAYERS = {
    "conv K3/s2, 3 types": (conv_layer(2, 3, 3, 2), (2, 7, 7, 2)),
    "conv K3/s1/p1, 20 types": (conv_layer(2, 20, 3, 1, 1), (2, 5, 5, 2)),
    "conv K2/s2, 16 types": (conv_layer(3, 16, 2, 2), (2, 5, 5, 3)),
    "class caps": (lambda routing: ClassCaps(4, 5, routing=routing), (3, 3, 3, 4)),
}


def random_case(case: str, iterations: int, dtype: torch.dtype, large_betas: bool = True):
    """The case's layer routed by ``blocked`` and by ``naive`` (same weights), and a random input in float64.

    With ``large_betas``, β ~ N(0, 1) make the activations depend visibly on the cost (the
    initial β saturate them) and the routing harder to compute: float32 loses more digits.
    """
    make_layer, shape = LAYERS[case]
    torch.manual_seed(iterations)
    first = make_layer(EMRoutingConfig(iterations=iterations, implementation="blocked")).double()
    if large_betas:
        with torch.no_grad():
            first.beta_a.normal_(0.0, 1.0)
            first.beta_v.normal_(0.0, 1.0)
    second = make_layer(EMRoutingConfig(iterations=iterations, implementation="naive")).double()
    second.load_state_dict(first.state_dict())
    generator = torch.Generator().manual_seed(iterations)
    poses = torch.randn(*shape, 4, 4, generator=generator, dtype=torch.float64)
    activations = torch.rand(*shape, generator=generator, dtype=torch.float64)
    return first.to(dtype), second, poses, activations


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("case", list(LAYERS))
def test_outputs_and_gradients_equal_naive_in_float64(case, iterations):
    layer, naive, poses, activations = random_case(case, iterations, torch.float64)
    expected = outputs_and_gradients(naive, poses, activations)
    assert_relatively_close(outputs_and_gradients(layer, poses, activations), expected, 1e-10)


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("case", list(LAYERS))
def test_float32_equals_naive_in_float64_to_1e5(case, iterations):
    """Float32 (the training dtype) within 1e-5 of the float64 result, relative to each tensor's scale.

    Outputs at every iteration count, gradients up to 2 iterations; with 3, float32 loses
    about 1e-5 on the gradients in naive too (next test).
    """
    layer, naive, poses, activations = random_case(case, iterations, torch.float32, large_betas=False)
    expected = outputs_and_gradients(naive, poses, activations)
    got = outputs_and_gradients(layer, poses.float(), activations.float())
    if iterations == 3:
        expected = {name: expected[name] for name in ("poses", "activations")}
        got = {name: got[name] for name in expected}
    assert_relatively_close(got, expected, 1e-5)


def relative_error(got: dict, expected: dict) -> float:
    return max(((got[k].double() - v).abs().max() / v.abs().max()).item() for k, v in expected.items())


@pytest.mark.parametrize("large_betas", [False, True])
@pytest.mark.parametrize("case", list(LAYERS))
def test_float32_with_3_iterations_is_as_accurate_as_naive(case, large_betas):
    """Float32 loses about 1e-5 over 3 iterations: no more than 3× naive's own float32 error."""
    layer, naive, poses, activations = random_case(case, 3, torch.float32, large_betas)
    expected = outputs_and_gradients(naive, poses, activations)
    naive_float32 = outputs_and_gradients(naive.float(), poses.float(), activations.float())
    blocked_float32 = outputs_and_gradients(layer, poses.float(), activations.float())
    assert relative_error(blocked_float32, expected) <= max(3 * relative_error(naive_float32, expected), 1e-5)


@pytest.mark.parametrize("side,kernel,stride,padding", [(5, 3, 1, 0), (6, 3, 2, 0), (4, 3, 1, 1), (5, 2, 2, 0)])
def test_every_iteration_matches_the_loop_by_loop_reference(side, kernel, stride, padding):
    """Routing weights, means, variances and activations of every iteration, as the kernel keeps them."""
    torch.manual_seed(1)
    layer = ConvCaps(2, 3, kernel, stride, padding, routing=EMRoutingConfig(iterations=3)).double()
    generator = torch.Generator().manual_seed(2)
    poses = torch.randn(1, side, side, 2, 4, 4, generator=generator, dtype=torch.float64)
    activations = torch.rand(1, side, side, 2, generator=generator, dtype=torch.float64)
    votes, (_, out_w) = conv_caps_links(poses[0].numpy(), layer.weight.detach().numpy(), kernel, stride, padding)
    child_activation = {(y, x, b): float(activations[0, y, x, b]) for y in range(side) for x in range(side) for b in range(2)}
    reference = em_route(
        votes, child_activation, 3, kernel * kernel * 2, layer.beta_v.detach().numpy(), layer.beta_a.detach().numpy(),
        Constants(iterations=3),
    )  # fmt: skip
    trace = blocked_trace(layer, poses, activations)
    assert len(trace) == 3
    for t, state in enumerate(trace):
        for ((oy, ox), c), mean in reference.mean[t].items():
            window = oy * out_w + ox
            np.testing.assert_allclose(state.mean[0, window, c], mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(state.variance[0, window, c], reference.variance[t][((oy, ox), c)], rtol=1e-9)
            np.testing.assert_allclose(state.activations[0, window, c].item(), reference.activation[t][((oy, ox), c)], rtol=1e-9)
        for (((oy, ox), c), (y, x, b)), weight in reference.routing[t].items():
            slot = (y - oy * stride + padding) * kernel + (x - ox * stride + padding)
            np.testing.assert_allclose(state.routing[0, oy * out_w + ox, c, slot * 2 + b].item(), weight, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype,iterations,tolerance", [(torch.float64, 3, 1e-10), (torch.float32, 2, 1e-5)])
@pytest.mark.parametrize("types", [5, 16, 20])
def test_internal_states_equal_naive_trace(dtype, iterations, tolerance, types):
    """The kernel's routing weights (padding slots included) and statistics equal ``trace_em_routing``."""
    torch.manual_seed(types)
    layer = ConvCaps(2, types, 3, 2, padding=1, routing=EMRoutingConfig(iterations=iterations)).double()
    poses = torch.randn(2, 6, 6, 2, 4, 4, dtype=torch.float64)
    activations = torch.rand(2, 6, 6, 2, dtype=torch.float64)
    expected = layer.trace(poses, activations)
    got = blocked_trace(layer.to(dtype), poses.to(dtype), activations.to(dtype))
    for t, (mine, theirs) in enumerate(zip(got, expected)):
        for name in ("routing", "mean", "variance", "activations"):
            reference = getattr(theirs, name).detach()
            error = (getattr(mine, name).double() - reference).abs().max().item()
            assert error <= tolerance * reference.abs().max().item(), f"iteration {t} {name}: {error:.3g}"


def test_gradcheck_with_two_chunks_of_parent_types_and_offsets():
    """17 parent types (a full vector chunk and a padded one), vote offsets, all inputs differentiated."""
    geometry = RoutingGeometry.conv(3, 3, 2, 1)
    generator = torch.Generator().manual_seed(3)
    children, types = 4, 17
    windows = torch.randn(1, geometry.num_windows, children, 4, 4, generator=generator, dtype=torch.float64)
    transforms = torch.randn(children, types, 4, 4, generator=generator, dtype=torch.float64)
    activations = 0.2 + 0.6 * torch.rand(1, geometry.num_windows, children, generator=generator, dtype=torch.float64)
    beta_v = torch.randn(types, generator=generator, dtype=torch.float64)
    beta_a = torch.randn(types, generator=generator, dtype=torch.float64)
    offsets = torch.randn(children, 16, generator=generator, dtype=torch.float64)
    config = EMRoutingConfig(iterations=3, final_inverse_temperature=1.0, implementation="blocked")
    inputs = [t.requires_grad_() for t in (windows, transforms, activations, beta_v, beta_a)]
    assert torch.autograd.gradcheck(
        lambda *args: route_capsules(*args, geometry, config, offsets), inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
        fast_mode=True,  # a random projection of the Jacobian: ~1,400 inputs would take minutes on 2 cores
    )


def test_inference_without_gradient_equals_the_training_forward():
    torch.manual_seed(4)
    layer = ConvCaps(3, 20, 3, 2, routing=EMRoutingConfig(iterations=3, implementation="blocked"))
    poses, activations = torch.randn(2, 9, 9, 3, 4, 4), torch.rand(2, 9, 9, 3)
    training = layer(poses.requires_grad_(), activations)
    with torch.inference_mode():
        inference = layer(poses, activations)
    assert torch.equal(training[0].detach(), inference[0]) and torch.equal(training[1].detach(), inference[1])


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(5)
    layer = ConvCaps(4, 16, 3, 2, routing=EMRoutingConfig(iterations=2, implementation="blocked")).double()
    poses, activations = torch.randn(3, 9, 9, 4, 4, 4, dtype=torch.float64), torch.rand(3, 9, 9, 4, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(outputs_and_gradients(layer, poses, activations))
    finally:
        torch.set_num_threads(threads)
    for name, value in results[0].items():  # the same sums in the same order, whatever the threads
        assert torch.equal(results[1][name], value), name


def test_pose_sizes_other_than_4_use_the_fused_routing():
    torch.manual_seed(6)
    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="blocked"), pose_size=3)
    reference = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="fused"), pose_size=3)
    reference.load_state_dict(layer.state_dict())
    poses, activations = torch.randn(2, 5, 5, 2, 3, 3), torch.rand(2, 5, 5, 2)
    for got, expected in zip(layer(poses, activations), reference(poses, activations)):
        assert torch.equal(got, expected)


def test_packed_transforms_put_parent_types_innermost_and_pad_with_zeros():
    transforms = torch.arange(2 * 17 * 16, dtype=torch.float32).view(2, 17, 4, 4)
    packed = blocked.pack_transforms(transforms)
    assert packed.shape == (2, 2, 4, 4, LANES)
    assert torch.equal(packed[1, 0, 2, 3, 5], transforms[1, 5, 2, 3])
    assert torch.equal(packed[0, 1, 1, 0, 0], transforms[0, 16, 1, 0])
    assert torch.all(packed[:, 1, :, :, 1:] == 0)


# ------------------------------------------------------------------ no compiler


@pytest.fixture
def fresh_kernel_cache():
    """Forget the process's loaded kernel before and after the test (the next use loads the cached build)."""
    cpu_kernel.load_kernel.cache_clear()
    yield
    cpu_kernel.load_kernel.cache_clear()


def test_a_failed_build_warns_once_and_routes_with_fused(monkeypatch, fresh_kernel_cache, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    torch.manual_seed(7)
    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="blocked"))
    reference = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation="fused"))
    reference.load_state_dict(layer.state_dict())
    poses, activations = torch.randn(2, 5, 5, 2, 4, 4), torch.rand(2, 5, 5, 2)
    with caplog.at_level(logging.WARNING, logger="matcaps.routing"):
        got = layer(poses, activations)
        again = layer(poses, activations)
    assert [record.getMessage() for record in caplog.records] == [  # once per process, not per call
        "matcaps: the blocked routing's C++ kernel could not be built "
        "(Error building extension: c++: command not found); using the fused routing"
    ]
    expected = reference(poses, activations)
    for first, second, third in zip(got, again, expected):
        assert torch.equal(first, third) and torch.equal(second, third)


def test_without_a_compiler_a_fresh_process_warns_in_one_line_and_trains(tmp_path):
    """A real build attempt with a compiler that does not exist, into an empty extension cache."""
    script = (
        "import torch\n"
        "from matcaps.layers import ConvCaps\n"
        "from matcaps.routing import EMRoutingConfig\n"
        "torch.manual_seed(0)\n"
        "layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation='blocked'))\n"
        "reference = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation='fused'))\n"
        "reference.load_state_dict(layer.state_dict())\n"
        "poses = torch.randn(2, 5, 5, 2, 4, 4, requires_grad=True)\n"
        "activations = torch.rand(2, 5, 5, 2)\n"
        "for _ in range(2):\n"
        "    out = layer(poses, activations)\n"
        "out[1].sum().backward()\n"
        "assert all(torch.equal(a, b) for a, b in zip(out, reference(poses, activations)))\n"
        "print('routed')\n"
    )
    environment = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "routed"
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr  # the warning, on one line
    assert lines[0] == (
        f"matcaps: the blocked routing's C++ kernel could not be built (no C++ compiler: "
        f"'{environment['CXX']}' not found (install g++ or set CXX)); using the fused routing"
    )


def test_without_ninja_the_kernel_is_not_built(monkeypatch, fresh_kernel_cache, caplog):
    from torch.utils import cpp_extension

    def must_not_build(*args, **kwargs):
        raise AssertionError("the build was attempted without ninja")

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    with caplog.at_level(logging.WARNING, logger="matcaps.routing"):
        assert cpu_kernel.load_kernel() is None
    assert [record.getMessage() for record in caplog.records] == [
        "matcaps: the blocked routing's C++ kernel could not be built (ninja not found (pip install ninja)); "
        "using the fused routing"
    ]


# ------------------------------------------------------------------ a build lock left by a killed build


class FakeClock:
    """Seconds that pass only when the waiting loop sleeps."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_a_stale_build_lock_is_removed_with_one_warning(tmp_path, caplog):
    lock = tmp_path / cpu_kernel.BUILD_LOCK_NAME
    lock.touch()
    clock = FakeClock(lock.stat().st_mtime + cpu_kernel.STALE_BUILD_LOCK_SECONDS + 60)
    with caplog.at_level(logging.WARNING, logger="matcaps.routing"):
        assert cpu_kernel.wait_for_build_lock(tmp_path, clock=clock, sleep=clock.sleep) is True
    assert not lock.exists() and clock.sleeps == 0
    assert [record.getMessage() for record in caplog.records] == [
        f"matcaps: removed {lock}, a build lock 16 minutes old left by an interrupted build"]


def test_a_fresh_build_lock_is_waited_for_until_it_goes_or_turns_stale(tmp_path, caplog):
    lock = tmp_path / cpu_kernel.BUILD_LOCK_NAME
    assert cpu_kernel.wait_for_build_lock(tmp_path) is False  # no lock: no wait
    lock.touch()
    clock = FakeClock(lock.stat().st_mtime)

    def build_ends_after_three_polls(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.sleeps == 3:
            lock.unlink()

    assert cpu_kernel.wait_for_build_lock(tmp_path, clock=clock, sleep=build_ends_after_three_polls) is False
    assert clock.sleeps == 3 and not caplog.records
    lock.touch()  # a build that never ends: waited for until the lock is stale, then removed
    clock = FakeClock(lock.stat().st_mtime)
    assert cpu_kernel.wait_for_build_lock(tmp_path, stale_after=10, clock=clock, sleep=clock.sleep) is True
    assert clock.sleeps == 10 and not lock.exists()


def test_load_kernel_clears_a_stale_lock_of_its_build_directory_before_building(monkeypatch, fresh_kernel_cache, tmp_path):
    from torch.utils import cpp_extension

    lock = tmp_path / cpu_kernel.BUILD_LOCK_NAME
    lock.touch()
    old = lock.stat().st_mtime - cpu_kernel.STALE_BUILD_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    built = []
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built.append((kwargs["name"], lock.exists())) or "kernel")
    assert cpu_kernel.load_kernel() == "kernel"
    assert built == [(f"{cpu_kernel.EXTENSION_PREFIX}_{cpu_kernel.cpu_tag()}", False)]
