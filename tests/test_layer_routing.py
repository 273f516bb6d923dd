"""Per-layer routing (``CapsNetConfig.layer_routing``): each routed layer routes as configured,
the option travels through ``matcaps train`` and checkpoints, and bad values are one line."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import TINY_IMAGE_SIZE, TINY_MODEL_OPTIONS

from matcaps.cli import main
from matcaps.errors import ConfigError
from matcaps.models import ROUTED_LAYERS, CapsNetConfig, build_model
from matcaps.train import load_checkpoint
from matcaps.trained import load_trained



@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def tiny_config(routing: dict | None = None, **changes) -> CapsNetConfig:
    """The tiny test network with ``naive`` routing (exact in float64), 2 iterations unless changed."""
    base = CapsNetConfig(image_size=TINY_IMAGE_SIZE, **TINY_MODEL_OPTIONS)
    return base.replace(routing={"implementation": "naive", **(routing or {})}, **changes)


def layer_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Poses and activations after each routed layer, computed layer by layer."""
    outputs = {}
    features = torch.relu(model.conv1(model.input_norm(images)))
    capsules = model.primary_caps(features)
    for name in ROUTED_LAYERS:
        capsules = getattr(model, name)(*capsules)
        outputs[name] = capsules
    return outputs


def test_each_layer_routes_with_its_own_settings_and_the_others_are_unchanged():
    """With 3 iterations in ClassCaps only, ConvCaps1/2 compute what the 2-iteration network computes,
    and ClassCaps computes, on those inputs, what the 3-iteration network's ClassCaps computes."""
    torch.manual_seed(0)
    two = build_model(tiny_config()).double().eval()
    three = build_model(tiny_config(routing={"iterations": 3})).double().eval()
    mixed = build_model(tiny_config(layer_routing={"class_caps": {"iterations": 3}})).double().eval()
    three.load_state_dict(two.state_dict())
    mixed.load_state_dict(two.state_dict())
    assert [getattr(mixed, name).routing.iterations for name in ROUTED_LAYERS] == [2, 2, 3]
    images = torch.rand(3, 1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, dtype=torch.float64)
    with torch.no_grad():
        expected, got = layer_outputs(two, images), layer_outputs(mixed, images)
        for name in ("conv_caps1", "conv_caps2"):
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        class_of_three = three.class_caps(*expected["conv_caps2"])
        torch.testing.assert_close(got["class_caps"], class_of_three, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got["class_caps"][1], expected["class_caps"][1], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(mixed(images).activations, class_of_three[1], rtol=1e-12, atol=1e-12)


def test_a_layer_override_changes_only_the_named_fields():
    config = tiny_config(routing={"iterations": 3, "cost_scale": 50.0},
                         layer_routing={"conv_caps2": {"e_step_scales": [1, 0.1]}})  # fmt: skip
    assert config.routing_of("conv_caps1") == config.routing
    changed = config.routing_of("conv_caps2")
    assert (changed.iterations, changed.cost_scale, changed.e_step_scales) == (3, 50.0, (1, 0.1))
    assert config.layer_routing == {"conv_caps2": {"e_step_scales": (1, 0.1)}}
    assert CapsNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("layer_routing", "message"),
    [
        ({"conv_caps3": {"iterations": 3}}, "unknown layer.*conv_caps3.*conv_caps1, conv_caps2, class_caps"),
        ({"class_caps": {"iteration": 3}}, "unknown routing option.*layer_routing.class_caps: iteration"),
        ({"class_caps": {"implementation": "naive"}}, "layer_routing.class_caps cannot set implementation"),
        ({"class_caps": {"iterations": 0}}, "layer_routing.class_caps: routing iterations must be a positive"),
        ({"class_caps": {"e_step_scales": [1, -1]}}, "layer_routing.class_caps: .*e_step_scales must be a list"),
        ({"class_caps": 3}, "layer_routing.class_caps must be a table"),
        ([3], "layer_routing must be a table of layers"),
    ],
)
def test_bad_layer_routing_is_refused_by_name(layer_routing, message):
    with pytest.raises(ConfigError, match=message) as error:
        tiny_config(layer_routing=layer_routing)
    assert "\n" not in str(error.value)


