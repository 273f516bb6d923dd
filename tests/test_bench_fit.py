"""``matcaps bench --batch-size max``: the search for the largest batch, its probe, and how the runner uses it."""

from __future__ import annotations

import pytest
import torch

from matcaps.bench import runner
from matcaps.bench.config import LARGEST_BATCH, BenchConfig, parse_batch_size
from matcaps.bench.fit import largest_fitting_batch, training_step_fits
from matcaps.bench.report import format_report
from matcaps.errors import ConfigError


@pytest.mark.parametrize("capacity", [64, 65, 100, 127, 128, 129, 1000, 4500, 4096, 70_000])
def test_search_finds_the_largest_fitting_size_within_its_precision(capacity):
    largest, tried = largest_fitting_batch(lambda size: size <= capacity, start=64, limit=1 << 16, bisect_steps=3)
    # Never larger than what fits, and every probe's answer is the predicate's.
    assert largest <= capacity and all(fitted == (size <= capacity) for size, fitted in tried)
    # Within an eighth of the bracketing power of two (3 bisection steps), or exact at the limit.
    assert capacity - largest < max(largest / 8 + 8, 1) or largest == 1 << 16
    # Sizes after the start are multiples of 8; no size is probed twice.
    assert all(size % 8 == 0 for size, _ in tried[1:]) and len({s for s, _ in tried}) == len(tried)


def test_search_reports_none_when_not_even_the_start_fits_and_stops_at_the_limit():
    assert largest_fitting_batch(lambda size: False, start=64) == (None, [(64, False)])
    largest, tried = largest_fitting_batch(lambda size: True, start=64, limit=300)
    assert largest == 300 and [size for size, _ in tried] == [64, 128, 256, 300]
    with pytest.raises(ValueError):
        largest_fitting_batch(lambda size: True, start=0)


def test_search_is_exact_with_enough_bisection_steps():
    largest, _ = largest_fitting_batch(lambda size: size <= 1000, start=64, bisect_steps=20, multiple=1)
    assert largest == 1000


def test_probe_catches_only_out_of_memory_and_frees_the_step():
    calls = []

    def make_step(batch):
        def step():
            calls.append(batch)
            if batch > 100:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        return step

    assert training_step_fits(make_step, 64) and calls == [64, 64]  # two steps: optimiser state, then steady
    assert not training_step_fits(make_step, 128)

    def broken(batch):
        raise ValueError("a bug, not a lack of memory")

    with pytest.raises(ValueError):
        training_step_fits(broken, 64)


def test_batch_size_option_parses_max_and_refuses_it_on_a_cpu():
    assert parse_batch_size("max") == LARGEST_BATCH and parse_batch_size(" MAX ") == LARGEST_BATCH
    assert parse_batch_size("48") == 48
    with pytest.raises(ConfigError, match="--batch-size: expected a positive integer or 'max'"):
        parse_batch_size("lots")
    with pytest.raises(ConfigError, match="--batch-size max: needs a CUDA device"):
        BenchConfig(batch_size=LARGEST_BATCH, device="cpu")
    assert BenchConfig(batch_size=LARGEST_BATCH, device="cuda").batch_size == LARGEST_BATCH


def _phase(median_ms: float, batch: int) -> dict:
    return {"median_ms": median_ms, "min_ms": median_ms, "max_ms": median_ms, "step_ms": [median_ms],
            "images_per_s": 1000.0 * batch / median_ms, "cpu_median_ms": median_ms, "peak_memory_bytes": 2**30,
            "routing_share": 0.5, "routed_ms": 1.0, "routing_share_steps": 2, "compile_s": None}  # fmt: skip


def _fake_worker(capacities: dict[str, int | None], median_ms: float = 100.0):
    """A stand-in for the worker processes: the search returns ``capacities[impl]``; a timed phase
    reports ``median_ms`` at whatever batch it was given."""
    seen = []

    def run_worker(config, implementation, phase):
        seen.append((implementation, phase, config.batch_size))
        if phase == "fit":
            found = capacities[implementation]
            return {"batch_size": found, "tried": [[64, found is not None]]}
        return {**_phase(median_ms, config.batch_size), "first_value": 0.5, "allocator": {"name": "default", "applied": False},
                "threads": 1, "device_name": "fake GPU", "torch_version": "x", "parameters": 10,
                "memory_method": "fake", "routing_kernel": None, "profile": None, "trace": None}  # fmt: skip

    return run_worker, seen


def test_runner_times_each_implementation_at_its_own_largest_batch(monkeypatch):
    run_worker, seen = _fake_worker({"fused": 4096, "naive": 1024})
    monkeypatch.setattr(runner, "run_worker", run_worker)
    config = BenchConfig(batch_size=LARGEST_BATCH, device="cuda", implementations=("fused", "naive"))
    results = {name: runner.measure_implementation(config, name) for name in config.implementations}
    assert seen == [("fused", "fit", "max"), ("fused", "train", 4096), ("fused", "inference", 4096),
                    ("naive", "fit", "max"), ("naive", "train", 1024), ("naive", "inference", 1024)]  # fmt: skip
    assert results["fused"]["batch_size"] == 4096 and results["fused"]["batch_search"] == [[64, True]]
    # Same step time at 4× the batch: 4× the images per second.
    ratios = runner.ratios_to_baseline(results)
    assert ratios["fused"]["train_speedup"] == pytest.approx(4.0) and ratios["naive"]["train_speedup"] == 1.0
    report = {
        "config": {**config.to_dict()}, "machine": {"cpu_model": "c", "cores": 16, "torch_version": "x"},
        "model": {"name": "smallnorb", "parameters": 10}, "results": results, "ratios": ratios,
        "verification": None, "losses_agree": True,
    }  # fmt: skip
    text = format_report(report)
    assert "the largest training batch that fits (fused 4096, naive 1024)" in text
    assert any(line.split()[-2:] == ["4096", "1024"] for line in text.splitlines() if "batch (images / step)" in line)


def test_runner_says_when_not_even_the_first_batch_fits(monkeypatch):
    run_worker, _ = _fake_worker({"naive": None})
    monkeypatch.setattr(runner, "run_worker", run_worker)
    config = BenchConfig(batch_size=LARGEST_BATCH, device="cuda", implementations=("naive",))
    with pytest.raises(runner.BenchWorkerError, match="not even 64 images per training step fit"):
        runner.measure_implementation(config, "naive")
