"""Split membership: validation by instance / seeded hold-out, novel-viewpoint splits, API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.data import DATASET_NAMES, DataConfig, DataSplits, dataset_info, load_splits, prepare
from matcaps.data.splits import azimuth_degrees, elevation_degrees
from matcaps.errors import ConfigError

FAMILIAR_AZIMUTHS = {300, 320, 340, 0, 20, 40}


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("norb")
    # every azimuth and elevation code, 3 training instances per category (96×96 images, as smallNORB
    # must have; uncompressed, which is quicker to write)
    write_tiny_smallnorb(root, instances_per_split=3, azimuths=tuple(range(0, 35, 2)), elevations=tuple(range(9)),
                         compress=False)
    prepare("smallnorb", root, download=False, progress=False, verify=False)
    return root


def test_public_api_facts() -> None:
    assert DATASET_NAMES == ("smallnorb", "mnist", "fashion-mnist", "cifar10")
    cifar = dataset_info("cifar10")
    assert (cifar.num_classes, cifar.image_size, cifar.channels, cifar.class_names[1]) == (10, 32, 3, "automobile")
    norb = dataset_info("smallnorb")
    assert (norb.num_classes, norb.image_size, norb.channels) == (5, 32, 1)
    assert norb.class_names == ("animal", "human", "airplane", "truck", "car")
    assert dataset_info("fashion-mnist").class_names[9] == "Ankle boot"
    with pytest.raises(ConfigError, match="cifar"):
        dataset_info("cifar")
    config = DataConfig()
    assert (config.dataset, config.root, config.split, config.val_instances, config.val_size, config.validation,
            config.seed) == ("smallnorb", Path("data"), "standard", (4,), 5000, True, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "cifar"}, "unknown dataset"),
    ({"split": "lighting"}, "unknown split"),
    ({"dataset": "mnist", "split": "azimuth"}, "only smallnorb"),
    ({"val_size": -1}, "val_size"),
])
def test_bad_config(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)


def test_viewpoint_codes() -> None:
    assert azimuth_degrees(np.arange(0, 35, 2)).tolist() == list(range(0, 341, 20))
    assert elevation_degrees(np.arange(9)).tolist() == list(range(30, 71, 5))


def test_standard_split_holds_out_instance_4(norb_root: Path) -> None:
    splits = load_splits(DataConfig(root=norb_root))
    assert isinstance(splits, DataSplits) and splits.info == dataset_info("smallnorb")
    train_instances = set(splits.train.metadata["instance"].tolist())
    val_instances = set(splits.val.metadata["instance"].tolist())
    assert val_instances == {4} and train_instances == {6, 7}
    assert set(splits.test.metadata["instance"].tolist()) == {0, 1, 2}
    per_instance = 5 * 9 * 18 * 2  # categories × elevations × azimuths × stereo
    assert len(splits.val) == per_instance and len(splits.train) == 2 * per_instance
    assert len(splits.test) == 3 * per_instance
    assert set(splits.val.labels.tolist()) == set(range(5))  # every category validated
    assert not set(splits.train.rows.tolist()) & set(splits.val.rows.tolist())
    assert splits.train.labels.dtype == np.int64


def test_val_instances_configurable_and_disable(norb_root: Path) -> None:
    splits = load_splits(DataConfig(root=norb_root, val_instances=(6, 7)))
    assert set(splits.val.metadata["instance"].tolist()) == {6, 7}
    assert set(splits.train.metadata["instance"].tolist()) == {4}
    whole = load_splits(DataConfig(root=norb_root, validation=False))
    assert whole.val is None and len(whole.train) == 3 * 5 * 9 * 18 * 2
    with pytest.raises(ConfigError, match=r"val_instances \[0\].*training instances are \[4, 6, 7\]"):
        load_splits(DataConfig(root=norb_root, val_instances=(0,)))
    with pytest.raises(ConfigError, match="every training instance"):
        load_splits(DataConfig(root=norb_root, val_instances=(4, 6, 7)))


def test_azimuth_split(norb_root: Path) -> None:
    splits = load_splits(DataConfig(root=norb_root, split="azimuth"))
    train_az = set(splits.train.metadata["azimuth_deg"].tolist()) | set(splits.val.metadata["azimuth_deg"].tolist())
    test_az = set(splits.test.metadata["azimuth_deg"].tolist())
    assert train_az == FAMILIAR_AZIMUTHS
    assert test_az == set(range(60, 281, 20))
    assert not train_az & test_az
    assert len(splits.test) == 3 * 5 * 9 * 12 * 2
    assert set(splits.test.metadata["instance"].tolist()) == {0, 1, 2}  # test images from the test file
    assert set(splits.val.metadata["instance"].tolist()) == {4}


def test_elevation_split(norb_root: Path) -> None:
    splits = load_splits(DataConfig(root=norb_root, split="elevation", validation=False))
    train_el = set(splits.train.metadata["elevation_deg"].tolist())
    test_el = set(splits.test.metadata["elevation_deg"].tolist())
    assert train_el == {30, 35, 40} and test_el == {45, 50, 55, 60, 65, 70}
    assert len(splits.train) == 3 * 5 * 3 * 18 * 2 and len(splits.test) == 3 * 5 * 6 * 18 * 2
    assert set(splits.train.metadata["instance"].tolist()) == {4, 6, 7}


def test_mnist_hold_out_is_seeded_and_disjoint(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, n_train=100, n_test=20)
    prepare("mnist", tmp_path, download=False, progress=False, verify=False)
    a = load_splits(DataConfig(dataset="mnist", root=tmp_path, val_size=25, seed=1))
    b = load_splits(DataConfig(dataset="mnist", root=tmp_path, val_size=25, seed=1))
    c = load_splits(DataConfig(dataset="mnist", root=tmp_path, val_size=25, seed=2))
    assert len(a.train) == 75 and len(a.val) == 25 and len(a.test) == 20
    assert sorted(a.train.rows.tolist() + a.val.rows.tolist()) == list(range(100))
    assert a.val.rows.tolist() == b.val.rows.tolist()
    assert a.val.rows.tolist() != c.val.rows.tolist()
    none = load_splits(DataConfig(dataset="mnist", root=tmp_path, validation=False))
    assert none.val is None and len(none.train) == 100
    with pytest.raises(ConfigError, match="val_size 5000"):
        load_splits(DataConfig(dataset="mnist", root=tmp_path))
