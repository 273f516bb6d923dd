"""``--hflip``: training images mirrored left-right at random (Fashion-MNIST, CIFAR-10)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_tiny_mnist

from matcaps.cli import main
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.transforms import HFLIP_PROBABILITY, DigitsTransform, to_unit_float
from matcaps.errors import ConfigError

DRAWS = 400


def asymmetric_image(seed: int = 0) -> np.ndarray:
    """A ``(28, 28)`` uint8 image that differs from its mirror image."""
    image = np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)
    image[:, :14] = 0
    return image


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    write_tiny_mnist(root, "fashion-mnist", n_train=40, n_test=20)  # pixel noise: no image equals its mirror
    prepare("fashion-mnist", root, download=False, progress=False, verify=False)
    return root


def test_training_images_are_the_image_or_its_mirror_about_half_the_time_each():
    image = asymmetric_image()
    plain = to_unit_float(image)
    transform = DigitsTransform(train=True, hflip=True)
    assert transform.random
    flips = 0
    for seed in range(DRAWS):
        pixels = transform.pixels(image, torch.Generator().manual_seed(seed))
        mirrored = torch.equal(pixels, plain.flip(-1))
        assert mirrored or torch.equal(pixels, plain)
        flips += mirrored
    spread = 4 * (DRAWS * HFLIP_PROBABILITY * (1 - HFLIP_PROBABILITY)) ** 0.5  # four binomial standard deviations
    assert abs(flips - DRAWS * HFLIP_PROBABILITY) < spread


def test_flips_come_after_the_canvas_draws_so_positions_are_those_of_a_run_without_flips():
    image = asymmetric_image(1)
    shifted, both = DigitsTransform(train=True, canvas=32), DigitsTransform(train=True, canvas=32, hflip=True)
    for seed in range(50):
        reference = shifted.pixels(image, torch.Generator().manual_seed(seed))
        pixels = both.pixels(image, torch.Generator().manual_seed(seed))
        assert torch.equal(pixels, reference) or torch.equal(pixels, reference.flip(-1))


def test_evaluation_never_flips_and_needs_no_generator():
    image = asymmetric_image()
    evaluation = DigitsTransform(train=False, hflip=True)
    assert not evaluation.random
    torch.testing.assert_close(evaluation(image), DigitsTransform()(image), rtol=0, atol=0)
    with pytest.raises(ValueError, match="flips needs a torch.Generator"):
        DigitsTransform(train=True, hflip=True)(image)


def test_only_the_training_split_of_a_dataset_flips(fashion_root):
    splits = load_splits(DataConfig(dataset="fashion-mnist", root=fashion_root, val_size=10, hflip=True))
    assert splits.train.transform.hflip and not splits.val.transform.hflip and not splits.test.transform.hflip
    raw = np.load(splits.train.images_path)
    seen = set()
    for epoch in range(12):
        splits.train.set_epoch(epoch)
        image = splits.train[0][0]
        plain = DigitsTransform()(raw[splits.train.rows[0]])
        same = torch.allclose(image, plain, rtol=0, atol=1e-6)  # standardising mirrored pixels sums in another order
        assert same or torch.allclose(image, plain.flip(-1), rtol=0, atol=1e-6)
        seen.add(same)
    assert seen == {True, False}  # both orientations across epochs (2**-11 chance of failing by luck)


@pytest.mark.parametrize("dataset", ["smallnorb", "folder"])
def test_hflip_is_refused_where_it_does_not_apply(dataset, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"hflip applies to MNIST-like datasets and cifar10, not to {dataset}"):
        DataConfig(dataset=dataset, hflip=True)
    assert main(["train", "--dataset", dataset, "--hflip", "--data-root", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"matcaps train: error: hflip applies to MNIST-like datasets and cifar10, not to {dataset}"]


def test_a_run_with_flips_records_them_and_resumes_with_them(fashion_root, tmp_path, single_thread):
    run = tmp_path / "flipped"
    common = ["--data-root", str(fashion_root), "--no-progress", "--workers", "0", "--log-every", "1"]
    assert main(["train", "--dataset", "fashion-mnist", "--hflip", "--model", "cnn-baseline", "--model-option",
                 "hidden_units=16", "--val-size", "10", "--batch-size", "10", "--max-steps", "2", "--run-dir",
                 str(run), *common]) == 0  # fmt: skip
    assert "hflip = true" in (run / "config.toml").read_text().splitlines()
    assert main(["train", "--resume", str(run), "--max-steps", "4", *common]) == 0
    assert "hflip = true" in (run / "config.toml").read_text().splitlines()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["phase"] == "train"] == [1, 2, 3, 4]  # fmt: skip
