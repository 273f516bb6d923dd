"""``matcaps predict``: image files scored exactly as ``matcaps test`` scores the test set; bad files and names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matcaps.cli import main
from matcaps.data import DataConfig, load_splits
from matcaps.data.images import fit_square, read_image
from matcaps.models import CNNBaselineConfig, build_model, model_config_from_dict
from matcaps.train import load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


@pytest.fixture(scope="module")
def test_images(tiny_mnist_run, tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """The tiny test set written as PNG files (grey, 28×28), and its labels."""
    _, root = tiny_mnist_run
    folder = tmp_path_factory.mktemp("pngs")
    prepared = root / "mnist" / "prepared"
    images, labels = np.load(prepared / "test_images.npy"), np.load(prepared / "test_labels.npy")
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"test-{index:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths, labels


def predict_json(arguments: list[str], capsys) -> dict:
    assert main(["predict", *arguments, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_matches_matcaps_test_on_the_same_images(tiny_mnist_run, test_images, tmp_path, capsys, monkeypatch):
    run, root = tiny_mnist_run
    paths, labels = test_images
    monkeypatch.chdir(tmp_path)
    assert main(["test", str(run), "--no-progress", "--workers", "0"]) == 0
    report = json.loads((run / "test-standard-best.json").read_text())
    capsys.readouterr()

    result = predict_json([str(run), *map(str, paths), "--top-k", "10"], capsys)
    assert result["score"] == "activation" and result["network"]["dataset"] == "mnist"
    predicted = [entry["top"][0]["index"] for entry in result["images"]]
    confusion = np.zeros((10, 10), dtype=int)
    for label, prediction in zip(labels, predicted):
        confusion[label, prediction] += 1
    assert confusion.tolist() == report["confusion_matrix"]  # the same predictions as matcaps test
    assert len(set(predicted)) > 1  # a network that tells some classes apart

    # the same scores as the network on the test set's own tensors (not through matcaps.predict)
    payload = load_checkpoint(run / "best.pt")
    model = build_model(model_config_from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    test = load_splits(DataConfig(dataset="mnist", root=root, validation=False)).test
    with torch.no_grad():
        expected = model(torch.stack([test[i][0] for i in range(len(test))])).activations
    names = result["network"]["classes"]
    scores = torch.tensor([[entry["scores"][name] for name in names] for entry in result["images"]], dtype=torch.float64)
    assert torch.allclose(scores, expected.double(), atol=1e-6)
    for entry, row in zip(result["images"], scores):
        top = [item["score"] for item in entry["top"]]
        assert top == sorted(top, reverse=True) and len(top) == 10
        assert entry["top"][0]["index"] == int(row.argmax())


def test_colour_and_oversized_images_are_read_as_the_network_needs(tiny_mnist_run, test_images, tmp_path, capsys):
    run, _ = tiny_mnist_run
    paths, _ = test_images
    grey = np.asarray(Image.open(paths[0]))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(rgb)  # r = g = b: luma conversion gives grey back
    wide = tmp_path / "wide.png"
    padded = np.zeros((28, 40), dtype=np.uint8)
    padded[:, 6:34] = grey  # the shorter side fits; the centre crop is the digit
    Image.fromarray(padded).save(wide)
    result = predict_json([str(run), str(paths[0]), str(rgb), str(wide)], capsys)
    first, *others = (entry["scores"] for entry in result["images"])
    for scores in others:
        # the same pixels at another place in the batch: equal up to float32 rounding, which some CPUs'
        # kernels make depend on the batch position (seen: 3e-7 on an AMD EPYC VM, 0 on an Intel Xeon)
        assert scores.keys() == first.keys()
        assert list(scores.values()) == pytest.approx(list(first.values()), abs=1e-6)


def test_fit_square_crops_the_centre_and_resizes_the_shorter_side():
    image = np.arange(28 * 40, dtype=np.int64).reshape(28, 40).astype(np.uint8)
    assert np.array_equal(fit_square(image, 28), image[:, 6:34])
    assert fit_square(image, 28).flags["C_CONTIGUOUS"]
    assert fit_square(np.zeros((10, 30, 3), np.uint8), 20).shape == (20, 20, 3)
    square = np.ones((28, 28), np.uint8)
    assert fit_square(square, 28) is square


def test_table_lists_the_best_classes_of_each_image(tiny_mnist_run, test_images, capsys):
    run, _ = tiny_mnist_run
    paths, _ = test_images
    assert main(["predict", str(run), str(paths[0]), str(paths[1]), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("; scores: class-capsule activations") and lines[1].split() == ["image", "1st", "2nd"]
    assert [line.split()[0] for line in lines[2:]] == [str(paths[0]), str(paths[1])]
    assert all(len(line.split()) == 5 for line in lines[2:])  # image, then class and score twice


def test_cnn_baseline_scores_are_probabilities(tiny_mnist_run, test_images, tmp_path, capsys):
    run, _ = tiny_mnist_run
    paths, _ = test_images
    payload = load_checkpoint(run / "best.pt")
    cnn_config = CNNBaselineConfig(num_classes=10, image_size=28)
    torch.manual_seed(0)
    payload.update(model=build_model(cnn_config).state_dict(), model_config=cnn_config.to_dict())
    torch.save(payload, tmp_path / "cnn.pt")
    result = predict_json([str(tmp_path / "cnn.pt"), *map(str, paths[:3]), "--top-k", "10"], capsys)
    assert result["score"] == "probability"
    for entry in result["images"]:
        assert sum(entry["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    assert main(["predict", str(tmp_path / "cnn.pt"), str(paths[0])]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("; scores: softmax probabilities")


def test_output_into_a_closed_pipe_ends_quietly(test_images, tmp_path):
    """``matcaps predict ... | head``: the reader goes away; no traceback, the exit code of SIGPIPE."""
    import subprocess
    import sys

    from matcaps.cli import BROKEN_PIPE_EXIT_CODE

    paths, _ = test_images
    command = [sys.executable, "-m", "matcaps", "predict", "mnist", *[str(paths[0])] * 300, "--format", "json",
               "--top-k", "10"]  # about 200 KB of JSON: more than a pipe holds
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert process.stdout.read(1) == b"{"
    process.stdout.close()  # as head does once it has its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == BROKEN_PIPE_EXIT_CODE
    assert stderr == ""


@pytest.mark.parametrize("damage", ["truncated", "not-an-image", "missing", "empty"])
def test_a_bad_image_is_one_line_naming_it(damage, tiny_mnist_run, test_images, tmp_path, capsys):
    run, _ = tiny_mnist_run
    paths, _ = test_images
    bad = tmp_path / "bad.png"
    if damage == "truncated":
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(big)
        bad.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    elif damage == "not-an-image":
        bad.write_text("not a picture\n")
    elif damage == "empty":
        bad.write_bytes(b"")
    assert main(["predict", str(run), str(paths[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("matcaps predict: error:")
    assert captured.out == ""  # nothing scored before every image was read


def test_read_image_raises_data_format_error_naming_the_file(tmp_path):
    from matcaps.errors import DataFormatError

    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    with pytest.raises(DataFormatError, match="x.jpg"):
        read_image(path, 1)


def test_an_unknown_network_name_lists_the_pretrained_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    for command in (["predict", "mnits", str(image)], ["show", "mnits", str(image)], ["test", "mnits"]):
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "mnits" in lines[0] and "mnist, fashion-mnist" in lines[0], lines


def test_an_unknown_device_is_one_line(tiny_mnist_run, test_images, capsys):
    run, _ = tiny_mnist_run
    paths, _ = test_images
    for command in ("predict", "test"):
        assert main([command, str(run), str(paths[0]) if command == "predict" else "--no-progress", "--device", "bogus"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"matcaps {command}: error: unknown device 'bogus'; choose auto, cpu, cuda or cuda:N"]
