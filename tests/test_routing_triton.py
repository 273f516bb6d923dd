"""The ``triton`` routing: the kernel against ``naive`` and the loop-by-loop reference, its errors, its GPU build.

On CPU the kernel runs under Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``),
which costs tens of milliseconds per program, so the cases are small.  The outputs, every
iteration's routing weights and the gradients are also covered by the routing tests
parametrised over every implementation (``test_routing_reference``, ``_gradients``,
``_invariants``, ``_stability``, ``test_bench_equivalence``).  ``TestCompiledOnCuda`` runs
the compiled kernel on a GPU: ``TRITON_INTERPRET=0 pytest tests/test_routing_triton.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import triton_cpu_skip_reason
from em_reference import Constants, conv_caps_links, em_route
from matcaps.errors import ConfigError
from matcaps.layers import ClassCaps, ConvCaps
from matcaps.models import CapsNet, preset
from matcaps.routing import ROUTING_IMPLEMENTATIONS, EMRoutingConfig, RoutingGeometry, em_routing

SOURCE_ROOT = str(Path(__file__).resolve().parents[1] / "src")
TRITON_MISSING = triton_cpu_skip_reason() is not None and "not importable" in (triton_cpu_skip_reason() or "")
needs_interpreter = pytest.mark.skipif(triton_cpu_skip_reason() is not None, reason=str(triton_cpu_skip_reason()))


def layer_pair(make_layer, dtype: torch.dtype, iterations: int = 3, e_step_scales: tuple[float, ...] = ()):
    """The same layer (same weights) with the naive and the triton routing."""
    naive = make_layer(EMRoutingConfig(iterations=iterations, implementation="naive", e_step_scales=e_step_scales))
    triton = make_layer(EMRoutingConfig(iterations=iterations, implementation="triton", e_step_scales=e_step_scales))
    naive, triton = naive.to(dtype), triton.to(dtype)
    triton.load_state_dict(naive.state_dict())
    return naive, triton


def random_inputs(side: int, types: int, dtype: torch.dtype, seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    poses = torch.randn(batch, side, side, types, 4, 4, generator=generator, dtype=dtype)
    activations = torch.rand(batch, side, side, types, generator=generator, dtype=dtype)
    return poses, activations


def kernel_trace(layer, poses, activations, parent_block=None):
    """Every iteration of the kernel for ``layer``'s input (with its routing weights)."""
    from matcaps.routing.triton_routing import _run_iterations

    inputs = layer.routing_inputs(poses, activations)
    with torch.no_grad():
        return _run_iterations(
            inputs.windows, inputs.transforms, inputs.vote_offsets, inputs.child_activations,
            layer.beta_v, layer.beta_a, inputs.geometry, layer.routing, from_votes=False, keep_trace=True,
            parent_block=parent_block,
        )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("parent_block", [None, 1, 2])  # all 3 types at once; one by one; 2 then 1 (masked)
def test_every_iteration_equals_naive(parent_block):
    """Routing weights, means, variances and activations of all 3 iterations, float64."""
    torch.manual_seed(0)
    naive, triton = layer_pair(lambda routing: ConvCaps(2, 3, 3, 2, 1, routing=routing), torch.float64)
    poses, activations = random_inputs(5, 2, torch.float64, seed=1)
    expected = naive.trace(poses, activations)
    actual = kernel_trace(triton, poses, activations, parent_block)
    assert len(actual) == 3
    for t, (want, got) in enumerate(zip(expected, actual)):
        for name in ("routing", "mean", "variance", "activations"):
            want_value = getattr(want, name).detach().expand_as(getattr(got, name))
            torch.testing.assert_close(getattr(got, name), want_value, rtol=1e-10, atol=1e-13, msg=f"{name}, iteration {t}")


