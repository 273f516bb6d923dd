"""CIFAR-10: archives written here in the official pickle format round-trip; damaged or hostile ones are refused."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import TINY_MODEL_OPTIONS

from matcaps.cli import main
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.checksums import ChecksumError
from matcaps.data.cifar_format import CLASS_NAMES, encode_cifar_batch, write_cifar_archive
from matcaps.errors import DataFormatError
from matcaps.models import build_model, preset

ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def planes(count: int, seed: int) -> np.ndarray:
    """``(count, 3, 32, 32)`` uint8 colour planes (red, green, blue)."""
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def official_batch(image_planes: np.ndarray, labels: list[int], name: str) -> bytes:
    """A batch pickled as in the official archive, written independently of matcaps: bytes keys, each
    row the 1,024 red, then green, then blue values, labels a list."""
    rows = np.concatenate([image_planes[:, c].reshape(len(labels), -1) for c in range(3)], axis=1)
    batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
             b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}  # fmt: skip
    return pickle.dumps(batch, protocol=2)


def write_archive(path: Path, members: dict[str, bytes], compress: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def official_members(per_batch: int = 2, test: int = 5) -> tuple[dict[str, bytes], np.ndarray, list[int], np.ndarray, list[int]]:
    members = {"batches.meta": pickle.dumps({b"label_names": [n.encode() for n in CLASS_NAMES],
                                             b"num_cases_per_batch": 10000, b"num_vis": 3072}, protocol=2)}  # fmt: skip
    train_planes, train_labels = planes(5 * per_batch, seed=1), [i % 10 for i in range(5 * per_batch)]
    for index, name in enumerate(TRAIN_BATCHES):
        rows = slice(index * per_batch, (index + 1) * per_batch)
        members[name] = official_batch(train_planes[rows], train_labels[rows], f"training batch {index + 1} of 5")
    test_planes, test_labels = planes(test, seed=2), [9 - i % 10 for i in range(test)]
    members["test_batch"] = official_batch(test_planes, test_labels, "testing batch 1 of 1")
    members["readme.html"] = b"<html></html>"
    return members, train_planes, train_labels, test_planes, test_labels


def raw_dir(root: Path) -> Path:
    path = root / "cifar10" / "raw"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_error(root: Path) -> str:
    with pytest.raises(DataFormatError) as caught:
        prepare("cifar10", root, download=False, progress=False, verify=False)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("compress", [True, False])
def test_an_official_format_archive_round_trips(tmp_path, compress):
    members, train_planes, train_labels, test_planes, test_labels = official_members()
    name = ARCHIVE if compress else ARCHIVE[: -len(".gz")]
    write_archive(raw_dir(tmp_path) / name, members, compress)
    cache = prepare("cifar10", tmp_path, download=False, progress=False, verify=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"]["train"]["image_shape"] == [32, 32, 3] and manifest["verified"] is False
    images = np.load(cache / "train_images.npy")
    assert images.shape == (10, 32, 32, 3)
    assert np.array_equal(images, train_planes.transpose(0, 2, 3, 1))  # pixel (y, x) of plane c → [y, x, c]
    assert np.load(cache / "train_labels.npy").tolist() == train_labels
    assert np.array_equal(np.load(cache / "test_images.npy"), test_planes.transpose(0, 2, 3, 1))
    assert np.load(cache / "test_labels.npy").tolist() == test_labels

    splits = load_splits(DataConfig(dataset="cifar10", root=tmp_path, val_size=2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 5)
    assert splits.info.channels == 3 and splits.info.class_names == CLASS_NAMES
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and label.item() == 9
    expected = torch.from_numpy(test_planes[0]).double() / 255
    expected = (expected - expected.mean()) / expected.std(unbiased=False)
    assert torch.allclose(image.double(), expected, atol=1e-5)  # per-image standardisation over every channel


def test_the_library_writer_writes_what_the_reader_reads(tmp_path):
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), np.arange(7) % 10
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.array([1, 2, 3])
    write_cifar_archive(raw_dir(tmp_path) / ARCHIVE, {"train": train, "test": test})
    cache = prepare("cifar10", tmp_path, download=False, progress=False, verify=False)
    assert np.array_equal(np.load(cache / "train_images.npy"), train[0])
    assert np.array_equal(np.load(cache / "test_labels.npy"), test[1])


def test_the_official_checksum_is_required_unless_no_verify(tmp_path, capsys):
    members = official_members()[0]
    path = write_archive(raw_dir(tmp_path) / ARCHIVE, members)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch for {ARCHIVE} of cifar10: expected the "
                                            r"published \.gz with MD5 c58f30108f718f92721af3b95e74349a"):
        prepare("cifar10", tmp_path, download=False, progress=False)
    assert main(["data", "cifar10", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 10 images of 32x32x3 uint8" in out and "network input 3x32x32" in out and "NOT verified" in out


@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_a_damaged_archive_is_refused_with_its_name(tmp_path, damage, capsys):
    path = write_archive(raw_dir(tmp_path) / ARCHIVE, official_members()[0])
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bit-flip":
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert str(path) in prepare_error(tmp_path)
    assert main(["data", "cifar10", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert not (tmp_path / "cifar10" / "prepared").exists()


class Exploit:
    """Unpickling this would create the file ``target`` (it never may)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("fault, message", [
    ("missing-batch", "has no cifar-10-batches-py/data_batch_3"),
    ("wrong-width", "expected 'data' uint8 of shape (N, 3072)"),
    ("wrong-dtype", "expected 'data' uint8"),
    ("label-out-of-range", "invalid label values [10]"),
    ("label-count", "expected 2 integer 'labels'"),
    ("not-a-dict", "not the dict of a CIFAR-10 batch"),
    ("not-a-pickle", "is not a CIFAR-10 pickle"),
    ("wrong-classes", "names the classes"),
    ("exploit", "refusing to load"),
])  # fmt: skip
def test_batches_that_are_not_cifar10_are_refused(tmp_path, fault, message):
    members = official_members()[0]
    rows = np.zeros((2, 3072), np.uint8)
    replacement = {
        "missing-batch": None,
        "wrong-width": pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, protocol=2),
        "wrong-dtype": pickle.dumps({b"data": rows.astype(np.float32), b"labels": [0, 1]}, protocol=2),
        "label-out-of-range": pickle.dumps({b"data": rows, b"labels": [0, 10]}, protocol=2),
        "label-count": pickle.dumps({b"data": rows, b"labels": [0]}, protocol=2),
        "not-a-dict": pickle.dumps([rows], protocol=2),
        "not-a-pickle": b"\x00" * 100,
        "wrong-classes": None,
        "exploit": pickle.dumps({b"data": Exploit(tmp_path / "pwned"), b"labels": [0, 1]}, protocol=2),
    }[fault]
    if fault == "missing-batch":
        del members["data_batch_3"]
    elif fault == "wrong-classes":
        members["batches.meta"] = pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2)
    else:
        members["data_batch_3"] = replacement
    path = write_archive(raw_dir(tmp_path) / ARCHIVE, members)
    error = prepare_error(tmp_path)
    assert error.startswith(str(path)) and message in error, error
    assert not (tmp_path / "pwned").exists()


