"""The pretrained networks shipped with the package: registry, loading by name, re-scored on the real test sets.

The re-scoring needs the real test files (``$MATCAPS_REAL_DATA``, see ``real_data.py``) and is
skipped without them.  By default it scores the first ``check_images`` test images and compares
with the registry's count; ``MATCAPS_RESCORE_ALL=1`` scores the whole test set (10,000 images,
minutes on a CPU) and compares with the recorded test accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_data import real_data_root
from torch.utils.data import Subset

from matcaps.cli import main
from matcaps.data import dataset_info, load_splits
from matcaps.errors import ConfigError
from matcaps.models import CapsNet, pretrained, pretrained_names, pretrained_weights
from matcaps.models.weights import REGISTRY_FILE, load_pretrained_payload
from matcaps.scoring import evaluate_model
from matcaps.tomlread import tomllib
from matcaps.train.config import data_config
from matcaps.trained import TrainedNetwork, load_trained, preprocess_image

#: Set to 1 to re-score the pretrained networks on their whole test sets.
RESCORE_ALL_ENV = "MATCAPS_RESCORE_ALL"


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def test_registry_lists_the_shipped_files_with_their_sums():
    registry = tomllib.loads(REGISTRY_FILE.read_text())
    assert set(registry) == set(pretrained_names()) >= {"mnist", "fashion-mnist"}
    for name in pretrained_names():
        entry = pretrained_weights(name)
        assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == entry.sha256
        assert entry.path.stat().st_size < 1_000_000  # small enough to ship
        assert entry.test_correct == round(entry.test_accuracy * entry.test_images)
        assert 0 < entry.check_correct <= entry.check_images <= entry.test_images


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_a_pretrained_network_loads_by_name(name):
    model = pretrained(name)
    entry = pretrained_weights(name)
    payload = load_pretrained_payload(name)
    assert isinstance(model, CapsNet) and not model.training
    assert payload["config"]["dataset"] == entry.dataset == name
    assert model.config.num_classes == dataset_info(entry.dataset).num_classes
    assert all(torch.equal(value, payload["model"][key]) for key, value in model.state_dict().items())
    output = model(torch.randn(2, 1, 28, 28))
    assert output.activations.shape == (2, 10) and torch.isfinite(output.activations).all()


def test_an_unknown_name_is_one_line_listing_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        pretrained("cifar10")
    message = str(caught.value)
    assert "\n" not in message and "'cifar10'" in message and "mnist, fashion-mnist" in message


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    import matcaps.models.weights as module

    copy = tmp_path / "pretrained"
    copy.mkdir()
    for path in module.PRETRAINED_DIR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = bytearray((copy / "mnist.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "mnist.pt").write_bytes(bytes(data))
    monkeypatch.setattr(module, "PRETRAINED_DIR", copy)
    monkeypatch.setattr(module, "REGISTRY_FILE", copy / "weights.toml")
    with pytest.raises(module.CheckpointError, match="SHA-256"):
        pretrained("mnist")


def test_predict_and_show_take_a_pretrained_name(tmp_path, capsys):
    image = tmp_path / "stroke.png"
    picture = np.zeros((28, 28), np.uint8)
    picture[4:24, 13:16] = 255  # a vertical stroke
    Image.fromarray(picture).save(image)
    assert main(["predict", "mnist", str(image), "--top-k", "1"]) == 0
    heading, *_, last = capsys.readouterr().out.strip().splitlines()
    entry = pretrained_weights("mnist")
    assert heading == (f"pretrained mnist (mnist, {100 * entry.test_accuracy:.2f} % on the {entry.test_images:,} "
                       "test images); scores: class-capsule activations")  # one short line: the notes stay in the registry
    row = last.split()
    assert main(["show", "mnist", str(image), "--output-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out.strip().splitlines()[0]
    assert shown.startswith(f"{image}: {row[1]} ({row[2]})")  # the same class and activation
    assert (tmp_path / "routing-stroke.png").stat().st_size > 0


@pytest.fixture(scope="module")
def real_test_set(tmp_path_factory):
    """``real_test_set(network)``: the real test set of the network's dataset (prepared once), or skip."""
    roots: dict[str, Path] = {}

    def test_set(network: TrainedNetwork):
        """The standard test set as ``network`` sees it (its dataset, and e.g. the canvas it was trained on)."""
        dataset = network.dataset
        if dataset not in roots:
            roots[dataset] = real_data_root(dataset, tmp_path_factory.mktemp(f"real-{dataset}"))
        return load_splits(data_config(network.config, root=roots[dataset], split="standard", validation=False)).test

    return test_set


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_pretrained_network_scores_as_recorded_on_the_first_real_test_images(name, real_test_set):
    entry, network = pretrained_weights(name), load_trained(name)
    test = real_test_set(network)
    counts = evaluate_model(network.model, Subset(test, range(entry.check_images)), 10, batch_size=500)
    assert counts.total == entry.check_images
    assert int(counts.confusion.diagonal().sum()) == entry.check_correct


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_pretrained_network_scores_its_recorded_test_accuracy(name, real_test_set):
    if os.environ.get(RESCORE_ALL_ENV) != "1":
        pytest.skip(f"re-scoring a whole test set takes minutes on a CPU; set {RESCORE_ALL_ENV}=1 to run it")
    entry, network = pretrained_weights(name), load_trained(name)
    counts = evaluate_model(network.model, real_test_set(network), 10, batch_size=500)
    assert counts.total == entry.test_images
    assert int(counts.confusion.diagonal().sum()) == entry.test_correct
    assert counts.accuracy == pytest.approx(entry.test_accuracy, abs=5e-5)


def test_attack_takes_a_pretrained_name_and_reports_in_the_current_directory(tmp_path, monkeypatch, capsys):
    from data_fixtures import write_tiny_mnist

    from matcaps.data import prepare
    from matcaps.models.weights import pretrained_checkpoint

    root = tmp_path / "data"
    write_tiny_mnist(root, n_train=20, n_test=12)
    prepare("mnist", root, download=False, progress=False, verify=False)
    monkeypatch.chdir(tmp_path)
    package_files = set(pretrained_checkpoint("mnist").parent.iterdir())
    argv = ["attack", "mnist", "--data-root", str(root), "--methods", "fgsm", "--modes", "untargeted",
            "--eps", "0", "0.1", "--limit", "8", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    reports = list(tmp_path.glob("attack-standard-*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".png").stat().st_size > 0
    assert set(pretrained_checkpoint("mnist").parent.iterdir()) == package_files  # nothing written into the package
    assert "mnist" in capsys.readouterr().out


def test_an_image_file_is_prepared_as_the_network_saw_its_training_digits(tmp_path):
    """A network trained on digits placed on a canvas (``--canvas``) gets image files centred on one."""
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    path = tmp_path / "one.png"
    Image.fromarray(digit).save(path)
    network = load_trained("mnist")
    plain = preprocess_image(path, dataclasses.replace(network, config=network.config.replace(canvas=None)))
    placed = preprocess_image(path, dataclasses.replace(network, config=network.config.replace(canvas=32)))
    assert plain.shape == (1, 28, 28) and placed.shape == (1, 32, 32)
    assert torch.equal(placed[0, 2:30, 2:30] > placed.min(), plain[0] > plain.min())  # centred: offset 2
    assert (placed[0, :2] == placed.min()).all() and (placed[0, 30:] == placed.min()).all()
