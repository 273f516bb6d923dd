"""``--holdout-seed``: one validation set for runs of several seeds, and the warm-start warning
when a fine-tune validates on images its source network trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from data_fixtures import write_tiny_mnist

from matcaps.cli import main
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.errors import ConfigError
from matcaps.train.config import TrainConfig, holdout_mismatch

TRAIN_IMAGES = 60


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_tiny_mnist(root, n_train=TRAIN_IMAGES, n_test=20)
    prepare("mnist", root, download=False, progress=False, verify=False)
    return root


def validation_rows(root: Path, **options) -> set[int]:
    return set(load_splits(DataConfig(dataset="mnist", root=root, val_size=10, **options)).val.rows.tolist())


def test_the_holdout_seed_alone_decides_the_validation_set(digits_root):
    assert validation_rows(digits_root, seed=3, holdout_seed=7) == validation_rows(digits_root, seed=7)
    assert validation_rows(digits_root, seed=3, holdout_seed=7) == validation_rows(digits_root, seed=5, holdout_seed=7)
    assert validation_rows(digits_root, seed=3) != validation_rows(digits_root, seed=7)  # default: --seed
    splits = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10, seed=3, holdout_seed=7))
    assert splits.train.seed == 3  # augmentations still follow --seed
    assert len(set(splits.train.rows.tolist()) | set(splits.val.rows.tolist())) == TRAIN_IMAGES


def test_a_bad_holdout_seed_is_refused_in_one_line(capsys):
    with pytest.raises(ConfigError, match="holdout_seed must be an integer, got 'x'"):
        DataConfig(dataset="mnist", holdout_seed="x")
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "mnist", "--holdout-seed", "x"])
    assert "--holdout-seed: invalid int value: 'x'" in capsys.readouterr().err


def source_of(**changes) -> dict:
    return dataclasses.asdict(TrainConfig(dataset="mnist", **changes))


@pytest.mark.parametrize("source, run, warned", [
    (source_of(seed=0), TrainConfig(dataset="mnist", seed=0), False),
    (source_of(seed=0), TrainConfig(dataset="mnist", seed=1), True),
    (source_of(seed=0), TrainConfig(dataset="mnist", seed=1, holdout_seed=0), False),
    (source_of(seed=4, holdout_seed=0), TrainConfig(dataset="mnist", seed=1, holdout_seed=0), False),
    (source_of(seed=0), TrainConfig(dataset="mnist", seed=0, val_size=1000), True),
    (source_of(seed=0), TrainConfig(dataset="fashion-mnist", seed=1), False),  # another dataset: no shared images
    (source_of(seed=0), TrainConfig(dataset="mnist", seed=1, validation=False), False),
    ({**source_of(seed=0), "dataset": "smallnorb"}, TrainConfig(dataset="smallnorb", seed=1), False),  # instances
    ({}, TrainConfig(dataset="mnist", seed=1), False),  # a checkpoint without its configuration
    (source_of(seed=0) | {"dataset": "folder", "data_root": "a"}, TrainConfig(dataset="folder", data_root="b", seed=1),
     False),  # other images
    (source_of(seed=0) | {"dataset": "folder", "data_root": "a"}, TrainConfig(dataset="folder", data_root="a", seed=1),
     True),
])  # fmt: skip
def test_the_warm_start_warning_names_the_holdout_to_keep(source, run, warned):
    warning = holdout_mismatch(source, run)
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith("warning: ") and "--holdout-seed 0" in warning and "\n" not in warning


def test_a_source_trained_without_a_holdout_is_named():
    warning = holdout_mismatch(source_of(seed=0, validation=False), TrainConfig(dataset="mnist", seed=0))
    assert warning is not None and "without a validation hold-out" in warning


def test_a_fine_tune_with_another_seed_warns_unless_it_keeps_the_holdout(digits_root, tmp_path, capsys, single_thread):
    common = ["--dataset", "mnist", "--data-root", str(digits_root), "--model", "cnn-baseline", "--model-option",
              "hidden_units=16", "--val-size", "10", "--batch-size", "10", "--max-steps", "1", "--no-progress",
              "--workers", "0"]  # fmt: skip
    assert main(["train", *common, "--run-dir", str(tmp_path / "source")]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--seed", "1", "--init-from", str(tmp_path / "source"),
                 "--run-dir", str(tmp_path / "other")]) == 0  # fmt: skip
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "--holdout-seed 0" in warnings[0]
    assert main(["train", *common, "--seed", "1", "--holdout-seed", "0", "--init-from", str(tmp_path / "source"),
                 "--run-dir", str(tmp_path / "kept")]) == 0  # fmt: skip
    output = capsys.readouterr()
    assert "warning: " not in output.out + output.err
    assert "holdout_seed = 0" in (tmp_path / "kept" / "config.toml").read_text().splitlines()
