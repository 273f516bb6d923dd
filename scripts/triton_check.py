"""Check the Triton routing on a CUDA device: agreement with ``naive``, then speed.

For the three routed layers (ConvCaps1, ConvCaps2, ClassCaps) of the ``smallnorb`` and
``mnist`` presets, fed by a real forward pass of the network on random images, it

1. compares the ``triton`` implementation with ``naive`` (outputs and the gradients of the
   layer's inputs and parameters for a fixed random cotangent) in float32 and float64, and
   prints PASS/FAIL with the largest difference relative to each tensor's largest
   magnitude (``fused`` vs ``naive`` is printed beside it: in float32 EM amplifies rounding,
   so gradients of any two implementations differ by more than their outputs);
2. times forward+backward and forward alone (no_grad) of ``triton``, ``fused`` and
   ``naive`` with CUDA events (median of repeats).

A failure of one check is printed and the script goes on.  Run from the repository root:

    PYTHONPATH=src python scripts/triton_check.py [--batch 32] [--repeats 20] [--iterations 3 --e-step-scales 1 0.2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import traceback

import torch

from matcaps.models import build_model

LAYERS = ("conv_caps1", "conv_caps2", "class_caps")
PRESETS = ("smallnorb", "mnist")
IMPLEMENTATIONS = ("triton", "fused", "naive")
#: Largest relative difference from ``naive`` accepted for outputs / gradients, per dtype.
TOLERANCES = {torch.float32: (1e-5, 1e-3), torch.float64: (1e-9, 1e-7)}


def layer_inputs(preset: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network and the ``(poses, activations)`` each routed layer receives in a forward pass."""
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    config = model.config
    images = torch.randn(batch, config.in_channels, config.image_size, config.image_size, device=device)
    captured: dict = {}

    def capture(name):
        def hook(_, args) -> None:
            captured[name] = args

        return hook

    hooks = [getattr(model, name).register_forward_pre_hook(capture(name)) for name in LAYERS]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return model, captured


def run_layer(layer, implementation: str, poses, activations, cotangents=None):
    """Outputs and gradients (inputs and parameters) of ``layer`` with ``implementation``."""
    layer.routing = dataclasses.replace(layer.routing, implementation=implementation)
    poses = poses.detach().clone().requires_grad_()
    activations = activations.detach().clone().requires_grad_()
    out_poses, out_activations = layer(poses, activations)
    if cotangents is None:
        generator = torch.Generator(device=poses.device).manual_seed(1)
        cotangents = [torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
                      for t in (out_poses, out_activations)]  # fmt: skip
    parameters = [layer.weight, layer.beta_a, layer.beta_v]
    grads = torch.autograd.grad((out_poses, out_activations), [poses, activations, *parameters], cotangents)
    names = ["poses", "activations", "grad poses", "grad activations", "grad weight", "grad beta_a", "grad beta_v"]
    return dict(zip(names, [out_poses.detach(), out_activations.detach(), *grads])), cotangents


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    difference = (a - b).abs().max().item()
    return difference / scale if scale > 0 else difference


def check(preset: str, name: str, layer, poses, activations, dtype: torch.dtype) -> bool:
    layer = layer.to(dtype)
    poses, activations = poses.to(dtype), activations.to(dtype)
    reference, cotangents = run_layer(layer, "naive", poses, activations)
    fused, _ = run_layer(layer, "fused", poses, activations, cotangents)
    triton, _ = run_layer(layer, "triton", poses, activations, cotangents)
    output_tolerance, gradient_tolerance = TOLERANCES[dtype]
    ok = True
    for key, expected in reference.items():
        error, baseline = relative(triton[key], expected), relative(fused[key], expected)
        finite = bool(torch.isfinite(triton[key]).all())
        tolerance = gradient_tolerance if key.startswith("grad") else output_tolerance
        passed = finite and error <= max(tolerance, 10 * baseline)
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'} {preset:9s} {name:10s} {str(dtype)[6:]:7s} {key:17s} "
              f"triton-vs-naive {error:.2e}  (fused-vs-naive {baseline:.2e})")  # fmt: skip
    return ok


def median_ms(function, repeats: int, device: torch.device) -> float:
    """Median time of ``function`` in ms: CUDA events on CUDA, wall clock otherwise (a dry run)."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def time_layer(preset: str, name: str, layer, poses, activations, repeats: int) -> None:
    layer = layer.float()
    poses, activations = poses.float(), activations.float()
    line = f"  {preset:9s} {name:10s} N={poses.shape[0]}"
    for implementation in IMPLEMENTATIONS:
        try:
            layer.routing = dataclasses.replace(layer.routing, implementation=implementation)
            p, a = poses.clone().requires_grad_(), activations.clone().requires_grad_()

            def train():
                out_poses, out_activations = layer(p, a)
                (out_poses.sum() + out_activations.sum()).backward()

            def infer():
                with torch.no_grad():
                    layer(p, a)

            line += f" | {implementation}: fwd+bwd {median_ms(train, repeats, poses.device):7.3f} ms, fwd {median_ms(infer, repeats, poses.device):7.3f} ms"
        except Exception as error:  # report and go on
            line += f" | {implementation}: ERROR {type(error).__name__}: {error}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--iterations", type=int, default=None, help="routing iterations (default: the presets')")
    parser.add_argument("--e-step-scales", type=float, nargs="*", default=None, metavar="TAU",
                        help="likelihood scale of each E-step (routing.e_step_scales; default: the paper's, none)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device")
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}; routing changes: iterations={args.iterations}, "
          f"e_step_scales={args.e_step_scales}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as error:
        print(f"FAIL: triton is not importable: {error}")
    all_ok = True
    cases = []
    changes = {"iterations": args.iterations} if args.iterations is not None else {}
    if args.e_step_scales is not None:
        changes["e_step_scales"] = tuple(args.e_step_scales)
    for preset in PRESETS:
        try:
            model, inputs = layer_inputs(preset, args.batch, device)
            for name in LAYERS:
                layer = getattr(model, name)
                layer.routing = dataclasses.replace(layer.routing, **changes)
                cases.append((preset, name, layer, *inputs[name]))
        except Exception:
            all_ok = False
            print(f"FAIL {preset}: could not build the network")
            traceback.print_exc()
    print("agreement with naive (largest difference / largest magnitude):")
    for preset, name, layer, poses, activations in cases:
        for dtype in (torch.float32, torch.float64):
            try:
                all_ok &= check(preset, name, layer, poses, activations, dtype)
            except Exception as error:
                all_ok = False
                print(f"  FAIL {preset} {name} {dtype}: {type(error).__name__}: {error}")
                traceback.print_exc()
    print("timing (float32, CUDA events, median):")
    for preset, name, layer, poses, activations in cases:
        try:
            time_layer(preset, name, layer, poses, activations, args.repeats)
        except Exception as error:
            print(f"  ERROR timing {preset} {name}: {type(error).__name__}: {error}")
    print("OVERALL: PASS" if all_ok else "OVERALL: FAIL")


if __name__ == "__main__":
    main()
