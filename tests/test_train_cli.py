"""``matcaps train`` → ``matcaps test`` → ``matcaps plot`` on a tiny prepared smallNORB, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import state_dicts_equal
from torch.utils.data import DataLoader

from matcaps.allocator import glibc_version
from matcaps.cli import main
from matcaps.data import DataConfig, load_splits
from matcaps.models import build_model, model_config_from_dict
from matcaps.train import load_checkpoint, read_metrics



@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""




def independent_accuracy(run: Path, checkpoint: str, data_root: Path, split: str = "standard") -> tuple[float, torch.Tensor]:
    """Accuracy and confusion matrix recomputed without matcaps.evaluate."""
    payload = load_checkpoint(run / checkpoint)
    model = build_model(model_config_from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    test = load_splits(DataConfig(root=data_root, split=split, validation=False)).test
    confusion = torch.zeros(5, 5, dtype=torch.long)
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=64):
            predictions = model(images).scores.argmax(dim=1)
            for label, prediction in zip(labels.tolist(), predictions.tolist()):
                confusion[label, prediction] += 1
    return float(confusion.diagonal().sum()) / len(test), confusion


def test_train_writes_a_complete_run_directory(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.toml", "run.json", "last.pt", "best.pt", "metrics.jsonl", "tensorboard"} <= names
    last = load_checkpoint(trained_run / "last.pt")
    assert last["state"]["step"] == 20 and last["state"]["epoch"] == 2
    assert last["model_config"]["conv1_channels"] == 8 and last["model_config"]["routing"]["iterations"] == 2
    info = json.loads((trained_run / "run.json").read_text())
    assert info["dataset_sizes"] == {"train": 80, "val": 80, "test": 160}
    assert [r["step"] for r in read_metrics(trained_run) if r["phase"] == "val"] == [10, 20]
    # The faster allocator regime is the default for every user, and the run says what was applied.
    assert info["allocator"]["name"] == "tuned" and info["allocator"]["applied"] == (glibc_version() is not None)
    assert 'allocator = "tuned"' in (trained_run / "config.toml").read_text()


def test_test_command_reports_the_whole_test_set(trained_run, data_root, capsys):
    assert main(["test", str(trained_run), "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((trained_run / "test-standard-best.json").read_text())
    assert {"accuracy", "error_rate", "per_class_accuracy", "confusion_matrix", "class_names", "num_images",
            "checkpoint", "split", "step"} <= set(report)  # fmt: skip
    accuracy, confusion = independent_accuracy(trained_run, "best.pt", data_root)
    assert report["num_images"] == 160 and report["split"] == "standard"
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["confusion_matrix"] == confusion.tolist()
    per_class = (confusion.diagonal().double() / confusion.sum(dim=1).double()).tolist()
    assert list(report["per_class_accuracy"].values()) == pytest.approx(per_class)
    assert list(report["per_class_accuracy"]) == ["animal", "human", "airplane", "truck", "car"]
    assert (trained_run / "confusion-standard-best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"accuracy {accuracy:.4f}" in printed and "confusion matrix" in printed


def test_test_command_on_a_checkpoint_file_and_the_novel_viewpoint_split(trained_run, data_root):
    assert main(["test", str(trained_run / "last.pt"), "--split", "azimuth", "--no-progress", "--workers", "0"]) == 0
    report = json.loads((trained_run / "test-azimuth-last.json").read_text())
    accuracy, _ = independent_accuracy(trained_run, "last.pt", data_root, split="azimuth")
    assert report["split"] == "azimuth" and report["num_images"] == 40  # azimuth 80° only, of the 4 in the fixture
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_plot_command_draws_the_curves(trained_run):
    assert main(["plot", str(trained_run)]) == 0
    assert (trained_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_config_reproduces_the_run(trained_run, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "--config", str(trained_run / "config.toml"), "--run-dir", str(again)]) == 0
    assert state_dicts_equal(load_checkpoint(trained_run / "last.pt")["model"], load_checkpoint(again / "last.pt")["model"])


def test_resume_extends_a_finished_run_and_refuses_changes(config_file, tmp_path, capsys):
    short, long = tmp_path / "short", tmp_path / "long"
    assert main(["train", "--config", str(config_file), "--run-dir", str(short), "--max-steps", "7"]) == 0
    assert load_checkpoint(short / "last.pt")["state"]["step"] == 7
    assert main(["train", "--resume", str(short), "--max-steps", "20"]) == 0
    assert main(["train", "--config", str(config_file), "--run-dir", str(long), "--max-steps", "20"]) == 0
    assert state_dicts_equal(load_checkpoint(short / "last.pt")["model"], load_checkpoint(long / "last.pt")["model"])
    capsys.readouterr()
    assert main(["train", "--resume", str(short), "--batch-size", "16"]) == 2
    assert "cannot change --batch-size when resuming" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--iters", "4"], "iters must be between 1 and 3"),
        (["--lr", "-0.1"], "lr must be a positive number"),
        (["--config", "{missing}"], "cannot read configuration file"),
        (["--config", "{unknown_key}"], r"unknown option\(s\): learning_rate"),
        (["--config", "{unparsable}"], "cannot parse configuration file"),
        (["--data-root", "{empty}"], "smallnorb is not prepared in"),
        (["--run-dir", "{existing}"], "already holds a run"),
        (["--resume", "{empty}"], "is not a run directory"),
        (["--model-option", "conv1_channels"], "expects KEY=VALUE"),
        (["--model-option", "conv_channels=3"], "unknown model option"),
        (["--max-minutes", "0"], "--max-minutes must be a positive number of minutes"),
        (["--max-minutes", "nan"], "--max-minutes must be a positive number of minutes"),
        (["--model", "cnn-baseline", "--iters", "2"], "iters applies to capsule networks"),
        (["--model", "cnn-baseline", "--model-option", "routing.iterations=2"], "unknown option.*CNN baseline: routing"),
        (["--model", "cnn-baseline", "--model-option", "dropout=1.5"], r"dropout must be in \[0, 1\)"),
        (["--model-option", "transform_init_std=0"], "transform_init_std must be a positive number"),
        (["--model-option", "routing.e_step_scales=[1,0.2]"], r"gives 2 scale\(s\), but 2 routing iteration\(s\) run 1"),
        (["--iters", "3", "--model-option", "routing.e_step_scales=[1,-1]"], "e_step_scales must be a list of positive"),
        (["--model-option", "routing.e_step_scales=soft"], "e_step_scales must be a list of positive"),
    ],
)
def test_bad_options_give_one_error_line_and_exit_code_2(arguments, message, tmp_path, data_root, trained_run, capsys):
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.1\n")
    (tmp_path / "unparsable.yaml").write_text("lr: [\n")
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing.toml", "unknown_key": tmp_path / "unknown.toml", "empty": tmp_path / "empty",
             "unparsable": tmp_path / "unparsable.yaml", "existing": trained_run}  # fmt: skip
    arguments = [a.format(**paths) for a in arguments]
    if "--data-root" not in arguments:
        arguments += ["--data-root", str(data_root)]
    code = main(["train", *arguments, "--no-progress", "--workers", "0"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and error.startswith("matcaps train: error: ")
    assert __import__("re").search(message, error)


def test_test_and_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["test", str(tmp_path / "nowhere")]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("matcaps test: error: ") and "neither a run directory nor a checkpoint" in lines[0]
    assert lines[1].startswith("matcaps plot: error: ") and "metrics.jsonl" in lines[1]


def test_every_option_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lr", "--batch-size", "--iters", "--epochs", "--max-steps", "--model", "--dataset", "--data-root",
                 "--split", "--run-dir", "--runs-root", "--name", "--seed", "--workers", "--device", "--weight-decay",
                 "--l2", "--val-every", "--log-every", "--checkpoint-every", "--precision", "--compile",
                 "--routing-impl", "--config", "--resume"):  # fmt: skip
        assert flag in text, flag


def test_console_script_reports_bad_options_in_a_subprocess(tmp_path):
    script = Path(sys.executable).with_name("matcaps")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "matcaps"]
    result = subprocess.run([*command, "train", "--iters", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "matcaps train: error: --iters must be between 1 and 3, got 4\n"


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(config_file, tmp_path):
    """A real crash: the training process is SIGKILLed after some checkpoint, then ``--resume`` finishes it."""
    import os
    import signal
    import time

    steps = 40
    options = ["--config", str(config_file), "--checkpoint-every", "1", "--max-steps", str(steps), "--epochs", "9"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "matcaps", "train", *options, "--run-dir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (killed / "last.pt").exists() and load_checkpoint(killed / "last.pt")["state"]["step"] >= 3:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    stopped_at = load_checkpoint(killed / "last.pt")["state"]["step"]
    assert process.returncode == -signal.SIGKILL and 3 <= stopped_at < steps
    assert main(["train", "--resume", str(killed)]) == 0
    assert main(["train", *options, "--run-dir", str(tmp_path / "whole")]) == 0
    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert resumed["state"]["step"] == whole["state"]["step"] == steps
    assert state_dicts_equal(whole["model"], resumed["model"])


def test_cnn_baseline_trains_and_tests_with_the_same_commands(data_root, tmp_path, capsys):
    run = tmp_path / "cnn"
    assert main(["train", "--data-root", str(data_root), "--model", "cnn-baseline", "--run-dir", str(run),
                 "--model-option", "hidden_units=32", "--max-steps", "6", "--batch-size", "8", "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    saved = (run / "config.toml").read_text()
    assert 'model = "cnn-baseline"' in saved and "iters" not in saved
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["architecture"] == "cnn-baseline" and info["model_config"]["hidden_units"] == 32
    capsys.readouterr()
    assert main(["test", str(run), "--no-progress", "--workers", "0"]) == 0
    report = json.loads((run / "test-standard-best.json").read_text())
    accuracy, confusion = independent_accuracy(run, "best.pt", data_root)
    assert report["accuracy"] == pytest.approx(accuracy) and report["confusion_matrix"] == confusion.tolist()


def test_model_options_read_numbers_in_scientific_notation():
    """YAML 1.1 reads ``1e-4`` as a string; a model option must get the number."""
    from matcaps.cli.train import parse_model_options

    options = parse_model_options(["routing.variance_floor=1e-4", "transform_init_std=0.3", "conv1_channels=8",
                                   "coordinate_addition=false", "routing.implementation=naive"])  # fmt: skip
    assert options == {"routing": {"variance_floor": 1e-4, "implementation": "naive"}, "transform_init_std": 0.3,
                       "conv1_channels": 8, "coordinate_addition": False}  # fmt: skip
    assert isinstance(options["conv1_channels"], int)


def test_routing_options_of_the_wrong_type_are_named():
    from matcaps.errors import ConfigError
    from matcaps.routing import EMRoutingConfig

    with pytest.raises(ConfigError, match="routing option variance_floor must be a number, got '1e-4'"):
        EMRoutingConfig(variance_floor="1e-4")


def test_a_run_resumes_with_another_routing_implementation(config_file, tmp_path, capsys):
    """The implementations compute the same numbers, so a run may continue with a faster one."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), "--routing-impl", "fused",
                 "--max-steps", "5"]) == 0  # fmt: skip
    assert main(["train", "--resume", str(run), "--routing-impl", "naive", "--max-steps", "10"]) == 0
    last = load_checkpoint(run / "last.pt")
    assert last["state"]["step"] == 10
    assert last["model_config"]["routing"]["implementation"] == "naive"
    assert 'routing_impl = "naive"' in (run / "config.toml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--iters", "3", "--max-steps", "12"]) == 2  # not a free choice
    assert "cannot change --iters" in capsys.readouterr().err
