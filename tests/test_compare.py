"""``matcaps compare``: run summaries against hand-built records and against the trainer's own best.pt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from matcaps.cli import main
from matcaps.compare import format_table, summarise_run, training_seconds
from matcaps.train.checkpoint import load_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, records: list[dict], config: str | None = None, tests: dict[str, str] | None = None) -> Path:
    """A run directory with ``metrics.jsonl`` holding ``records`` (in this order), a config and test reports."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (folder / "config.toml").write_text(config)
    for name, text in (tests or {}).items():
        (folder / f"test-{name}.json").write_text(text)
    return folder


def record(phase: str, step: int, time: float, **values: float) -> dict:
    return {"step": step, "epoch": 1, "phase": phase, "time": time, **values}


#: Training every 10 s, a validation 2 s after the training record of its step, and a pause of
#: 978 s (stopped, resumed) between steps 30 and 40: 34 s of training in all, 22 s up to step 30.
PAUSED_RUN = [
    record("train", 10, 0.0, loss=0.5, grad_norm_mean=3.0),
    record("train", 20, 10.0, loss=0.2, grad_norm_mean=2.0),
    record("val", 20, 12.0, accuracy=0.97),
    record("train", 30, 20.0, loss=0.1, grad_norm_mean=1.0),
    record("val", 30, 22.0, accuracy=0.99),
    record("train", 40, 1000.0, loss=0.05, grad_norm_mean=1.0),
    record("train", 50, 1010.0, loss=0.04, grad_norm_mean=1.0),
    record("val", 50, 1012.0, accuracy=0.99),
]
CONFIG = 'dataset = "mnist"\nmodel = "mnist"\niters = 3\nseed = 1\n'
TESTS = {"standard-best": '{"accuracy": 0.9943}', "standard-best-13crops": '{"accuracy": 0.9945}'}


def test_summary_of_a_paused_run(tmp_path):
    run = write_run(tmp_path / "paused", PAUSED_RUN, CONFIG, TESTS)
    summary = summarise_run(run, thresholds=[0.98, 0.995, 0.97])
    assert (summary.dataset, summary.model, summary.iterations, summary.seed) == ("mnist", "mnist", 3, 1)
    assert summary.last_step == 50
    assert summary.training_minutes == pytest.approx(34.0 / 60.0)
    assert (summary.best_val_accuracy, summary.best_val_step) == (0.99, 30)  # the first of two equal bests
    assert summary.steps_to == {0.98: 30, 0.995: None, 0.97: 20}
    assert summary.minutes_to[0.98] == pytest.approx(22.0 / 60.0) and summary.minutes_to[0.995] is None
    assert summary.tests == {"standard-best": 0.9943, "standard-best-13crops": 0.9945}


def test_pauses_are_left_out_but_slow_logging_windows_are_not():
    assert training_seconds([0.0, 10.0, 20.0, 2000.0, 2010.0]) == [0.0, 10.0, 20.0, 20.0, 30.0]
    slow = [300.0 * i for i in range(6)]  # 300 s per log window: slow, not paused
    assert training_seconds(slow) == slow
    assert training_seconds([5.0]) == [0.0] and training_seconds([]) == []


def test_a_resumed_run_counts_its_repeated_steps_once(tmp_path):
    repeated = [*PAUSED_RUN[:5], record("train", 30, 500.0, loss=0.1), record("val", 30, 502.0, accuracy=0.985)]
    summary = summarise_run(write_run(tmp_path / "resumed", repeated, CONFIG), thresholds=[0.98])
    assert summary.best_val_accuracy == 0.985 and summary.steps_to == {0.98: 30}  # the later record of step 30 wins


def test_runs_without_validation_config_or_tests_and_the_cnn_baseline(tmp_path):
    bare = summarise_run(write_run(tmp_path / "bare", [r for r in PAUSED_RUN if r["phase"] == "train"]))
    assert bare.best_val_accuracy is bare.best_val_step is None and bare.steps_to == {0.98: None}
    assert bare.dataset is bare.iterations is bare.seed is None and bare.tests == {}
    cnn = summarise_run(write_run(tmp_path / "cnn", PAUSED_RUN, 'dataset = "mnist"\nmodel = "cnn-baseline"\niters = 2\n'))
    assert cnn.model == "cnn-baseline" and cnn.iterations is None
    header, *rows = format_table([bare, cnn]).splitlines()
    assert "best val % (step)" in header and len(rows) == 2
    assert rows[0].split()[1:4] == ["—", "—", "—"]  # data, iterations, seed
    assert rows[1].split()[1:3] == ["mnist", "—"]


