"""Preparing the cache: content, where raw files are found, atomicity, rebuilds, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import matcaps.data.cache as cache_module
from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.cli import main
from matcaps.data import DataConfig, cache_dir, is_valid_cache, load_splits, prepare
from matcaps.data.norb_format import read_norb, write_norb
from matcaps.data.sources import SMALLNORB_TEST_STEM, SMALLNORB_TRAIN_STEM
from matcaps.errors import DataFormatError, DatasetNotFoundError


def test_smallnorb_cache_content_matches_raw_files(tmp_path: Path) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1)
    cache = prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert cache == tmp_path / "smallnorb" / "prepared"
    manifest = json.loads((cache / "manifest.json").read_text())
    pairs = 5 * 1 * 2 * 4  # categories × instances × elevations × azimuths
    assert manifest["format_version"] == cache_module.CACHE_FORMAT_VERSION
    assert manifest["splits"]["train"]["count"] == manifest["splits"]["test"]["count"] == 2 * pairs
    assert manifest["splits"]["train"]["image_shape"] == [96, 96]
    assert manifest["sources"]["train_dat"]["bytes"] == (raw / f"{SMALLNORB_TRAIN_STEM}-dat.mat.gz").stat().st_size

    dat = read_norb(raw / f"{SMALLNORB_TEST_STEM}-dat.mat.gz")
    cat = read_norb(raw / f"{SMALLNORB_TEST_STEM}-cat.mat.gz")
    info = read_norb(raw / f"{SMALLNORB_TEST_STEM}-info.mat.gz")
    images = np.load(cache / "test_images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (2 * pairs, 96, 96)
    np.testing.assert_array_equal(images[0::2], dat[:, 0])  # left images at even rows
    np.testing.assert_array_equal(images[1::2], dat[:, 1])  # right images at odd rows
    labels = np.load(cache / "test_labels.npy")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.repeat(cat, 2))
    np.testing.assert_array_equal(np.load(cache / "test_info.npy"), np.repeat(info, 2, axis=0))


def test_mnist_cache_and_second_prepare_is_a_no_op(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, "fashion-mnist", n_train=30, n_test=10)
    cache = prepare("fashion-mnist", tmp_path, download=False, progress=False, verify=False)
    assert np.load(cache / "train_images.npy").shape == (30, 28, 28)
    assert np.load(cache / "test_labels.npy").tolist() == list(range(10))
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    os.utime(cache / "manifest.json", ns=(stamp - 10**9, stamp - 10**9))
    prepare("fashion-mnist", tmp_path, download=False, progress=False, verify=False)
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp - 10**9  # not rebuilt


def test_user_files_in_root_uncompressed_are_accepted(tmp_path: Path) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1, compress=False, directory=tmp_path)
    assert (tmp_path / f"{SMALLNORB_TRAIN_STEM}-dat.mat").is_file()
    cache = prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert json.loads((cache / "manifest.json").read_text())["sources"]["train_dat"]["file"].endswith("-dat.mat")


def test_mnist_files_are_not_taken_from_root_itself(tmp_path: Path) -> None:
    """MNIST and Fashion-MNIST share file names: files directly in ROOT would be ambiguous."""
    write_tiny_mnist(tmp_path, directory=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz"):
        prepare("mnist", tmp_path, download=False, progress=False, verify=False)
    write_tiny_mnist(tmp_path, directory=tmp_path / "mnist")  # ROOT/<name>/ is fine
    prepare("mnist", tmp_path, download=False, progress=False, verify=False)
    assert is_valid_cache("mnist", tmp_path)


def test_missing_cache_tells_which_command_to_run(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=rf"run `matcaps data smallnorb --root {tmp_path}`"):
        load_splits(DataConfig(root=tmp_path))


def test_interrupted_prepare_leaves_nothing_valid_and_rerun_works(tmp_path: Path, monkeypatch) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while writing the manifest

    monkeypatch.setattr(cache_module, "_write_manifest", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert not cache_dir("smallnorb", tmp_path).exists()
    assert not is_valid_cache("smallnorb", tmp_path)
    assert [p.name for p in (tmp_path / "smallnorb").iterdir()] == ["raw"]  # temp dir cleaned up
    with pytest.raises(DatasetNotFoundError):
        load_splits(DataConfig(root=tmp_path))

    monkeypatch.undo()
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert len(load_splits(DataConfig(root=tmp_path, validation=False)).train) == 80


def test_killed_prepare_leftovers_are_ignored_and_removed(tmp_path: Path) -> None:
    """A SIGKILLed prepare leaves its temp dir (with arrays, without manifest): never valid."""
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    leftover = tmp_path / "smallnorb" / f"{cache_module.TMP_PREFIX}{dead_pid}-0"
    leftover.mkdir(parents=True)
    np.save(leftover / "train_images.npy", np.zeros((3, 96, 96), np.uint8))
    half = cache_dir("smallnorb", tmp_path)  # a cache dir without manifest
    half.mkdir()
    np.save(half / "train_images.npy", np.zeros((3, 96, 96), np.uint8))
    assert not is_valid_cache("smallnorb", tmp_path)
    with pytest.raises(DatasetNotFoundError):
        load_splits(DataConfig(root=tmp_path, validation=False))
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert is_valid_cache("smallnorb", tmp_path)
    assert not leftover.exists()
    assert sorted(p.name for p in (tmp_path / "smallnorb").iterdir()) == ["prepared", "raw"]


def test_leftovers_of_dead_prepares_go_even_when_the_cache_is_kept(tmp_path: Path) -> None:
    """Every prepare (and ``matcaps data --force``) removes the temp dirs of prepares that are gone."""
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    parent = tmp_path / "smallnorb"
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    dead = [parent / f"{cache_module.TMP_PREFIX}{dead_pid}-0", parent / f"{cache_module.OLD_PREFIX}{dead_pid}-1"]
    alive = parent / f"{cache_module.TMP_PREFIX}{os.getppid()}-0"  # a running process: maybe still preparing
    for directory in (*dead, alive):
        directory.mkdir()
        np.save(directory / "train_images.npy", np.zeros((3, 96, 96), np.uint8))
    assert main(["data", "smallnorb", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0  # already prepared
    assert not any(d.exists() for d in dead) and alive.exists()
    dead[0].mkdir()
    assert main(["data", "smallnorb", "--root", str(tmp_path), "--no-download", "--no-verify", "--force", "--quiet"]) == 0
    assert not dead[0].exists() and alive.exists()
    assert is_valid_cache("smallnorb", tmp_path)


def test_failed_force_rebuild_keeps_the_old_cache(tmp_path: Path, monkeypatch) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_array", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare("smallnorb", tmp_path, download=False, force=True, progress=False, verify=False)
    assert is_valid_cache("smallnorb", tmp_path)


def test_damaged_cache_is_reported_then_rebuilt(tmp_path: Path) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    cache = prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    images = cache / "test_images.npy"
    images.write_bytes(images.read_bytes()[:1000])  # truncated array
    with pytest.raises(DataFormatError, match=r"test_images\.npy.*--force"):
        load_splits(DataConfig(root=tmp_path, validation=False))
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)  # invalid → rebuilt
    assert len(load_splits(DataConfig(root=tmp_path, validation=False)).test) == 80

    manifest = cache / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 999}))
    assert not is_valid_cache("smallnorb", tmp_path)
    prepare("smallnorb", tmp_path, download=False, force=False, progress=False, verify=False)
    assert json.loads(manifest.read_text())["format_version"] == cache_module.CACHE_FORMAT_VERSION


def test_force_rebuilds_from_new_raw_files(tmp_path: Path) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    write_tiny_smallnorb(tmp_path, instances_per_split=2)
    prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert len(load_splits(DataConfig(root=tmp_path, validation=False)).train) == 80  # stale but valid
    prepare("smallnorb", tmp_path, download=False, force=True, progress=False, verify=False)
    assert len(load_splits(DataConfig(root=tmp_path, validation=False)).train) == 160


def test_inconsistent_raw_files_name_the_file(tmp_path: Path) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1)
    cat = raw / f"{SMALLNORB_TRAIN_STEM}-cat.mat.gz"
    write_norb(cat, read_norb(cat)[:-1])  # one label fewer than image pairs
    with pytest.raises(DataFormatError, match=rf"{cat.name}.*expected 40 int32 labels.*shape \[39\]"):
        prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert not is_valid_cache("smallnorb", tmp_path)

    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    dat = raw / f"{SMALLNORB_TEST_STEM}-dat.mat.gz"
    write_norb(dat, read_norb(dat)[:, 0])  # lost the stereo axis
    with pytest.raises(DataFormatError, match=rf"{dat.name}.*stereo"):
        prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)

    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    info = raw / f"{SMALLNORB_TRAIN_STEM}-info.mat.gz"
    table = read_norb(info)
    table[0, 2] = 3  # odd azimuth code
    write_norb(info, table)
    with pytest.raises(DataFormatError, match=rf"{info.name}.*azimuth.*\[3\]"):
        prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)


def test_truncated_norb_image_file_fails_prepare(tmp_path: Path) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1, compress=False)
    dat = raw / f"{SMALLNORB_TEST_STEM}-dat.mat"
    dat.write_bytes(dat.read_bytes()[:-96])
    total = 24 + 80 * 96 * 96  # header + data
    with pytest.raises(DataFormatError, match=rf"{dat.name}: truncated.*announces {total} bytes.*only {total - 96}\b"):
        prepare("smallnorb", tmp_path, download=False, progress=False, verify=False)
    assert not is_valid_cache("smallnorb", tmp_path)
    assert sorted(p.name for p in (tmp_path / "smallnorb").iterdir()) == ["raw"]


def test_truncated_raw_image_file_fails_prepare(tmp_path: Path) -> None:
    raw = write_tiny_mnist(tmp_path, compress=False)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-50])
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.*truncated"):
        prepare("mnist", tmp_path, download=False, progress=False, verify=False)
    assert not is_valid_cache("mnist", tmp_path)