def test_an_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr("matcaps.data.cifar_format.MAX_MEMBER_BYTES", 5_000)
    path = write_archive(raw_dir(tmp_path) / ARCHIVE, official_members()[0])
    assert f"{path}: cifar-10-batches-py/data_batch_1 holds" in prepare_error(tmp_path)


def test_cifar10_trains_tests_and_predicts_in_colour(tmp_path, capsys, monkeypatch):
    members = official_members(per_batch=4, test=6)[0]
    write_archive(raw_dir(tmp_path) / ARCHIVE, members)
    assert main(["data", "cifar10", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    run = tmp_path / "run"
    options = ["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--run-dir", str(run), "--max-steps", "2",
               "--batch-size", "4", "--val-size", "4", "--workers", "0", "--no-progress", "--device", "cpu",
               "--histogram-every", "0"]  # fmt: skip
    for key, value in TINY_MODEL_OPTIONS.items():
        options += ["--model-option", f"{key}={value}"]
    assert main(options) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["test", str(run), "--no-progress", "--workers", "0"]) == 0
    report = json.loads((run / "test-standard-best.json").read_text())
    assert report["num_images"] == 6 and report["class_names"] == list(CLASS_NAMES)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert main(["predict", str(run), str(image), "--format", "json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["images"][0]["scores"]) == set(CLASS_NAMES)


def test_cifar10_preset_takes_colour_images():
    model = build_model(preset("cifar10"))
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 256
    assert model(torch.randn(2, 3, 32, 32)).activations.shape == (2, 10)


def test_encoded_batches_are_official_pickles():
    """The library's encoder writes bytes keys and colour planes, as the official pickles are."""
    images = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8)
    batch = pickle.loads(encode_cifar_batch(images, [3, 4]), encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"} and batch[b"labels"] == [3, 4]
    assert batch[b"data"].shape == (2, 3072) and np.array_equal(batch[b"data"][0, :1024], images[0, :, :, 0].ravel())