def test_damaged_values_are_left_blank_not_fatal(tmp_path):
    damaged = [{**PAUSED_RUN[0], "time": "noon"}, *PAUSED_RUN[1:4], {**PAUSED_RUN[4], "accuracy": "high"}, *PAUSED_RUN[5:]]
    run = write_run(tmp_path / "odd", damaged, 'dataset = 7\nmodel = "mnist"\niters = true\nseed = "one"\n')
    summary = summarise_run(run)
    assert (summary.dataset, summary.iterations, summary.seed) == (None, None, None)
    assert (summary.best_val_accuracy, summary.best_val_step) == (0.99, 50)  # step 30's accuracy is unreadable
    assert summary.training_minutes == pytest.approx(34.0 / 60.0)  # a time that is no number is read as 0
    assert len(format_table([summary]).splitlines()) == 2


def test_unreadable_config_and_test_reports_are_skipped_with_a_warning(tmp_path):
    tests = {**TESTS, "broken": "{", "no-accuracy": '{"loss": 1}', "nan": '{"accuracy": NaN}'}
    run = write_run(tmp_path / "damaged", PAUSED_RUN, "dataset = [", tests)
    warnings: list[str] = []
    summary = summarise_run(run, warn=warnings.append)
    assert summary.tests == {"standard-best": 0.9943, "standard-best-13crops": 0.9945}
    assert summary.dataset is None and summary.best_val_step == 30
    assert len(warnings) == 4
    assert any(str(run / "config.toml") in w for w in warnings)
    for name in ("broken", "no-accuracy", "nan"):
        assert any(str(run / f"test-{name}.json") in w and "skipped" in w for w in warnings)


def test_the_best_step_is_the_step_of_the_trainers_best_checkpoint(trained_run):
    summary = summarise_run(trained_run)
    best = load_checkpoint(trained_run / "best.pt")["state"]
    assert summary.best_val_step == best["step"] == best["best_step"]
    assert summary.best_val_accuracy == pytest.approx(best["best_val_accuracy"], abs=1e-12)
    assert summary.last_step == load_checkpoint(trained_run / "last.pt")["state"]["step"] == 20
    assert summary.dataset == "smallnorb" and summary.iterations == 2
    assert 0.0 < summary.training_minutes < 60.0


def test_compare_command_prints_every_format_and_draws_the_runs(tmp_path, trained_run, capsys):
    paused = write_run(tmp_path / "paused", PAUSED_RUN, CONFIG, TESTS)
    tiny = tmp_path / "tiny"
    shutil.copytree(trained_run, tiny)
    assert main(["compare", str(paused), str(tiny), "--format", "json", "--threshold", "0.98", "0.5"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["run"] for s in summaries] == [str(paused), str(tiny)]
    assert summaries[0]["steps_to"] == {"0.98": 30, "0.5": 20} and summaries[0]["tests"]["standard-best"] == 0.9943

    assert main(["compare", str(paused), str(tiny), "--format", "markdown", "--plot", str(tmp_path / "runs.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | data | iters |") and lines[1].startswith("| --- |")
    assert lines[2].startswith(f"| {paused} | mnist | 3 | 1 | 50 | 0.6 | 99.00 (30) | 30 (0.4) | 99.43 |")
    assert "standard-best-13crops 99.45" in lines[2] and lines[3].startswith(f"| {tiny} | smallnorb | 2 |")
    assert lines[4] == f"saved {tmp_path / 'runs.png'}"
    assert (tmp_path / "runs.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_damaged_metrics_line_is_reported_once_for_table_and_figure(tmp_path, capsys):
    run = write_run(tmp_path / "cut", PAUSED_RUN)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 60, "pha')  # a line cut by a crash
    assert main(["compare", str(run), "--plot", str(tmp_path / "cut.png")]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "skipped unreadable line 9" in warnings[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{missing}"], "has no metrics.jsonl"),
        (["{run}", "--threshold", "98"], r"fraction in \(0, 1\] \(0.98 for 98 %\), got 98"),
        (["{run}", "--threshold", "0"], r"fraction in \(0, 1\]"),
        (["{run}", "--threshold", "nan"], r"fraction in \(0, 1\]"),
        (["{empty_run}", "--plot", "{png}"], "nothing to draw"),
        (["{run}", "--format", "csv"], "invalid choice"),
    ],
)
def test_compare_errors_are_one_line(arguments, message, tmp_path, capsys):
    paths = {"missing": tmp_path / "missing", "run": write_run(tmp_path / "run", PAUSED_RUN),
             "empty_run": write_run(tmp_path / "empty", []), "png": tmp_path / "empty.png"}  # fmt: skip
    try:
        code = main(["compare", *(a.format(**paths) for a in arguments)])
    except SystemExit as stop:  # argparse's own checks exit
        code = stop.code
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("matcaps compare: error: ")
    assert __import__("re").search(message, error)
    assert not (tmp_path / "empty.png").exists()
