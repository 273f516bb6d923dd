"""The affNIST-style test split and the padded (canvas) MNIST of Sabour et al."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.affine import (
    AFFINE_MAX_ROTATION_DEG,
    AFFINE_MAX_SHEAR,
    AFFINE_SCALE_RANGE,
    AffineDigitsTransform,
    AffineParameters,
    translation_range,
    warp,
)
from matcaps.data.datasets import sample_generator
from matcaps.data.idx_format import write_idx
from matcaps.data.sources import raw_dir
from matcaps.data.transforms import DigitsTransform, per_image_standardise, place_on_canvas, to_unit_float
from matcaps.errors import ConfigError

TEST_DIGITS = 40


def blob_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-like ``(count, 28, 28)`` uint8 images: black, with a bright blob inside the central 20×20 box."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    for image, label in zip(images, labels):
        height, width = rng.integers(8, 21), rng.integers(6, 17)
        top, left = 4 + rng.integers(0, 21 - height), 4 + rng.integers(0, 21 - width)
        image[top : top + height, left : left + width] = rng.integers(60, 256, size=(height, width))
        image[top + height // 2, left : left + width] = 255 - 20 * int(label)  # the label shows in the image
    return images, labels


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    out = raw_dir("mnist", root)
    out.mkdir(parents=True)
    for prefix, count, seed in (("train", 60, 0), ("t10k", TEST_DIGITS, 1)):
        images, labels = blob_digits(count, seed)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels)
    prepare("mnist", root, download=False, progress=False, verify=False)
    return root


def test_identity_parameters_place_the_digit_in_the_centre_unchanged():
    image = torch.rand(1, 28, 28)
    torch.testing.assert_close(warp(image, AffineParameters(), 28), image, rtol=0, atol=1e-6)
    torch.testing.assert_close(warp(image, AffineParameters(), 40), place_on_canvas(image, 40, 6, 6), rtol=0, atol=1e-6)


def test_a_quarter_turn_and_an_integer_shift_move_pixels_exactly():
    image = torch.rand(1, 28, 28)
    # y points down, so a positive angle turns the picture clockwise
    torch.testing.assert_close(warp(image, AffineParameters(rotation_deg=90), 28), torch.rot90(image, -1, (1, 2)),
                               rtol=0, atol=1e-6)  # fmt: skip
    shifted = warp(image, AffineParameters(shift_x=3, shift_y=-2), 28)
    torch.testing.assert_close(shifted[:, :26, 3:], image[:, 2:, :25], rtol=0, atol=1e-6)
    assert shifted[:, 26:].abs().max() == 0 and shifted[:, :, :3].abs().max() == 0
    # a scale of 2 about the centre: the output's centre 14×14 magnifies the input's centre 7×7
    doubled = warp(image, AffineParameters(scale_x=2, scale_y=2), 28)
    assert torch.allclose(doubled[:, 13:15, 13:15].mean(), image[:, 13:15, 13:15].mean(), atol=0.1)


def test_translations_keep_the_transformed_digit_inside_the_canvas():
    image = torch.zeros(1, 28, 28)
    image[:, 4:24, 8:20] = 1.0  # a 20×12 digit
    matrix = AffineParameters(rotation_deg=15, scale_x=1.1).matrix()
    (low_x, high_x), (low_y, high_y) = translation_range(image, matrix, 40)
    assert low_x < 0 < high_x and low_y < 0 < high_y
    for shift_x in (low_x, high_x):
        for shift_y in (low_y, high_y):
            out = warp(image, AffineParameters(rotation_deg=15, scale_x=1.1, shift_x=shift_x, shift_y=shift_y), 40)
            # no mass is lost at the edges: it scales with the determinant only
            assert float(out.sum()) == pytest.approx(float(image.sum()) * float(torch.det(matrix)), rel=0.01)
    too_large = translation_range(torch.ones(1, 28, 28), AffineParameters(scale_x=1.2).matrix(), 28)
    assert too_large[0] == (0.0, 0.0)  # cannot fit: centred


def test_affine_split_is_deterministic_under_its_seed_and_keeps_the_labels(digits_root):
    standard = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10)).test
    affine = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10, split="affine")).test
    again = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10, split="affine", seed=7)).test
    other = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10, split="affine", affine_seed=1)).test
    assert len(affine) == len(standard) == TEST_DIGITS
    assert np.array_equal(affine.labels, standard.labels) and np.array_equal(affine.rows, standard.rows)
    for index in range(TEST_DIGITS):
        image, label = affine[index]
        assert image.shape == (1, 28, 28) and int(label) == int(standard.labels[index])
        assert torch.equal(image, again[index][0])  # the run's seed does not matter, only the affine seed
        assert not torch.equal(image, other[index][0])
        assert not torch.equal(image, standard[index][0])
    assert torch.equal(affine[3][0], affine[3][0])


def test_affine_split_draws_the_affnist_ranges_and_keeps_digits_whole_on_a_40_canvas(digits_root):
    images = np.load(load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10)).test.images_path)
    transform = AffineDigitsTransform(canvas=40)
    shifts = []
    for row, image in enumerate(images):
        parameters = transform.parameters(image, sample_generator(0, 0, row))
        assert abs(parameters.rotation_deg) <= AFFINE_MAX_ROTATION_DEG and abs(parameters.shear) <= AFFINE_MAX_SHEAR
        assert all(AFFINE_SCALE_RANGE[0] <= s <= AFFINE_SCALE_RANGE[1] for s in (parameters.scale_x, parameters.scale_y))
        pixels = transform.pixels(image, sample_generator(0, 0, row))
        determinant = float(torch.det(parameters.matrix()))
        assert float(pixels.sum()) == pytest.approx(float(to_unit_float(image).sum()) * determinant, rel=0.02)
        torch.testing.assert_close(transform(image, sample_generator(0, 0, row)), per_image_standardise(pixels))
        shifts.append((parameters.shift_x, parameters.shift_y))
    spread = np.asarray(shifts)
    assert spread.std(axis=0).min() > 2 and np.abs(spread).max() > 5  # translations over the whole canvas


def test_canvas_places_digits_at_random_for_training_and_centred_for_evaluation(digits_root):
    splits = load_splits(DataConfig(dataset="mnist", root=digits_root, val_size=10, canvas=40))
    assert splits.info.image_size == 40
    raw = np.load(splits.train.images_path)
    val_image, _ = splits.val[0]
    centred = place_on_canvas(to_unit_float(raw[splits.val.rows[0]]), 40, 6, 6)
    torch.testing.assert_close(val_image, per_image_standardise(centred))
    assert splits.test[0][0].shape == (1, 40, 40)
    transform = DigitsTransform(train=True, canvas=40)
    offsets = set()
    for seed in range(200):
        pixels = transform.pixels(raw[0], torch.Generator().manual_seed(seed))
        matches = [(t, l) for t in range(13) for l in range(13)
                   if torch.equal(pixels, place_on_canvas(to_unit_float(raw[0]), 40, t, l))]  # fmt: skip
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 100 and {t for t, _ in offsets} == set(range(13))  # every offset 0..12 occurs
    first = splits.train[5][0]
    splits.train.set_epoch(1)
    assert not torch.equal(first, splits.train[5][0])  # a new position every epoch


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "smallnorb", "split": "affine"}, "split .affine. transforms MNIST-like digits .mnist, fashion-mnist., not smallnorb"),
    ({"dataset": "mnist", "canvas": 20}, "canvas must be an integer of at least 28"),
    ({"dataset": "smallnorb", "canvas": 40}, "canvas applies to MNIST-like digits"),
    ({"dataset": "mnist", "test_viewpoints": "familiar"}, "familiar test viewpoints need the azimuth or elevation"),
])  # fmt: skip
def test_bad_options(changes, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**changes)


def test_a_network_trained_on_a_40_canvas_is_tested_on_the_40_affine_split(digits_root, tmp_path, single_thread):
    import json

    from matcaps.cli import main
    from matcaps.evaluate import load_for_testing

    run = tmp_path / "padded"
    assert main(["train", "--dataset", "mnist", "--data-root", str(digits_root), "--canvas", "40", "--model",
                 "cnn-baseline", "--model-option", "hidden_units=16", "--val-size", "10", "--batch-size", "10",
                 "--max-steps", "4", "--run-dir", str(run), "--no-progress", "--workers", "0"]) == 0  # fmt: skip
    assert json.loads((run / "run.json").read_text())["model_config"]["image_size"] == 40
    assert main(["test", str(run), "--split", "affine", "--no-progress", "--workers", "0"]) == 0
    report = json.loads((run / "test-affine-best.json").read_text())
    assert (report["split"], report["num_images"], report["affine_seed"]) == ("affine", TEST_DIGITS, 0)
    loaded = load_for_testing(run, split="affine", device="cpu")
    images = torch.stack([loaded.test_set[i][0] for i in range(TEST_DIGITS)])
    assert images.shape == (TEST_DIGITS, 1, 40, 40)
    with torch.no_grad():
        predictions = loaded.model(images).scores.argmax(1).numpy()
    assert report["accuracy"] == float(np.mean(predictions == loaded.test_set.labels))
