"""Peak memory of a ConvCaps forward grows linearly with the number of positions.

The TensorFlow implementation normalises routing weights with a dense
``(child positions × parent positions)`` tensor per layer, quadratic in the map size; ours
uses scatter/gather.  Each measurement runs in a fresh interpreter and reads the
resident-set high-water mark (reset just before the forward pass where Linux allows it),
so it sees every allocation, whatever allocated it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from matcaps.routing import ROUTING_IMPLEMENTATIONS

MEASURE = """
import json, sys, torch
from matcaps.bench.memory import PeakMemoryProbe
from matcaps.layers import ConvCaps
from matcaps.routing import EMRoutingConfig
side, implementation = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(1)
layer = ConvCaps(8, 16, 3, 2, routing=EMRoutingConfig(implementation=implementation))
poses, activations = torch.randn(2, side, side, 8, 4, 4), torch.rand(2, side, side, 8)
with torch.no_grad():
    layer(torch.randn(1, 5, 5, 8, 4, 4), torch.rand(1, 5, 5, 8))  # load kernels, warm caches
probe = PeakMemoryProbe(torch.device("cpu"))
probe.start()  # resets the high-water mark where Linux allows it
with torch.no_grad():
    layer(poses, activations)
print(json.dumps({"windows": ((side - 3) // 2 + 1) ** 2, "peak_kib": probe.peak_bytes() // 1024, "method": probe.method}))
"""


def peak_memory(side: int, implementation: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(side), implementation], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
def test_conv_caps_peak_memory_is_linear_in_the_map_size(implementation):
    small, large = peak_memory(20, implementation), peak_memory(60, implementation)
    assert large["windows"] / small["windows"] > 9  # 81 → 841 parent positions
    per_window_small = small["peak_kib"] / small["windows"]
    per_window_large = large["peak_kib"] / large["windows"]
    # Linear: the memory per parent position does not grow (quadratic would multiply it by ~10). It may
    # shrink: fixed costs (allocator arenas, kernel workspaces) weigh more on the small map, by up to
    # 2x on a loaded machine (81 windows: 1,027 KiB each, 841 windows: 483 KiB, seen in CI).
    assert 0.2 * per_window_small < per_window_large < 2.0 * per_window_small, (small, large)


@pytest.mark.parametrize("implementation", ROUTING_IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [True, False])
def test_a_step_leaves_nothing_for_the_cyclic_garbage_collector(implementation, backward):
    """No reference cycle keeps a step's tensors alive.

    Python frees cycles only when its collector runs, which it schedules by object counts,
    not bytes: a cycle through the autograd graph made memory grow by a step's routing
    state at every training step.
    """
    import gc

    import torch

    from matcaps.layers import ConvCaps
    from matcaps.routing import EMRoutingConfig

    layer = ConvCaps(2, 3, 3, 1, routing=EMRoutingConfig(implementation=implementation))
    poses = torch.randn(2, 5, 5, 2, 4, 4, requires_grad=True)
    activations = torch.rand(2, 5, 5, 2)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage for inspection
    try:
        out_poses, out_activations = layer(poses, activations)
        if backward:
            (out_poses.sum() + out_activations.sum()).backward()
        del out_poses, out_activations
        gc.collect()
        # Tensors only: Triton's interpreter (the triton routing on CPU) leaves cycles of its own objects.
        leaked = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor)]
        assert not leaked
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