def test_routing_of_an_unknown_layer_is_refused():
    with pytest.raises(ConfigError, match="'conv1' is not a routed layer"):
        tiny_config().routing_of("conv1")


def test_train_builds_and_saves_the_per_layer_routing_and_iters_keeps_the_override(config_file, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), "--max-steps", "3", "--iters", "1",
                 "--model-option", "layer_routing.class_caps.iterations=3",
                 "--model-option", "layer_routing.class_caps.e_step_scales=[1,0.1]"]) == 0  # fmt: skip
    saved = load_checkpoint(run / "last.pt")["model_config"]
    assert saved["routing"]["iterations"] == 1
    assert saved["layer_routing"] == {"class_caps": {"iterations": 3, "e_step_scales": (1, 0.1)}}
    network = load_trained(run, "last")
    layers = [getattr(network.model, name).routing for name in ROUTED_LAYERS]
    assert [routing.iterations for routing in layers] == [1, 1, 3]
    assert layers[2].e_step_scales == (1, 0.1)
    assert "[model_options.layer_routing.class_caps]" in (run / "config.toml").read_text()
    assert main(["train", "--resume", str(run), "--max-steps", "5"]) == 0
    assert load_checkpoint(run / "last.pt")["state"]["step"] == 5


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("layer_routing.class_caps.e_step_scales=[1,0.2]",
         r"layer_routing.class_caps.e_step_scales gives 2 scale\(s\), but 2 routing iteration\(s\) run 1"),
        ("layer_routing.class_caps.iterations=9", r"between 1 and 3, got 9 \(layer_routing.class_caps\)"),
        ("layer_routing.primary_caps.iterations=3", "unknown layer"),
    ],
)
def test_bad_layer_options_on_the_command_line_are_one_line(option, message, config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run), "--model-option", option]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("matcaps train: error: ")
    assert __import__("re").search(message, error)
    assert not run.exists()


def test_the_probe_sets_one_layers_routing(routing_probe, trained_run, data_root, tmp_path):
    """``LAYER.FIELD=VALUE`` scores the saved weights with only that layer changed, exactly as a
    network built with that ``layer_routing`` scores them."""
    from matcaps.data import load_splits
    from matcaps.scoring import evaluate_model
    from matcaps.train.config import data_config

    out = tmp_path / "probe.json"
    assert routing_probe.main([str(trained_run), "--data-root", str(data_root), "--implementation", "naive",
                       "--setting", "class_caps.iterations=3", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())["results"][0]
    assert result["setting"] == {"class_caps.iterations": 3}
    network = load_trained(trained_run)
    config = network.model_config.replace(routing={"implementation": "naive"},
                                          layer_routing={"class_caps": {"iterations": 3}})  # fmt: skip
    model = build_model(config)
    model.load_state_dict(network.model.state_dict())
    val = load_splits(data_config(network.config, root=data_root)).val
    counts = evaluate_model(model, val, config.num_classes, batch_size=250)
    assert result["accuracy"] == int(counts.confusion.diagonal().sum()) / counts.total


def test_the_probe_refuses_an_unknown_layer_in_one_line(routing_probe, trained_run, data_root, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert routing_probe.main([str(trained_run), "--data-root", str(data_root), "--setting", "conv2.iterations=3",
                       "--out", str(out)]) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown layer(s) conv2" in error
    assert not out.exists()


def test_probe_settings_change_every_layer_or_one(routing_probe):
    saved = tiny_config(layer_routing={"conv_caps1": {"cost_scale": 10.0}})
    setting = {"iterations": 1, "class_caps.iterations": 3, "class_caps.e_step_scales": [1, 0.5]}
    config = routing_probe.apply_setting(saved, setting, "fused")
    routings = [config.routing_of(name) for name in ROUTED_LAYERS]
    assert [r.iterations for r in routings] == [1, 1, 3]
    assert [r.cost_scale for r in routings] == [10.0, 100.0, 100.0]  # the saved override is kept
    assert routings[2].e_step_scales == (1, 0.5) and {r.implementation for r in routings} == {"fused"}
