"""Every routing implementation computes the same network: a benchmark must not compare different computations."""

from __future__ import annotations

import pytest
import torch

from matcaps.bench import verify
from matcaps.bench.verify import ImplementationMismatch, compare_implementations, model_outputs_and_gradients
from matcaps.models import build_model, preset
from matcaps.routing import ROUTING_IMPLEMENTATIONS

TINY = dict(conv1_channels=8, primary_types=2, conv_caps1_types=3, conv_caps2_types=3, image_size=16)


@pytest.mark.parametrize(
    "model,iterations,dtype,tolerance",
    [
        # float64: the same computation up to rounding, for every iteration count.
        ("smallnorb", 1, torch.float64, 1e-9),
        ("smallnorb", 2, torch.float64, 1e-9),
        ("smallnorb", 3, torch.float64, 1e-9),
        ("mnist", 3, torch.float64, 1e-9),
        # float32, as timed: agreement to float32 rounding (amplified by EM).
        ("smallnorb", 2, torch.float32, 1e-3),
    ],
)
def test_full_model_outputs_and_gradients_agree_across_implementations(model, iterations, dtype, tolerance):
    config = preset(model, **TINY, routing={"iterations": iterations})
    torch.manual_seed(iterations)
    state = build_model(config).state_dict()
    images = torch.randn(3, 1, 16, 16, dtype=dtype)
    labels = torch.arange(3) % config.num_classes
    runs = {
        name: model_outputs_and_gradients(config.replace(routing={"implementation": name}), images, labels, state)
        for name in ROUTING_IMPLEMENTATIONS
    }
    naive = runs["naive"]
    assert sum(key.startswith("grad/") for key in naive) == len(state) - 3  # all but InputNorm's buffers
    for name, run in runs.items():
        assert run.keys() == naive.keys(), name
        for key, value in naive.items():
            assert torch.isfinite(value).all(), key
            scale = value.abs().max().item()
            assert run[key].dtype == dtype
            torch.testing.assert_close(run[key], value, rtol=0, atol=tolerance * scale + 1e-30, msg=f"{name} {key}")
    # Not vacuous: the network's gradients are not all zero.
    assert naive["grad/conv1.weight"].abs().sum() > 0 and naive["grad/class_caps.weight"].abs().sum() > 0


def test_compare_implementations_reports_tiny_differences():
    report = compare_implementations(preset("smallnorb", **TINY), ["fused", "naive"])
    differences = report["naive"]
    assert {d.name for d in differences} >= {"activations", "poses", "loss", "grad/conv_caps1.weight"}
    assert max(d.relative for d in differences) < verify.RELATIVE_TOLERANCE
    assert max(d.relative for d in differences) > 0  # computed in a different order, not the same code


def test_compare_implementations_detects_a_different_computation(monkeypatch):
    original = verify.model_outputs_and_gradients

    def perturbed(config, images, labels, state):
        tensors = original(config, images, labels, state)
        if config.routing.implementation == "naive":
            tensors["grad/conv_caps2.weight"] = tensors["grad/conv_caps2.weight"] * 1.01
        return tensors

    monkeypatch.setattr(verify, "model_outputs_and_gradients", perturbed)
    with pytest.raises(ImplementationMismatch, match="disagree on grad/conv_caps2.weight"):
        compare_implementations(preset("smallnorb", **TINY), ["fused", "naive"])
