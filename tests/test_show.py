"""``matcaps show``: the routing traced on one image, drawn with the right panels, also into TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matcaps.cli import main
from matcaps.models import CNNBaselineConfig, build_model
from matcaps.show import ROUTED_LAYERS, draw_routing, panel_count, trace_image
from matcaps.train import load_checkpoint
from matcaps.trained import load_trained


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


@pytest.fixture(scope="module")
def image(tiny_mnist_run, tmp_path_factory) -> Path:
    _, root = tiny_mnist_run
    path = tmp_path_factory.mktemp("show") / "digit 3.png"
    Image.fromarray(np.load(root / "mnist" / "prepared" / "test_images.npy")[3]).save(path)
    return path


def test_trace_follows_the_network_and_the_routing_invariants(tiny_mnist_run, image):
    run, _ = tiny_mnist_run
    network = load_trained(run)
    trace = trace_image(network, image)
    iterations = network.model_config.routing.iterations
    assert trace.iterations == iterations and set(trace.layers) == set(ROUTED_LAYERS)
    class_layer = trace.layers["class_caps"]
    # the traced (naive) routing ends where the network's (fused) routing does
    assert torch.allclose(class_layer.iterations[-1].activations[0, 0], trace.class_activations, atol=1e-5)
    for layer in trace.layers.values():
        assert len(layer.iterations) == iterations
        assert (layer.iterations[0].routing > 0).all()  # the prior
        for t in range(iterations):
            assignment = layer.assignment_after(t)
            if layer.name == "class_caps":  # one window: each child's weights sum to one over the classes
                assert torch.allclose(assignment.sum(dim=2), torch.ones(()), atol=1e-5)
            distances = layer.vote_distances(t)
            assert distances.shape == assignment.shape and (distances >= 0).all()
    assert torch.allclose(class_layer.iterations[0].routing, torch.full((), 1 / 10))  # ClassCaps' prior: 1/K
    # the E-step after an iteration is what the next iteration's M-step uses
    if iterations > 1:
        assert torch.equal(class_layer.assignment_after(0), class_layer.iterations[1].routing)


def test_figure_has_one_panel_per_picture(tiny_mnist_run, image):
    run, _ = tiny_mnist_run
    network = load_trained(run)
    trace = trace_image(network, image)
    figure = draw_routing(trace, network.class_names)
    panels = [axes for axes in figure.axes if axes.get_label() != "<colorbar>"]
    assert len(panels) == panel_count(10, trace.iterations) == 2 + 3 * trace.iterations + 10 * trace.iterations
    assert sum(axes.get_label() == "<colorbar>" for axes in figure.axes) == len(ROUTED_LAYERS)
    histograms = panels[-10 * trace.iterations:]
    assert all(len(axes.patches) > 0 for axes in histograms)  # every histogram has bars


def test_show_writes_a_png_and_tensorboard_images(tiny_mnist_run, image, tmp_path, capsys):
    run, _ = tiny_mnist_run
    assert main(["show", str(run), str(image), "--output-dir", str(tmp_path), "--tensorboard"]) == 0
    out = capsys.readouterr().out
    picture = tmp_path / "routing-digit_3.png"
    iterations = load_trained(run).model_config.routing.iterations
    assert f"{panel_count(10, iterations)} panels in {picture}" in out
    with Image.open(picture) as png:
        pixels = np.asarray(png.convert("L"))
    assert png.format == "PNG" and pixels.shape[0] > 500 and pixels.std() > 10  # a real picture, not a blank page

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "show/digit 3" in events.Tags()["images"]
    logged = events.Images("show/digit 3")[-1]
    assert logged.step == load_checkpoint(run / "best.pt")["state"]["step"] and logged.width > 500


def test_show_errors_are_one_line(tiny_mnist_run, image, tmp_path, capsys):
    run, _ = tiny_mnist_run
    payload = load_checkpoint(run / "best.pt")
    cnn_config = CNNBaselineConfig(num_classes=10, image_size=28)
    payload.update(model=build_model(cnn_config).state_dict(), model_config=cnn_config.to_dict())
    torch.save(payload, tmp_path / "cnn.pt")
    checkpoint_copy = tmp_path / "copy.pt"
    checkpoint_copy.write_bytes((run / "best.pt").read_bytes())
    cases = [
        (["show", str(tmp_path / "cnn.pt"), str(image)], "capsule networks"),
        (["show", str(checkpoint_copy), str(image), "--tensorboard"], "--tensorboard LOGDIR"),
        (["show", str(run), str(tmp_path / "none.png")], "none.png"),
        (["show", str(run), str(image), "--output-dir", str(checkpoint_copy)], "--output-dir"),
        (["show", str(run), str(image), str(tmp_path / "digit 3.png"), "--output-dir", str(tmp_path / "new")],
         "would both be drawn to routing-digit_3.png"),
    ]
    for command, expected in cases:
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert not list(tmp_path.glob("routing-*.png")) and not (tmp_path / "new").exists()


def test_show_creates_the_output_folder(tiny_mnist_run, image, tmp_path, capsys):
    run, _ = tiny_mnist_run
    folder = tmp_path / "figures" / "routing"
    assert main(["show", str(run), str(image), "--output-dir", str(folder)]) == 0
    assert (folder / "routing-digit_3.png").is_file()
    assert str(folder / "routing-digit_3.png") in capsys.readouterr().out
