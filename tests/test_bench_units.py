"""Pieces of the bench: options, allocator regimes, timing statistics, routed-layer hooks, memory probe."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys

import pytest
import torch

from matcaps.allocator import apply_allocator, glibc_version
from matcaps.bench.config import BenchConfig
from matcaps.bench.memory import PeakMemoryProbe
from matcaps.bench.report import format_report
from matcaps.bench.runner import losses_agree, ratios_to_baseline
from matcaps.bench.timing import RoutedLayerTimer, TimingStats, routing_share
from matcaps.bench.workload import make_workload
from matcaps.errors import ConfigError
from matcaps.models.options import parse_model_options

TINY = {"conv1_channels": 8, "primary_types": 2, "conv_caps1_types": 3, "conv_caps2_types": 3, "image_size": 16}


def bench_with(*settings: str, iterations: int = 2) -> BenchConfig:
    """The BenchConfig of ``matcaps bench --model mnist --iters ITERATIONS --set SETTING ...``."""
    return BenchConfig(model="mnist", model_options=parse_model_options(settings, flag="--set"), iterations=iterations)


def test_set_takes_the_model_options_of_train():
    assert bench_with("conv1_channels=32", "coordinate_addition = false").model_options == {
        "conv1_channels": 32, "coordinate_addition": False}  # fmt: skip
    model = bench_with("routing.e_step_scales=[1,0.2]", "layer_routing.class_caps.final_inverse_temperature=0.005",
                       iterations=3).model_config("fused")
    assert model.routing.e_step_scales == (1, 0.2) and model.routing.iterations == 3
    assert model.routing_of("class_caps").final_inverse_temperature == 0.005
    assert model.routing_of("conv_caps1").final_inverse_temperature == model.routing.final_inverse_temperature
    bad = {
        "conv1_channels": "expects KEY=VALUE",
        "routing=3": "routing must be a table",
        "input_norm=maybe": "input_norm must be true or false",
        "routing.iterations=3": "routing.iterations: the bench sets it with --iters",
        "routing.implementation=naive": "--routing-impl",
        "routing.e_step_scales=[1,0.2]": "e_step_scales gives 2 scale(s), but 2 routing iteration(s) run 1",
        "routing.not_a_field=1": "not_a_field",
        "layer_routing.pool.iterations=2": "unknown layer(s) pool",
    }
    for setting, message in bad.items():
        with pytest.raises(ConfigError, match="--set") as raised:
            bench_with(setting)
        assert message in str(raised.value) and "\n" not in str(raised.value), setting
    with pytest.raises(ConfigError, match="given a value and sub-options"):
        parse_model_options(["routing=3", "routing.iterations=2"], flag="--set")


def test_bench_config_round_trips_and_applies_iterations_and_implementation():
    config = BenchConfig(model="mnist", model_options=TINY, iterations=3, implementations=("naive", "fused"))
    assert BenchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = config.model_config("naive")
    assert model.routing.iterations == 3 and model.routing.implementation == "naive"
    assert model.num_classes == 10 and model.conv1_channels == 8
    with pytest.raises(ConfigError, match="listed twice"):
        BenchConfig(implementations=("fused", "fused"))
    with pytest.raises(ConfigError, match="--set"):
        BenchConfig(model_options={"conv1_channels": 0})


def test_timing_stats():
    stats = TimingStats.from_seconds([0.3, 0.1, 0.2], batch_size=4, cpu_seconds=[0.5, 0.7, 0.6])
    assert (stats.median_ms, stats.min_ms, stats.max_ms) == pytest.approx((200, 100, 300))
    assert stats.cpu_median_ms == pytest.approx(600)
    assert stats.images_per_s == pytest.approx(20.0)
    with pytest.raises(ValueError):
        TimingStats.from_seconds([], batch_size=1)


def test_default_allocator_is_recorded_as_not_applied():
    record = apply_allocator("default")
    assert record["name"] == "default" and record["applied"] is False and record["settings"] == {}


def test_tuned_allocator_is_applied_in_a_fresh_process_on_glibc():
    code = "import json; from matcaps.allocator import apply_allocator; print(json.dumps(apply_allocator('tuned')))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    record = json.loads(completed.stdout)
    assert record["applied"] is (glibc_version() is not None)
    if record["applied"]:
        assert record["settings"] == {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": (1 << 31) - 1}
    # The allocator module must not import torch (the regime is set before anything big is allocated).
    check = "import sys, matcaps.allocator; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "False"


def _tiny_workload(batch_size: int = 2):
    config = BenchConfig(model_options=TINY).model_config("fused")
    return make_workload(config, batch_size, torch.device("cpu"), "fp32", seed=0)


def test_routed_layer_timer_times_the_forward_and_backward_of_the_three_routed_layers():
    workload = _tiny_workload()
    with RoutedLayerTimer(workload.network, torch.device("cpu")) as timer:
        workload.train_step()
        workload.train_step()
    assert (timer.forward_calls, timer.backward_calls) == (6, 6)
    assert timer.routed_seconds > 0
    with RoutedLayerTimer(workload.network, torch.device("cpu")) as timer:
        workload.inference_step()
    assert (timer.forward_calls, timer.backward_calls) == (3, 0)
    # Hooks are removed on exit.
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in workload.network.modules())
    share, routed_ms = routing_share(workload.train_step, workload.network, torch.device("cpu"), count=1)
    assert 0 < share < 1 and routed_ms > 0


def test_workload_is_seeded_and_training_reduces_nothing_to_nan():
    first, second = _tiny_workload(), _tiny_workload()
    torch.testing.assert_close(first.images, second.images)
    assert first.train_step() == second.train_step()
    assert torch.isfinite(torch.tensor(first.train_step()))


def test_peak_memory_probe_sees_a_large_temporary():
    probe = PeakMemoryProbe(torch.device("cpu"))
    probe.start()
    size = 64 * 1024 * 1024
    # Fresh anonymous pages, every one touched. Not a tensor: with malloc's thresholds raised (the tuned
    # allocator, which in-process CLI tests apply), a tensor may reuse freed heap that is still resident.
    buffer = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        buffer[offset] = 1
    buffer.close()
    assert probe.peak_bytes() >= 0.9 * size
    assert "VmHWM" in probe.method or "ru_maxrss" in probe.method


def test_ratios_and_loss_agreement():
    def result(train_ms, memory, loss):
        phase = {"median_ms": train_ms, "peak_memory_bytes": memory}
        return {"train": phase, "inference": phase, "first_loss": loss}

    results = {"fused": result(10.0, 100, 0.5), "naive": result(40.0, 400, 0.5)}
    ratios = ratios_to_baseline(results)
    assert ratios["fused"]["train_speedup"] == 4.0 and ratios["fused"]["train_memory_ratio"] == 0.25
    assert ratios_to_baseline({"fused": results["fused"]}) is None
    assert losses_agree(results) and not losses_agree({**results, "naive": result(40.0, 400, 0.6)})


def test_report_table_without_naive_has_no_ratio_rows():
    phase = {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0, "images_per_s": 3200.0,
             "peak_memory_bytes": 2**20, "routing_share": 0.5, "compile_s": None}  # fmt: skip
    result = {"allocator": {"name": "tuned", "applied": True}, "threads": 2, "device_name": "cpu",
              "train": phase, "inference": phase, "first_loss": 0.1}  # fmt: skip
    report = {
        "config": {"batch_size": 32, "iterations": 2, "device": "cpu", "dtype": "fp32", "compile": False, "warmup": 2, "steps": 5},
        "machine": {"cpu_model": "Test CPU", "cores": 2, "torch_version": "x"},
        "model": {"name": "smallnorb", "parameters": 67154},
        "results": {"fused": result}, "ratios": None, "verification": None, "losses_agree": True,
    }  # fmt: skip
    text = format_report(report)
    assert "67,154 parameters" in text and "fused: tuned" in text and "50%" in text and "3200.0" in text
    assert "vs naive" not in text


def test_report_table_gives_ratios_to_fused_and_warns_when_a_kernel_was_missing():
    phase = {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0, "images_per_s": 3200.0,
             "peak_memory_bytes": 2**20, "routing_share": 0.5, "compile_s": None}  # fmt: skip
    slow = {**phase, "median_ms": 40.0}
    blocked = {"allocator": {"name": "default", "applied": False}, "threads": 2, "device_name": "cpu",
               "train": phase, "inference": phase, "first_loss": 0.1, "routing_kernel": "fused fallback (no kernel)"}  # fmt: skip
    fused = {**blocked, "train": slow, "inference": slow, "routing_kernel": None}
    results = {"blocked": blocked, "fused": fused}
    report = {
        "config": {"batch_size": 32, "iterations": 2, "device": "cpu", "dtype": "fp32", "compile": False, "warmup": 2, "steps": 5},
        "machine": {"cpu_model": "Test CPU", "cores": 2, "torch_version": "x"},
        "model": {"name": "smallnorb", "parameters": 67154},
        "results": results, "ratios": None, "ratios_vs_fused": ratios_to_baseline(results, "fused"),
        "verification": None, "losses_agree": True,
    }  # fmt: skip
    lines = format_report(report).splitlines()
    speedups = [line for line in lines if line.startswith("  speed-up vs fused")]
    assert len(speedups) == 2 and all(line.split()[-2:] == ["4.00x", "1.00x"] for line in speedups)
    assert "WARNING: --impl blocked had no compiled kernel: its column measured the fused fallback (no kernel)" in lines