@needs_interpreter
def test_every_iteration_equals_the_loop_reference():
    """The kernel's per-iteration state against the loop-by-loop reference (stride 2, a row no window reads)."""
    torch.manual_seed(2)
    layer = ConvCaps(2, 3, 3, 2, routing=EMRoutingConfig(iterations=3, implementation="triton")).double()
    poses, activations = random_inputs(6, 2, torch.float64, seed=3, batch=1)
    trace = kernel_trace(layer, poses, activations)
    votes, (_, out_w) = conv_caps_links(poses[0].numpy(), layer.weight.detach().numpy(), 3, 2, 0)
    child_activation = {(y, x, b): float(activations[0, y, x, b]) for y in range(6) for x in range(6) for b in range(2)}
    reference = em_route(
        votes, child_activation, 3, 9 * 2, layer.beta_v.detach().numpy(), layer.beta_a.detach().numpy(), Constants(iterations=3)
    )
    for t, state in enumerate(trace):
        for ((oy, ox), c), mean in reference.mean[t].items():
            window = oy * out_w + ox
            np.testing.assert_allclose(state.mean[0, window, c], mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(state.variance[0, window, c], reference.variance[t][((oy, ox), c)], rtol=1e-9)
            np.testing.assert_allclose(state.activations[0, window, c].item(), reference.activation[t][((oy, ox), c)], rtol=1e-9)
        for (((oy, ox), c), (y, x, b)), weight in reference.routing[t].items():
            child = ((y - oy * 2) * 3 + (x - ox * 2)) * 2 + b
            np.testing.assert_allclose(state.routing[0, oy * out_w + ox, c, child].item(), weight, rtol=1e-9, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("layer_kind", ["conv", "class"])
def test_float32_outputs_equal_naive_to_1e5(layer_kind):
    torch.manual_seed(4)
    if layer_kind == "conv":
        naive, triton = layer_pair(lambda routing: ConvCaps(4, 5, 3, 1, routing=routing), torch.float32)
    else:
        naive, triton = layer_pair(lambda routing: ClassCaps(4, 10, routing=routing), torch.float32)
    poses, activations = random_inputs(5, 4, torch.float32, seed=5)
    expected, actual = naive(poses, activations), triton(poses, activations)
    for want, got in zip(expected, actual):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@needs_interpreter
@pytest.mark.parametrize("entries", [16, 3])  # 4×4 poses; any number of entries
def test_routing_given_votes_equals_naive(entries):
    """The ``em_routing`` entry point: the kernel reads the votes instead of computing them; gradients too."""
    geometry = RoutingGeometry.conv(4, 4, 2, 1, padding=1)
    generator = torch.Generator().manual_seed(6)
    votes = torch.randn(2, geometry.num_windows, 3, 4 * 2, entries, generator=generator, dtype=torch.float64)
    child_activations = torch.rand(2, geometry.num_windows, 4 * 2, generator=generator, dtype=torch.float64)
    child_activations = child_activations * geometry.slot_is_child().repeat_interleave(2, dim=1)  # padding: 0
    beta_v, beta_a = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    results = {}
    for name in ("naive", "triton"):
        leaves = [t.clone().requires_grad_() for t in (votes, child_activations, beta_v, beta_a)]
        config = EMRoutingConfig(iterations=3, final_inverse_temperature=1.0, implementation=name)
        outputs = em_routing(*leaves, geometry, config)
        grads = torch.autograd.grad(outputs[0].square().sum() + outputs[1].sum(), leaves)
        results[name] = [o.detach() for o in outputs] + list(grads)
    for index, (got, want) in enumerate(zip(results["triton"], results["naive"])):
        tolerance = 1e-9 if index < 2 else 1e-7  # outputs; gradients (fused's backward vs autograd)
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@needs_interpreter
def test_whole_network_outputs_and_gradients_equal_naive():
    torch.manual_seed(8)
    config = preset("smallnorb", conv1_channels=4, primary_types=2, conv_caps1_types=2, conv_caps2_types=2, image_size=16)
    naive = CapsNet(config.replace(routing={"iterations": 2, "implementation": "naive"})).double()
    triton = CapsNet(config.replace(routing={"iterations": 2, "implementation": "triton"})).double()
    triton.load_state_dict(naive.state_dict())
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    results = []
    for model in (naive, triton):
        output = model(images)
        grads = torch.autograd.grad(output.activations.sum() + 0.01 * output.poses.square().sum(), list(model.parameters()))
        results.append((output, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.activations, want.activations, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.poses, want.poses, rtol=1e-9, atol=1e-12)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-10)


def routing_node(output: torch.Tensor):
    """The autograd node of the triton routing that ``output`` comes from."""
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_TritonCapsuleRoutingBackward":
            return node
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no triton routing node in the graph")


@needs_interpreter
def test_nothing_votes_sized_is_kept_for_the_backward_pass():
    """Only the inputs are saved (the votes are C = 16 times the windows), and nothing under no_grad."""
    layer = ConvCaps(2, 16, 3, 1, routing=EMRoutingConfig(implementation="triton"))
    poses, activations = random_inputs(4, 2, torch.float32, seed=9, batch=1)
    with torch.no_grad():
        out_poses, out_activations = layer(poses, activations)
    assert out_poses.grad_fn is None and out_activations.grad_fn is None
    out_poses, _ = layer(poses.requires_grad_(), activations)
    inputs = layer.routing_inputs(poses, activations)
    saved = sorted(t.numel() for t in routing_node(out_poses).saved_tensors if t is not None)
    expected = sorted(t.numel() for t in (inputs.windows, inputs.transforms, inputs.child_activations, layer.beta_v, layer.beta_a))
    assert saved == expected
    assert max(saved) < inputs.windows.numel() * 16  # the votes' size


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOT, **environment}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


ROUTE_ON_CPU = """
import torch
from matcaps.errors import MatcapsError
from matcaps.layers import ConvCaps
from matcaps.routing import EMRoutingConfig
layer = ConvCaps(1, 2, 2, 1, routing=EMRoutingConfig(implementation="triton"))
try:
    layer(torch.randn(1, 3, 3, 1, 4, 4), torch.rand(1, 3, 3, 1))
except MatcapsError as error:
    print(type(error).__name__, error)
"""


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not importable")
def test_cpu_tensors_without_the_interpreter_raise_one_clear_error():
    result = run_python(ROUTE_ON_CPU, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError routing implementation 'triton' runs on CUDA tensors only (got cpu)")
    assert "TRITON_INTERPRET=1" in result.stdout and len(result.stdout.strip().splitlines()) == 1


def test_missing_triton_raises_one_clear_error():
    hide_triton = "import sys; sys.modules['triton'] = None\n"  # `import triton` then raises ImportError
    result = run_python(hide_triton + ROUTE_ON_CPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError routing implementation 'triton' needs the triton package")
    assert "matcaps[triton]" in result.stdout


def test_the_triton_implementation_is_a_valid_configuration():
    assert EMRoutingConfig(implementation="triton").implementation == "triton"
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(ROUTING_IMPLEMENTATIONS)):
        EMRoutingConfig(implementation="cuda")


COMPILE_FOR_GPU = """
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from matcaps.routing.triton_kernel import em_iteration_kernel as kernel

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def compile_variant(dtype, capability, warps=4, **constants):
    constants = dict(PARENT_TYPES=16, POSE=4, ENTRIES=16, BLOCK_C=1, BLOCK_I=128, BLOCK_H=16, FIRST=False, LAST=False,
                     FROM_VOTES=False, HAS_OFFSETS=False, STORE_ROUTING=False) | constants
    signature = {name: "constexpr" if name in constants else ("*i64" if name == "slot_child_ptr" else "*" + dtype)
                 if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    assert len(binary.asm["cubin"]) > 0
    # Spilled registers (ptxas -v), for the float32 variants that the layers use.
    target = re.search(r"^\\.target (\\S+)", binary.asm["ptx"], re.M).group(1)
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        open(ptx, "w").write(binary.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "-arch=" + target, ptx, "-o", os.path.join(folder, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", log))

spills = {
    "first": compile_variant("fp32", 90, FIRST=True),
    "middle": compile_variant("fp32", 90),
    "last": compile_variant("fp32", 90, LAST=True),
    "class, first": compile_variant("fp32", 90, 8, FIRST=True, HAS_OFFSETS=True, PARENT_TYPES=5, BLOCK_I=256),
    "class, middle": compile_variant("fp32", 90, 8, HAS_OFFSETS=True, PARENT_TYPES=10, BLOCK_I=256),
    "sm_80": compile_variant("fp32", 80),
}
# Compiled, spills not checked: em_routing of given votes (3 entries), the trace, float64.
compile_variant("fp32", 80, FROM_VOTES=True, POSE=1, ENTRIES=3, BLOCK_H=4)
compile_variant("fp32", 90, STORE_ROUTING=True)
compile_variant("fp64", 90, POSE=3, ENTRIES=9, PARENT_TYPES=3, BLOCK_C=4)  # bench's check runs in float64
print(json.dumps(spills))
"""


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not importable")
def test_the_kernel_compiles_for_gpus_without_spilling_registers():
    """Triton compiles the kernel to CUDA binaries (sm_90 and sm_80, float32 and float64) without a GPU.

    The interpreter accepts code that the compiler rejects; this catches that on a machine
    without a GPU.  The float32 variants that the layers run must keep their votes in
    registers: ptxas spills none.
    """
    result = run_python(COMPILE_FOR_GPU, TRITON_INTERPRET="0")
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == dict.fromkeys(json.loads(result.stdout), 0)


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if triton_cpu_skip_reason() is None:
        return "Triton's interpreter is on: run with TRITON_INTERPRET=0 to test the compiled kernel"
    if TRITON_MISSING:
        return "triton is not importable"
    return None


@pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))
class TestCompiledOnCuda:
    """The compiled kernel on a GPU, against ``naive`` on the same GPU."""

    @pytest.mark.parametrize("e_step_scales", [(), (1.0, 0.2)])  # the paper's E-steps; the second softened
    @pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
    @pytest.mark.parametrize("layer_kind", ["conv", "conv_padded", "class"])
    def test_outputs_and_gradients_equal_naive(self, layer_kind, dtype, tolerance, e_step_scales):
        makers = {
            "conv": lambda routing: ConvCaps(8, 16, 3, 2, routing=routing),
            "conv_padded": lambda routing: ConvCaps(8, 16, 3, 1, 1, routing=routing),
            "class": lambda routing: ClassCaps(8, 5, routing=routing),
        }
        torch.manual_seed(10)
        naive, triton = (layer.cuda() for layer in layer_pair(makers[layer_kind], dtype, e_step_scales=e_step_scales))
        poses, activations = (t.cuda() for t in random_inputs(7, 8, dtype, seed=11, batch=4))
        results = []
        for layer in (naive, triton):
            p, a = poses.clone().requires_grad_(), activations.clone().requires_grad_()
            out_poses, out_activations = layer(p, a)
            grads = torch.autograd.grad(out_poses.sum() + out_activations.sum(), [p, a, layer.weight])
            results.append([out_poses.detach(), out_activations.detach(), *grads])
        # Outputs to the tolerance; gradients (through EM's amplification of rounding) to 100 times it.
        for index, (want, got) in enumerate(zip(*results)):
            scale = want.abs().max().item()
            factor = 1 if index < 2 else 100
            torch.testing.assert_close(got, want, rtol=0, atol=factor * tolerance * scale, msg=f"tensor {index}")

    def test_no_grad_forward_allocates_nothing_votes_sized(self):
        """Peak memory of an inference forward stays far below the size of the votes."""
        torch.manual_seed(14)
        layer = ConvCaps(8, 16, 3, 2, routing=EMRoutingConfig(implementation="triton")).cuda()
        poses, activations = (t.cuda() for t in random_inputs(14, 8, torch.float32, seed=15, batch=16))
        votes_bytes = 16 * 36 * 16 * 72 * 16 * 4  # N·L·C·I·H float32
        with torch.no_grad():
            layer(poses, activations)  # compile and warm up
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            layer(poses, activations)
            torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < votes_bytes / 4

    def test_trace_equals_naive(self):
        torch.manual_seed(12)
        naive, triton = layer_pair(lambda routing: ConvCaps(4, 6, 3, 2, 1, routing=routing), torch.float64)
        naive, triton = naive.cuda(), triton.cuda()
        poses, activations = (t.cuda() for t in random_inputs(9, 4, torch.float64, seed=13))
        for want, got in zip(naive.trace(poses, activations), kernel_trace(triton, poses, activations)):
            for name in ("routing", "mean", "variance", "activations"):
                want_value = getattr(want, name).detach().expand_as(getattr(got, name))
                torch.testing.assert_close(getattr(got, name), want_value, rtol=1e-9, atol=1e-12, msg=name)
