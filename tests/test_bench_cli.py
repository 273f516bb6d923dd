"""``matcaps bench`` end to end (real worker processes, a tiny network) and its option errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from matcaps.bench.config import BenchConfig
from matcaps.bench.report import MACHINE_KEYS, PHASE_KEYS, REPORT_KEYS, RESULT_KEYS
from matcaps.bench.runner import resolve_device
from matcaps.cli import main
from matcaps.errors import ConfigError
from matcaps.models import PRESETS

#: A network small enough for a 2-core test run: 16×16 input → 8×8 primary caps, 3×3, 1×1.
TINY = [
    "--set", "conv1_channels=8", "--set", "primary_types=2", "--set", "conv_caps1_types=3",
    "--set", "conv_caps2_types=3", "--set", "image_size=16",
]  # fmt: skip
QUICK = ["--batch-size", "2", "--steps", "1", "--warmup", "0"]


def test_bench_measures_both_implementations_and_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    code = main(["bench", *TINY, *QUICK, "--impl", "fused", "naive", "--threads", "1", "--json", str(path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "speed-up vs naive" in printed and "verified: outputs and gradients of fused, naive agree" in printed

    report = json.loads(path.read_text())
    assert set(REPORT_KEYS) <= report.keys()
    assert report["schema"] == "matcaps-bench/1"
    assert set(MACHINE_KEYS) <= report["machine"].keys()
    assert report["machine"]["cores"] >= 1 and report["machine"]["threads"] == 1
    assert report["machine"]["torch_version"] == torch.__version__ and report["machine"]["cpu_model"]
    assert report["config"]["batch_size"] == 2 and report["config"]["implementations"] == ["fused", "naive"]
    assert report["model"]["config"]["conv1_channels"] == 8 and report["model"]["parameters"] > 0
    assert list(report["results"]) == ["fused", "naive"]
    for name, result in report["results"].items():
        assert set(RESULT_KEYS) <= result.keys(), name
        assert result["implementation"] == name and result["threads"] == 1
        assert result["allocator"]["name"] == "default" and not result["allocator"]["applied"]
        for phase in ("train", "inference"):
            measured = result[phase]
            assert set(PHASE_KEYS) <= measured.keys(), (name, phase)
            assert len(measured["step_ms"]) == 1
            for key in ("median_ms", "min_ms", "max_ms", "images_per_s", "cpu_median_ms", "peak_memory_bytes", "routed_ms"):
                assert measured[key] > 0, (name, phase, key)
            assert measured["min_ms"] <= measured["median_ms"] <= measured["max_ms"]
            assert 0 < measured["routing_share"] < 1
            assert measured["images_per_s"] == pytest.approx(2000 / measured["median_ms"])
    # The same weights and data were timed: same first loss, verified gradients, ratios to naive.
    assert report["losses_agree"] is True
    assert report["verification"]["max_relative_difference"]["naive"] < 1e-3
    assert report["ratios"]["naive"]["train_speedup"] == 1.0
    assert report["ratios"]["fused"]["inference_speedup"] > 0


def test_bench_builds_the_blocked_kernel_first_and_reports_speed_ups_against_fused(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", *TINY, *QUICK, "--impl", "blocked", "fused", "--threads", "1", "--json", str(path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "speed-up vs fused" in printed and "vs naive" not in printed and "WARNING" not in printed
    report = json.loads(path.read_text())
    assert report["kernels"]["blocked"]["available"] is True and report["kernels"]["blocked"]["seconds"] >= 0
    assert report["results"]["blocked"]["routing_kernel"] == "compiled"
    assert report["results"]["fused"]["routing_kernel"] is None
    assert report["ratios"] is None and report["ratios_vs_fused"]["fused"]["train_speedup"] == 1.0
    assert report["ratios_vs_fused"]["blocked"]["inference_speedup"] > 0
    assert report["losses_agree"] is True and report["verification"]["max_relative_difference"]["fused"] < 1e-3


@pytest.mark.parametrize(
    "options,message",
    [
        (["--iters", "4"], "--iters"),
        (["--model", "cifar"], "--model: unknown model 'cifar'"),
        (["--impl", "fast"], "--routing-impl: unknown routing implementation 'fast'"),
        (["--routing-impl", "fused", "fused"], "--routing-impl: an implementation is listed twice"),
        (["--set", "conv1_channels=many"], "--set: model option conv1_channels must be a positive integer"),
        (["--set", "wings=2"], "--set: unknown model option(s): wings"),
        (["--set", "routing.iterations=3"], "--set routing.iterations: the bench sets it with --iters"),
        (["--steps", "0"], "--steps"),
        (["--dtype", "fp16"], "--precision"),
        (["--precision", "fp16"], "--precision: unknown value 'fp16'"),
        (["--allocator", "jemalloc"], "--allocator"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(options, message, capsys):
    assert main(["bench", *options]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("matcaps bench: error: ") and message in error


def test_help_is_wrapped_at_80_columns_and_shows_defaults_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "(default " not in text  # always "(default: …)", as the other commands write it
    flat = " ".join(text.split())
    for shown in ("--model {" + ",".join(PRESETS) + "}", "--precision {fp32,bf16}", "--allocator {default,tuned}",
                  "--iters {1,2,3}", "auto, cpu, cuda or cuda:N", "(default: smallnorb)", "(default: fp32)",
                  "(default: default)", "seed of the weights and random input (default: 0)", "(default: cpu)"):
        assert shown in flat, shown


def test_device_accepts_auto_and_cuda_n_like_train():
    assert BenchConfig(device="auto").device == "auto" and BenchConfig(device="cuda:1").device == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ConfigError, match=rf"--device: unknown device '{bad}'; choose one of auto, cpu, cuda, cuda:N"):
            BenchConfig(device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_when_unavailable_is_one_line_and_exit_2(capsys):
    assert main(["bench", *TINY, *QUICK, "--device", "cuda"]) == 2
    assert main(["bench", *TINY, *QUICK, "--device", "cuda:1"]) == 2
    first, second = capsys.readouterr().err.splitlines()
    assert "--device cuda: CUDA is not available" in first and "--device cuda:1: CUDA is not available" in second


def test_python_m_matcaps_bench_reports_bad_options_as_one_line():
    completed = subprocess.run(
        [sys.executable, "-m", "matcaps.bench", "--iters", "4"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "matcaps bench: error: --iters: routing iterations must be one of 1, 2, 3, got 4"
    ]
