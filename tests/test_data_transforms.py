"""IBM's transforms and the datasets' seeded, worker-independent randomness."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.datasets import sample_seed
from matcaps.data.transforms import (
    DigitsTransform,
    NorbTransform,
    centre_crop,
    per_image_standardise,
    random_brightness,
    random_contrast,
    resize_bilinear,
)


def noise_image(seed: int = 0, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_per_image_standardisation_statistics() -> None:
    x = torch.rand(1, 48, 48) * 7 + 3
    y = per_image_standardise(x)
    assert abs(float(y.mean())) < 1e-5
    assert float(y.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    flat = per_image_standardise(torch.full((1, 4, 4), 0.3))  # std 0 → floor 1/sqrt(16), no NaN
    assert flat.abs().max() < 1e-5 and torch.isfinite(flat).all()


def test_resize_96_to_48_is_a_2x2_mean() -> None:
    x = torch.rand(1, 96, 96)
    expected = x.reshape(1, 48, 2, 48, 2).mean(dim=(2, 4))
    torch.testing.assert_close(resize_bilinear(x, 48), expected)


def test_eval_transform_is_the_centre_of_the_standardised_48_image() -> None:
    image = noise_image()
    out = NorbTransform(train=False)(image)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    full = per_image_standardise(resize_bilinear(torch.from_numpy(image).float().div(255).unsqueeze(0), 48))
    torch.testing.assert_close(out, full[:, 8:40, 8:40])
    torch.testing.assert_close(centre_crop(full, 32), full[:, 8:40, 8:40])
    assert torch.equal(out, NorbTransform(train=False)(image))


def test_train_transform_without_jitter_is_a_crop_of_the_standardised_image() -> None:
    image = noise_image(1)
    plain = NorbTransform(train=True, max_brightness_delta=0.0, contrast_range=(1.0, 1.0))
    full = NorbTransform(train=False, crop=48)(image)  # standardised 48×48, whole
    assert float(full.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(full.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    offsets = set()
    for seed in range(60):
        out = plain(image, gen(seed))
        assert out.shape == (1, 32, 32)
        matches = [(t, l) for t in range(17) for l in range(17) if torch.allclose(out, full[:, t : t + 32, l : l + 32])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 30  # offsets spread over the 17×17 possibilities
    assert all(0 <= t <= 16 and 0 <= l <= 16 for t, l in offsets)


def test_brightness_and_contrast_ranges() -> None:
    x = per_image_standardise(torch.rand(1, 32, 32))
    shifts = [float((random_brightness(x, 2.0, gen(s)) - x).mean()) for s in range(200)]
    assert -2.0 <= min(shifts) < -1.5 and 1.5 < max(shifts) < 2.0
    for s in range(50):
        y = random_contrast(x + 3.0, 0.5, 1.5, gen(s))
        assert float(y.mean()) == pytest.approx(3.0, abs=1e-4)  # around the image mean
        factor = float(y.std()) / float(x.std())
        assert 0.5 - 1e-4 <= factor <= 1.5 + 1e-4


def test_full_train_transform_statistics_stay_in_ibm_ranges() -> None:
    image = noise_image(2)
    outs = torch.stack([NorbTransform(train=True)(image, gen(s)) for s in range(100)])
    means, stds = outs.mean(dim=(1, 2, 3)), outs.std(dim=(1, 2, 3), unbiased=False)
    assert means.abs().max() < 2.0 + 0.5  # brightness ±2 plus crop deviations
    assert stds.min() > 0.5 * 0.8 and stds.max() < 1.5 * 1.2
    assert means.std() > 0.5  # brightness actually varies


def test_digits_transform() -> None:
    image = noise_image(3, size=28)
    out = DigitsTransform()(image)
    assert out.shape == (1, 28, 28)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_sample_seed_depends_on_every_part() -> None:
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("norb")
    write_tiny_smallnorb(root)
    prepare("smallnorb", root, download=False, progress=False, verify=False)
    return root


def test_items_are_deterministic_per_seed_epoch_index(norb_root: Path) -> None:
    train = load_splits(DataConfig(root=norb_root, seed=5)).train
    again = load_splits(DataConfig(root=norb_root, seed=5)).train
    other_seed = load_splits(DataConfig(root=norb_root, seed=6)).train
    image, label = train[3]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.shape == () and int(label) == int(train.labels[3])
    assert torch.equal(image, again[3][0])
    assert torch.equal(image, train[3][0])
    assert not torch.equal(image, other_seed[3][0])
    train.set_epoch(1)
    assert train.epoch == 1
    epoch1 = train[3][0]
    assert not torch.equal(image, epoch1)
    train.set_epoch(0)
    assert torch.equal(image, train[3][0])


def test_eval_items_do_not_depend_on_epoch(norb_root: Path) -> None:
    splits = load_splits(DataConfig(root=norb_root))
    first = splits.test[7][0]
    splits.test.set_epoch(9)
    assert torch.equal(first, splits.test[7][0])
    assert torch.equal(splits.val[0][0], load_splits(DataConfig(root=norb_root, seed=1)).val[0][0])


def test_dataset_pickles_without_its_memmap(norb_root: Path) -> None:
    train = load_splits(DataConfig(root=norb_root)).train
    train[0]
    assert train._images is not None
    clone = pickle.loads(pickle.dumps(train))
    assert clone._images is None
    assert torch.equal(clone[4][0], train[4][0])


def test_dataloader_workers_give_the_same_batches_and_see_set_epoch(norb_root: Path) -> None:
    train = load_splits(DataConfig(root=norb_root, seed=3)).train
    train.set_epoch(2)
    serial = torch.cat([x for x, _ in DataLoader(train, batch_size=16)])
    loader = DataLoader(train, batch_size=16, num_workers=2, persistent_workers=True)
    parallel = torch.cat([x for x, _ in loader])
    assert torch.equal(serial, parallel)
    train.set_epoch(3)  # must reach the persistent workers
    next_epoch = torch.cat([x for x, _ in loader])
    train_copy = load_splits(DataConfig(root=norb_root, seed=3)).train
    train_copy.set_epoch(3)
    assert torch.equal(next_epoch, torch.cat([x for x, _ in DataLoader(train_copy, batch_size=16)]))
    assert not torch.equal(next_epoch, parallel)


def test_mnist_items(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, n_train=40, n_test=10)
    prepare("mnist", tmp_path, download=False, progress=False, verify=False)
    splits = load_splits(DataConfig(dataset="mnist", root=tmp_path, val_size=8))
    image, label = splits.train[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64
    assert float(image.mean()) == pytest.approx(0.0, abs=1e-5)
    assert math.isclose(float(image.std(unbiased=False)), 1.0, abs_tol=1e-4)
    assert splits.info.image_size == 28 and splits.info.num_classes == 10
    assert splits.test.labels.tolist() == list(range(10))


def test_errors_a_user_can_cause_are_matcaps_errors_naming_the_sizes():
    """A canvas smaller than the image is a configuration error, a crop outside the image bad input:
    both reach the command line as one line (MatcapsError), not a traceback."""
    from matcaps.errors import ConfigError, InvalidInputError

    with pytest.raises(ConfigError, match="a 28×28 image does not fit on a canvas of 20"):
        DigitsTransform(canvas=20).pixels(noise_image(size=28))
    pixels = NorbTransform(train=False).pixels(noise_image())  # (1, 48, 48)
    with pytest.raises(InvalidInputError, match=r"crop offset \(9, 0\) leaves the 48×48 image"):
        NorbTransform(train=False).normalise(pixels.unsqueeze(0), offset=(9, 0))
    assert NorbTransform(train=False).normalise(pixels.unsqueeze(0), offset=(8, 0)).shape == (1, 1, 32, 32)
