"""What a new user meets around ``matcaps train/test/plot``: damaged checkpoints, resume bookkeeping,
epoch numbers, one-line errors, where the data are recorded, unreadable metrics, confusion titles."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_fixtures import FAST
from train_support import TINY_MODEL_OPTIONS, damage_checkpoint, state_dicts_equal

from matcaps.cli import main
from matcaps.train import load_checkpoint, load_config_file, read_metrics
from matcaps.train.metrics import MetricsWriter
from matcaps.train.run import describe_progress, epoch_of_last_step

STEPS_PER_EPOCH = 10
QUIET = ["--no-progress", "--workers", "0"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""




def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------------------------------------- 1. damaged checkpoints


@pytest.mark.parametrize(("kind", "reason"), [
    ("random", "the file is not a PyTorch checkpoint archive"),
    ("truncated", "the archive is truncated or corrupted"),
    ("empty", "the file is empty"),
])  # fmt: skip
def test_a_damaged_last_checkpoint_is_named_and_the_readable_best_one_offered(kind, reason, trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    last, best = run / "last.pt", run / "best.pt"
    best_step = load_checkpoint(best)["state"]["step"]
    damage_checkpoint(last, kind)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert main(["test", str(run), "--checkpoint", "last", *QUIET]) == 2
    damaged = f"checkpoint {last} is damaged or not a matcaps checkpoint ({reason}); the run's other checkpoint {best} " \
              f"(step {best_step}) is readable"  # fmt: skip
    assert error_lines(capsys) == [
        f"matcaps train: error: {damaged}: copy it to {last} to resume from step {best_step}",
        f"matcaps test: error: {damaged}: test it with `matcaps test {best}`",
    ]
    # Both pieces of advice work.
    assert main(["test", str(best), *QUIET]) == 0
    shutil.copyfile(best, last)
    assert main(["train", "--resume", str(run)]) == 0
    assert load_checkpoint(last)["state"]["step"] == 2 * STEPS_PER_EPOCH


def test_a_damaged_best_checkpoint_offers_the_last_one(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    damage_checkpoint(run / "best.pt", "unsafe-object")
    capsys.readouterr()
    assert main(["test", str(run), *QUIET]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"matcaps test: error: checkpoint {run / 'best.pt'} is damaged or not a matcaps checkpoint")
    assert line.endswith(f"(step 20) is readable: test it with `matcaps test {run / 'last.pt'}`")
    assert "weights_only" not in line


# ---------------------------------------------------------------------------------------------- 2. resume bookkeeping


def test_resuming_with_more_epochs_updates_config_toml_which_then_reproduces_the_run(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert load_config_file(run / "config.toml")["epochs"] == 3
    header = [line for line in (run / "config.toml").read_text().splitlines() if line.startswith("#")]
    assert len(header) == 2 and re.fullmatch(r"# resumed at step 20 on \S+: epochs 2 -> 3", header[1])
    again = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.toml"), "--run-dir", str(again)]) == 0
    resumed, whole = load_checkpoint(run / "last.pt"), load_checkpoint(again / "last.pt")
    assert resumed["state"]["step"] == whole["state"]["step"] == 3 * STEPS_PER_EPOCH
    assert state_dicts_equal(resumed["model"], whole["model"])


def test_resuming_a_finished_run_says_so_and_writes_nothing(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    before = {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in run.rglob("*")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{run} is already finished (step 20 of 20, 2 epochs completed); nothing to do: "
                              "resume with a larger --epochs or --max-steps to train longer\n")
    assert not any(line.startswith(("resuming", "training")) for line in printed.splitlines())
    assert {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in run.rglob("*")} == before


# ---------------------------------------------------------------------------------------------- 3. epoch numbers


def test_progress_and_checkpoint_epochs_count_from_one():
    assert describe_progress(2, 0, 10) == "2 epochs completed"
    assert describe_progress(0, 10, 10) == "1 epoch completed"  # complete, counter not yet advanced
    assert describe_progress(0, 7, 10) == "epoch 1, 7 of 10 batches done"
    assert describe_progress(3, 1) == "epoch 4, 1 batch done"
    assert epoch_of_last_step({"epoch": 2, "batch_in_epoch": 0}) == 2  # last.pt after epoch 2
    assert epoch_of_last_step({"epoch": 0, "batch_in_epoch": 10}) == 1  # best.pt of epoch 1's validation
    assert epoch_of_last_step({"epoch": 1, "batch_in_epoch": 3}) == 2
    assert epoch_of_last_step({"epoch": 0, "batch_in_epoch": 0}) == 0  # no step yet


def test_epochs_count_from_one_in_the_log_metrics_resume_and_test_report(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), "--max-steps", "7"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1 step 7: validation accuracy" in printed  # the run stopped inside the first epoch
    assert "finished at step 7 (epoch 1, 7 batches done)" in printed
    assert main(["train", "--resume", str(run), "--max-steps", "20"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {run} at step 7 (epoch 1, 7 of 10 batches done)" in printed
    assert "epoch 1 step 10: validation" in printed and "epoch 2 step 20: validation" in printed
    assert "finished at step 20 (2 epochs completed)" in printed

    records = read_metrics(run)
    assert [(r["step"], r["epoch"]) for r in records if r["phase"] == "val"] == [(7, 1), (10, 1), (20, 2)]
    train = [(r["step"], r["epoch"]) for r in records if r["phase"] == "train"]
    assert train and all(epoch == (step - 1) // STEPS_PER_EPOCH + 1 for step, epoch in train)

    for checkpoint in ("best", "last"):
        assert main(["test", str(run), "--checkpoint", checkpoint, *QUIET]) == 0
        report = json.loads((run / f"test-standard-{checkpoint}.json").read_text())
        step = load_checkpoint(run / f"{checkpoint}.pt")["state"]["step"]
        assert report["step"] == step and report["epoch"] == (step - 1) // STEPS_PER_EPOCH + 1
        assert f"(step {step}, epoch {report['epoch']})" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 4. errors


@pytest.mark.parametrize("arguments", [
    ["train", "--lr", "abc"], ["train", "--no-such-option"], ["test"], ["test", "x", "--checkpoint", "first"],
    ["plot"], ["data", "cifar"], ["bench", "--steps", "many"], ["nothing"],
])  # fmt: skip
def test_command_line_syntax_errors_are_one_line_without_the_usage(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    prog = "matcaps" if arguments[0] == "nothing" else f"matcaps {arguments[0]}"
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"{prog}: error: ") and line.endswith(f"(see {prog} --help)")


def test_yaml_errors_keep_the_line_and_column(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("epochs: 3\nlr: [\n")
    (tmp_path / "indent.yaml").write_text("epochs: 3\n  lr: 2\n")
    assert main(["train", "--config", str(tmp_path / "list.yaml")]) == 2
    assert main(["train", "--config", str(tmp_path / "indent.yaml")]) == 2
    first, second = error_lines(capsys)
    assert first == (f"matcaps train: error: cannot parse configuration file {tmp_path / 'list.yaml'}: while parsing "
                     "a flow node; expected the node content, but found '<stream end>' (at line 3, column 1)")
    assert second.endswith("mapping values are not allowed here (at line 2, column 5)")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--l2", "-1"], "--l2 must be a non-negative number, got -1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a non-negative number, got -1.0"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--config", "{bad_file}"], "configuration file {bad_file}: option batch_size must be at least 1, got 0"),
    (["--config", "{bad_file}", "--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--resume", "{run}", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--resume", "{run}", "--seed", "3"], "cannot change --seed when resuming (only --allocator, --checkpoint-every, "),
])  # fmt: skip
def test_errors_name_the_flag_typed_or_the_file(arguments, message, trained_run, tmp_path, capsys):
    paths = {"bad_file": tmp_path / "bad.toml", "run": trained_run}
    paths["bad_file"].write_text("batch_size = 0\n")
    assert main(["train", *(a.format(**paths) for a in arguments)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("matcaps train: error: " + message.format(**paths))


def test_a_bad_model_option_in_a_file_names_the_file(config_file, tmp_path, capsys):
    from matcaps.train.config import to_toml

    values = load_config_file(config_file)
    values["model_options"] = {**values["model_options"], "conv1_chanels": 8}
    typo = tmp_path / "typo.toml"
    typo.write_text(to_toml(values))
    assert main(["train", "--config", str(typo), "--run-dir", str(tmp_path / "run")]) == 2
    assert error_lines(capsys) == [f"matcaps train: error: configuration file {typo}: unknown model option(s): conv1_chanels"]
    assert not (tmp_path / "run").exists()


def test_test_command_blames_one_option_at_a_time_and_knows_run_directories(tmp_path, trained_run, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["test", str(trained_run), "--batch-size", "0", "--workers", "-1"]) == 2
    assert main(["test", str(trained_run), "--workers", "-1"]) == 2
    assert main(["test", str(tmp_path / "empty")]) == 2
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert error_lines(capsys) == [
        "matcaps test: error: --batch-size must be at least 1, got 0",
        "matcaps test: error: --workers must not be negative, got -1",
        f"matcaps test: error: {tmp_path / 'empty'} is not a run directory (no config.toml)",
        f"matcaps train: error: {tmp_path / 'empty'} is not a run directory (no config.toml)",
    ]


def test_a_run_stopped_before_its_first_checkpoint_and_leftover_files_are_named_not_reused(trained_run, tmp_path,
                                                                                          capsys):
    stopped = tmp_path / "stopped"  # what a run killed before its first checkpoint leaves
    stopped.mkdir()
    shutil.copy(trained_run / "config.toml", stopped)
    shutil.copy(trained_run / "metrics.jsonl", stopped)
    leftovers = tmp_path / "leftovers"  # a run directory's files without its configuration
    leftovers.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", leftovers)
    before = {path: path.read_bytes() for path in [*stopped.iterdir(), *leftovers.iterdir()]}
    config = str(trained_run / "config.toml")
    assert main(["train", "--resume", str(stopped)]) == 2
    assert main(["train", "--config", config, "--run-dir", str(stopped)]) == 2
    assert main(["train", "--config", config, "--run-dir", str(leftovers)]) == 2
    assert main(["train", "--resume", str(trained_run), "--run-dir", str(tmp_path / "x"), "--name", "y"]) == 2
    assert error_lines(capsys) == [
        f"matcaps train: error: {stopped} stopped before its first checkpoint: nothing to resume; train it again "
        f"with --config {stopped / 'config.toml'} and another --run-dir",
        f"matcaps train: error: run directory {stopped} holds a run that stopped before its first checkpoint; "
        f"choose another --run-dir/--name (its options: --config {stopped / 'config.toml'})",
        f"matcaps train: error: run directory {leftovers} already holds metrics.jsonl of another run; "
        "choose another --run-dir/--name",
        f"matcaps train: error: --resume {trained_run} continues the run in that directory; do not combine it "
        "with --run-dir, --name",
    ]
    assert {path: path.read_bytes() for path in [*stopped.iterdir(), *leftovers.iterdir()]} == before


# ---------------------------------------------------------------------------------------------- 6. data_root


def test_config_toml_records_the_data_root_absolute_so_it_works_from_anywhere(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(data_root.parent)
    run = tmp_path / "run"
    fast = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items() if key not in ("model_options", "progress")]
    options = [*fast, "--no-progress", *(f"--model-option={k}={v}" for k, v in TINY_MODEL_OPTIONS.items())]
    assert main(["train", *options, "--data-root", data_root.name, "--run-dir", str(run), "--max-steps", "2"]) == 0
    assert load_config_file(run / "config.toml")["data_root"] == str(data_root.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(run / "config.toml"), "--run-dir", "again"]) == 0
    assert state_dicts_equal(load_checkpoint(run / "last.pt")["model"], load_checkpoint("again/last.pt")["model"])
    header = Path("again/config.toml").read_text().splitlines()[0]  # a relative --run-dir, written absolute
    assert header.endswith(f"reproduce with: matcaps train --config {(elsewhere / 'again').resolve() / 'config.toml'}")
    assert main(["test", str(run), *QUIET]) == 0


# ---------------------------------------------------------------------------------------------- 7. plot


def test_plot_warns_about_unreadable_metrics_lines_with_their_numbers(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:20]  # cut, as by a crash
    lines.insert(4, "[1, 2]")  # valid JSON, not a record
    metrics.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert error_lines(capsys) == [f"matcaps plot: warning: {metrics}: skipped unreadable lines 3, 5"]
    assert len(read_metrics(run)) == len(lines) - 2


def test_plot_output_goes_into_a_new_folder(trained_run, tmp_path, capsys):
    output = tmp_path / "figures" / "curves" / "tiny.png"
    assert main(["plot", str(trained_run), "--output", str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG") and str(output) in capsys.readouterr().out
    assert not list(output.parent.glob(".*.tmp"))  # written whole, through a temporary file


def test_a_resumed_run_does_not_glue_its_first_record_to_a_line_cut_by_the_crash(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "phase": "train", "loss": 0.5}\n{"step": 2, "ep')
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.scalars("train", 3, 1, {"loss": 0.25})
    writer.close()
    warnings: list[str] = []
    records = read_metrics(tmp_path, warn=warnings.append)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (3, 0.25)]
    assert warnings == [f"{tmp_path / 'metrics.jsonl'}: skipped unreadable line 2"]


# ---------------------------------------------------------------------------------------------- 9. confusion titles


def test_confusion_png_titles_name_the_checkpoint_and_the_split(trained_run, tmp_path, monkeypatch):
    import matplotlib.axes

    titles: list[str] = []
    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, *a, **k: (titles.append(text),
                                                                                           original(self, text, *a, **k))[1])
    run = copy_run(trained_run, tmp_path)
    assert main(["test", str(run), "--checkpoint", "last", "--split", "azimuth", *QUIET]) == 0
    assert main(["test", str(run), "--checkpoint", "best", *QUIET]) == 0
    best = json.loads((run / "test-standard-best.json").read_text())
    last = json.loads((run / "test-azimuth-last.json").read_text())
    assert titles == [
        f"smallnorb azimuth test set\nlast.pt (step 20, epoch 2): accuracy {100 * last['accuracy']:.2f} %",
        f"smallnorb standard test set\nbest.pt (step {best['step']}, epoch {best['epoch']}): "
        f"accuracy {100 * best['accuracy']:.2f} %",
    ]
