"""TrainConfig: defaults (the IBM recipe), files in three formats, precedence, validation, TOML round trip."""

from __future__ import annotations

import json

import pytest

from matcaps.errors import ConfigError
from matcaps.train.config import TrainConfig, build_config, load_config_file, resolve_model_config, save_config, to_toml


def test_defaults_are_the_ibm_smallnorb_recipe():
    config = TrainConfig()
    assert (config.lr, config.lr_decay, config.lr_decay_steps, config.batch_size) == (3e-3, 0.96, 20_000, 64)
    assert config.weight_decay == 0.0  # IBM defines 2e-7 but leaves it off
    assert config.margin_schedule()(0) == pytest.approx(0.2142, abs=1e-4)
    assert config.margin_schedule()(200_000) == pytest.approx(0.595)
    assert config.lr_factor(20_000) == pytest.approx(0.96) and config.lr_factor(10_000) == pytest.approx(0.96**0.5)
    model = resolve_model_config(config, num_classes=5, image_size=32, channels=1)
    assert model.routing.iterations == 2 and model.conv1_channels == 64 and model.routing.implementation == "blocked"


def test_mnist_gets_the_mnist_preset_and_overrides_apply_in_order():
    config = TrainConfig(dataset="mnist", iters=3, routing_impl="naive",
                         model_options={"conv1_channels": 8, "routing": {"iterations": 1, "epsilon": 1e-7}})
    model = resolve_model_config(config, num_classes=10, image_size=28, channels=1)
    assert (model.num_classes, model.image_size, model.conv1_channels) == (10, 28, 8)
    assert model.routing.iterations == 3  # --iters wins over model_options
    assert (model.routing.implementation, model.routing.epsilon) == ("naive", 1e-7)


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_files_in_every_format_give_the_same_configuration(tmp_path, suffix):
    values = {"lr": 0.01, "iters": 3, "val_instances": [4, 6], "model_options": {"conv1_channels": 16}}
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text(to_toml(values))
    elif suffix == ".yaml":
        path.write_text("lr: 0.01\niters: 3\nval_instances: [4, 6]\nmodel_options:\n  conv1_channels: 16\n")
    else:
        path.write_text(json.dumps(values))
    config = build_config(load_config_file(path), {"iters": 1})  # flags override the file
    assert (config.lr, config.iters, config.val_instances) == (0.01, 1, (4, 6))
    assert config.model_options == {"conv1_channels": 16}


def test_saved_config_reads_back_identically(tmp_path):
    config = TrainConfig(max_steps=7, weight_decay=2e-7, model="hinton-large", model_options={"routing": {"epsilon": 1e-9}})
    save_config(config, tmp_path / "config.toml", header="a comment")
    assert build_config(load_config_file(tmp_path / "config.toml")) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate = 0.1\n", r"unknown option\(s\): learning_rate"),
        ("lr = 'fast'\n", "option lr must be a number"),
        ("epochs = 1.5\n", "option epochs must be an integer"),
        ("lr = [\n", "cannot parse configuration file"),
    ],
)
def test_bad_config_files_are_reported_with_the_file_and_option(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config_file(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"iters": 4}, "iters must be between 1 and 3"),
        ({"iters": 0}, "iters must be between 1 and 3"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"precision": "fp16"}, "precision"),
        ({"device": "tpu"}, "device must be"),
        ({"lr_decay": 1.5}, "lr_decay must be in"),
        ({"lr_drop": 0.0}, "lr_drop must be in"),
        ({"lr_drop_steps": (100, 0)}, "lr_drop_steps must be steps of at least 1"),
        ({"lr_drop_steps": (1.5,)}, "lr_drop_steps must be a list of integers"),
        ({"margin_steps": 0.0}, "steps_per_unit must be positive"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm must be a non-negative number"),
        ({"clip_grad_norm": float("nan")}, "clip_grad_norm must be a non-negative number"),
    ],
)
def test_impossible_values_raise_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_unknown_model_options_are_rejected():
    with pytest.raises(ConfigError, match="unknown model option"):
        resolve_model_config(TrainConfig(model_options={"conv_channels": 8}), 5, 32, 1)
    with pytest.raises(ConfigError, match="num_classes=10 does not match the 5 classes"):
        resolve_model_config(TrainConfig(model_options={"num_classes": 10}), 5, 32, 1)


def test_missing_and_unknown_format_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config_file(tmp_path / "absent.toml")
    (tmp_path / "run.ini").write_text("x=1")
    with pytest.raises(ConfigError, match="unknown format"):
        load_config_file(tmp_path / "run.ini")
