"""13-crop and mirrored evaluation (``matcaps test --crops/--mirrored``) and stereo smallNORB (``--stereo``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import write_tiny_smallnorb
from train_support import TINY_MODEL_OPTIONS
from matcaps.cli import main
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.crops import MultiCropTransform, crop_offsets
from matcaps.data.transforms import DigitsTransform, NorbTransform, per_image_standardise, resize_bilinear, to_unit_float
from matcaps.errors import ConfigError
from matcaps.evaluate import load_for_testing
from matcaps.train.config import to_toml

#: Stereo pairs per split of the default tiny smallNORB (5 categories × 2 instances × 2 elevations × 4 azimuths).
PAIRS = 80
FAST = {"batch_size": 8, "max_steps": 6, "workers": 0, "progress": False, "log_every": 3, "device": "cpu",
        "model_options": TINY_MODEL_OPTIONS}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("norb")
    write_tiny_smallnorb(root)
    prepare("smallnorb", root, download=False, progress=False, verify=False)
    return root


def train(root: Path, run: Path, **changes) -> Path:
    config = run.parent / f"{run.name}.toml"
    config.write_text(to_toml({**FAST, "data_root": str(root), **changes}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def norb_run(tmp_path_factory, norb_root) -> Path:
    return train(norb_root, tmp_path_factory.mktemp("runs") / "tiny")


def recounted_confusion(run: Path, views_of) -> list[list[int]]:
    """The test confusion matrix of ``run``'s best checkpoint, recounted image by image: each view
    ``views_of(transform, pixels)`` (``(1, C, S, S)`` tensors) scored separately, the scores averaged here."""
    loaded = load_for_testing(run, "best", device="cpu")
    transform = loaded.test_set.transform
    images = np.load(loaded.test_set.images_path)
    confusion = np.zeros((5, 5), dtype=int)
    with torch.no_grad():
        for row, label in zip(loaded.test_set.rows, loaded.test_set.labels):
            pixels = transform.pixels(images[row]).unsqueeze(0)
            scores = torch.stack([loaded.model(view).scores[0] for view in views_of(transform, pixels)])
            confusion[label, int(scores.mean(dim=0).argmax())] += 1
    return confusion.tolist()


def test_the_13_crops_are_the_centre_and_the_diagonal_moves_of_1_2_3_pixels():
    offsets = crop_offsets(13)
    assert offsets[0] == (0, 0) and len(set(offsets)) == 13
    assert {(abs(dy), abs(dx)) for dy, dx in offsets[1:]} == {(1, 1), (2, 2), (3, 3)}
    assert {(dy > 0, dx > 0) for dy, dx in offsets[1:]} == {(True, True), (True, False), (False, True), (False, False)}
    assert crop_offsets(1) == ((0, 0),)
    with pytest.raises(ConfigError, match="crops must be one of 1, 13"):
        crop_offsets(5)


def test_norb_crops_are_windows_of_the_standardised_48_image():
    image = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    views = MultiCropTransform(NorbTransform(train=False), crop_offsets(13))(image)
    full = per_image_standardise(resize_bilinear(to_unit_float(image), 48))
    assert views.shape == (13, 1, 32, 32)
    for view, (dy, dx) in zip(views, crop_offsets(13)):
        torch.testing.assert_close(view, full[:, 8 + dy : 40 + dy, 8 + dx : 40 + dx])
    assert torch.equal(views[0], NorbTransform(train=False)(image))


def test_digit_crops_move_the_window_over_a_black_background():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[5:23, 6:20] = np.random.default_rng(1).integers(1, 256, (18, 14))  # margins of at least 5 pixels
    views = MultiCropTransform(DigitsTransform(), crop_offsets(13))(image)
    centre = DigitsTransform()(image)
    torch.testing.assert_close(views[0], centre)
    for view, (dy, dx) in zip(views[1:], crop_offsets(13)[1:]):
        # the same standardised digit, moved by (−dy, −dx): nothing fell off the image
        torch.testing.assert_close(view[:, 3 - dy : 25 - dy, 3 - dx : 25 - dx], centre[:, 3:25, 3:25])


def test_one_crop_is_the_normal_test_and_13_crops_average_the_scores_of_the_13_windows(norb_run, capsys):
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0"]) == 0
    normal = json.loads((norb_run / "test-standard-best.json").read_text())
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0", "--crops", "1"]) == 0
    one = json.loads((norb_run / "test-standard-best.json").read_text())
    assert {k: v for k, v in one.items() if k != "evaluated"} == {k: v for k, v in normal.items() if k != "evaluated"}
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0", "--crops", "13", "--batch-size", "26"]) == 0
    assert "(13 crops each)" in capsys.readouterr().out
    thirteen = json.loads((norb_run / "test-standard-best-13crops.json").read_text())
    assert thirteen["crops"] == 13 and thirteen["num_images"] == normal["num_images"] == 2 * PAIRS
    assert (norb_run / "confusion-standard-best-13crops.png").is_file()
    # recount: every window scored separately, the scores averaged here
    windows = lambda transform, pixels: [transform.normalise(pixels, offset) for offset in crop_offsets(13)]
    assert thirteen["confusion_matrix"] == recounted_confusion(norb_run, windows)


@pytest.mark.parametrize("crops", [1, 13])
def test_mirrored_views_follow_the_plain_ones_and_are_the_mirror_images_windows(crops):
    image = np.zeros((28, 28), dtype=np.uint8)
    image[5:23, 4:16] = np.random.default_rng(2).integers(1, 256, (18, 12))  # not symmetric
    plain = MultiCropTransform(DigitsTransform(), crop_offsets(crops))(image)
    both = MultiCropTransform(DigitsTransform(), crop_offsets(crops), mirrored=True)
    views = both(image)
    assert both.views == 2 * crops and views.shape == (2 * crops, 1, 28, 28)
    assert torch.equal(views[:crops], plain)
    mirror = MultiCropTransform(DigitsTransform(), crop_offsets(crops))(np.ascontiguousarray(image[:, ::-1]))
    torch.testing.assert_close(views[crops:], mirror)
    torch.testing.assert_close(views[crops], DigitsTransform()(image).flip(-1))
    assert not torch.equal(views[crops], views[0])


def test_mirrored_testing_averages_the_scores_of_each_image_and_its_mirror_image(norb_run, capsys):
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0", "--mirrored", "--batch-size", "10"]) == 0
    assert "(1 crop and its mirror image each)" in capsys.readouterr().out
    mirrored = json.loads((norb_run / "test-standard-best-mirrored.json").read_text())
    assert mirrored["mirrored"] is True and mirrored["crops"] == 1 and mirrored["num_images"] == 2 * PAIRS
    assert (norb_run / "confusion-standard-best-mirrored.png").is_file()
    image_and_mirror = lambda transform, pixels: [transform.normalise(pixels), transform.normalise(pixels.flip(-1))]
    assert mirrored["confusion_matrix"] == recounted_confusion(norb_run, image_and_mirror)
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0"]) == 0
    plain = json.loads((norb_run / "test-standard-best.json").read_text())
    assert mirrored["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # the mirror images were scored too
    assert main(["test", str(norb_run), "--no-progress", "--workers", "0", "--mirrored", "--crops", "13"]) == 0
    assert "(13 crops and their mirror images each)" in capsys.readouterr().out
    both = json.loads((norb_run / "test-standard-best-13crops-mirrored.json").read_text())
    assert both["crops"] == 13 and both["mirrored"] is True


def test_stereo_items_are_both_views_as_two_channels_with_half_the_items(norb_root):
    mono = load_splits(DataConfig(root=norb_root))
    stereo = load_splits(DataConfig(root=norb_root, stereo=True))
    assert stereo.info.channels == 2 and mono.info.channels == 1
    assert len(stereo.test) == PAIRS and len(mono.test) == 2 * PAIRS
    assert len(stereo.train) + len(stereo.val) == PAIRS and len(stereo.train) * 2 == len(mono.train)
    assert np.array_equal(stereo.test.rows, mono.test.rows[::2]) and np.array_equal(stereo.test.labels, mono.test.labels[::2])
    image, label = stereo.test[5]
    assert image.shape == (2, 32, 32) and int(label) == int(mono.test.labels[10])
    transform = stereo.test.transform
    raw = np.load(stereo.test.images_path)
    pair = transform.pixels(np.array(raw[10:12]))
    torch.testing.assert_close(pair, torch.cat([transform.pixels(raw[10]), transform.pixels(raw[11])]))
    torch.testing.assert_close(image, transform.normalise(pair.unsqueeze(0))[0])  # standardised over both views
    train_image, _ = stereo.train[0]
    assert train_image.shape == (2, 32, 32)
    assert set(stereo.val.metadata["instance"].tolist()) == {4}
    batch, labels = next(iter(DataLoader(stereo.train, batch_size=4)))
    assert batch.shape == (4, 2, 32, 32) and labels.shape == (4,)


@pytest.mark.parametrize("model", ["smallnorb", "cnn-baseline"])
def test_stereo_training_builds_two_channel_networks_and_tests_on_pairs(norb_root, tmp_path, model, capsys):
    changes = {"model": model, "stereo": True}
    if model == "cnn-baseline":
        changes.update(model_options={"hidden_units": 16}, lr=1e-3)
    run = train(norb_root, tmp_path / "stereo", **changes)
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["in_channels"] == 2 and info["dataset_sizes"]["test"] == PAIRS
    assert main(["test", str(run), "--no-progress", "--workers", "0", "--checkpoint", "last"]) == 0
    assert json.loads((run / "test-standard-last.json").read_text())["num_images"] == PAIRS


def test_stereo_and_canvas_are_refused_where_they_do_not_apply(tmp_path, capsys):
    with pytest.raises(ConfigError, match="stereo applies to smallnorb"):
        DataConfig(dataset="mnist", stereo=True)
    assert main(["train", "--dataset", "smallnorb", "--canvas", "40", "--data-root", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "matcaps train: error: canvas applies to MNIST-like digits, not to smallnorb"]
