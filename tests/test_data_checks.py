"""Damaged and hostile raw files: headers checked before allocation, impossible shapes, checksums."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import matcaps.data.checksums as checksums
from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.cli import main
from matcaps.data import DATASET_NAMES, is_valid_cache, prepare
from matcaps.data.checksums import ChecksumError, OfficialSums
from matcaps.data.fileio import digest_file
from matcaps.data.idx_format import IdxHeader, read_idx
from matcaps.data.norb_format import read_norb, write_norb
from matcaps.data.sources import SMALLNORB_TEST_STEM, SMALLNORB_TRAIN_STEM, source_files
from matcaps.errors import DataFormatError

HUGE = 2**31 - 1
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def content(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def rewrite(path: Path, data: bytes) -> None:
    """Replace the content of ``path``, gzipped again if it was."""
    path.write_bytes(gzip.compress(data) if path.read_bytes()[:2] == b"\x1f\x8b" else data)


def patch_bytes(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(content(path))
    data[offset : offset + len(new)] = new
    rewrite(path, bytes(data))


def prepare_fixture(name: str, root: Path, **kwargs) -> Path:
    return prepare(name, root, download=False, progress=False, **kwargs)


# ----------------------------------------------------------------------------- huge announcements


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("offset", [4, 8], ids=["count", "rows"])
def test_idx_header_announcing_a_huge_size_is_one_line_not_a_memory_error(tmp_path, compress, offset) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20, compress=compress)
    images = raw / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    patch_bytes(images, offset, struct.pack(">I", HUGE))
    with pytest.raises(DataFormatError, match=rf"{images.name}: expected images: uint8 of shape \(N, 28, 28\) "
                                              rf"with 1 <= N <= 10000, the header announces .*{HUGE}") as error:
        prepare_fixture("mnist", tmp_path, verify=False)
    assert "\n" not in str(error.value)
    assert not is_valid_cache("mnist", tmp_path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_norb_header_announcing_a_huge_size_is_one_line(tmp_path, compress) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1, compress=compress)
    dat = raw / f"{SMALLNORB_TRAIN_STEM}-dat.mat{'.gz' if compress else ''}"
    patch_bytes(dat, 8, struct.pack("<i", HUGE))  # the pair count
    with pytest.raises(DataFormatError, match=rf"{dat.name}: expected stereo image pairs.*24300.*\[{HUGE}, 2, 96, 96\]"):
        prepare_fixture("smallnorb", tmp_path, verify=False)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_readers_never_allocate_what_a_header_announces(tmp_path, compress) -> None:
    """Outside ``prepare`` too: a huge announced size is a truncation error, never a MemoryError."""
    data = bytearray(gzip.decompress((write_tiny_mnist(tmp_path, n_train=3, n_test=2) / "t10k-images-idx3-ubyte.gz").read_bytes()))
    data[4:8] = struct.pack(">I", HUGE)
    path = tmp_path / "huge-idx"
    path.write_bytes(gzip.compress(bytes(data)) if compress else bytes(data))
    with pytest.raises(DataFormatError, match=r"huge-idx: truncated"):
        read_idx(path)
    norb = bytearray((write_norb(tmp_path / "n.mat", np.zeros((3, 2, 4, 4), np.uint8))).read_bytes())
    norb[8:12] = struct.pack("<i", HUGE)
    path = tmp_path / "huge-norb.mat"
    path.write_bytes(gzip.compress(bytes(norb)) if compress else bytes(norb))
    with pytest.raises(DataFormatError, match=r"huge-norb\.mat: truncated"):
        read_norb(path)


def test_announced_sizes_do_not_overflow() -> None:
    """Three uint32 dimensions overflow int64: the size must stay exact (it did wrap with np.prod)."""
    header = IdxHeader(0x0803, np.dtype("u1"), (2**32 - 1,) * 3, 16)
    assert header.data_bytes == (2**32 - 1) ** 3


def test_gzip_stream_is_decompressed_under_a_cap(tmp_path) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20)
    bomb = raw / "t10k-labels-idx1-ubyte.gz"
    bomb.write_bytes(gzip.compress(struct.pack(">II", 0x0801, 20) + bytes(50_000_000)))  # 50 MB of zeros, 49 kB gzipped
    cap = source_files("mnist")[3].layout.max_file_bytes
    assert cap == 10008  # the official t10k labels
    seen = []
    with pytest.raises(DataFormatError, match=rf"{bomb.name}: too large: more than {cap} bytes once decompressed"):
        digest_file(bomb, cap, on_bytes=seen.append)
    assert sum(seen) <= cap  # stopped at the first chunk over the cap
    with pytest.raises(DataFormatError, match="too large"):
        prepare_fixture("mnist", tmp_path, verify=False)


def test_digest_is_the_md5_of_the_file_and_of_its_content(tmp_path) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20)
    path = raw / "train-images-idx3-ubyte.gz"
    digest = digest_file(path, 10**8)
    data = path.read_bytes()
    assert digest.gzipped and (digest.file_bytes, digest.file_md5) == (len(data), hashlib.md5(data).hexdigest())
    plain = gzip.decompress(data)
    assert (digest.content_bytes, digest.content_md5) == (len(plain), hashlib.md5(plain).hexdigest())
    with pytest.raises(DataFormatError, match="too large: 23536 bytes"):
        (tmp_path / "plain").write_bytes(plain)
        digest_file(tmp_path / "plain", len(plain) - 1)


# ----------------------------------------------------------------------------- impossible shapes


def test_mnist_images_of_14x56_are_refused(tmp_path) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20, compress=False)
    images = raw / "t10k-images-idx3-ubyte"
    patch_bytes(images, 8, struct.pack(">II", 14, 56))  # same byte count as 28×28
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte: expected images: uint8 of shape \(N, 28, 28\)"
                                              r".*announces uint8 of shape \[20, 14, 56\]"):
        prepare_fixture("mnist", tmp_path, verify=False)


def test_more_images_than_the_official_file_are_refused(tmp_path) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=10, n_test=10001)
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.gz: too large: more than 7840016 bytes"):
        prepare_fixture("mnist", tmp_path, verify=False)  # caught by the size cap first
    write_tiny_mnist(tmp_path, n_train=10, n_test=20)
    patch_bytes(raw / "t10k-images-idx3-ubyte.gz", 4, struct.pack(">I", 10001))  # only the header says so
    with pytest.raises(DataFormatError, match=r"t10k-images.*1 <= N <= 10000.*\[10001, 28, 28\]"):
        prepare_fixture("mnist", tmp_path, verify=False)


def test_smallnorb_images_must_be_96x96(tmp_path) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1, image_size=48)
    with pytest.raises(DataFormatError, match=rf"{SMALLNORB_TRAIN_STEM}-dat.mat.gz: expected stereo image pairs: "
                                              r"uint8 of shape \(N, 2, 96, 96\).*\[40, 2, 48, 48\]"):
        prepare_fixture("smallnorb", tmp_path, verify=False)


def test_labels_as_wide_integers_are_refused(tmp_path) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20, compress=False)
    labels = raw / "train-labels-idx1-ubyte"
    values = np.frombuffer(content(labels)[8:], np.uint8)
    labels.write_bytes(struct.pack(">II", 0x0C01, 30) + values.astype(">i4").tobytes())  # int32 labels
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: wrong IDX magic 0x00000C01, expected 0x00000801"):
        prepare_fixture("mnist", tmp_path, verify=False)


@pytest.mark.parametrize("split, stem, stray", [("train", SMALLNORB_TRAIN_STEM, 0), ("test", SMALLNORB_TEST_STEM, 9)])
def test_smallnorb_instances_must_belong_to_the_split(tmp_path, split, stem, stray) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1)
    info = raw / f"{stem}-info.mat.gz"
    table = read_norb(info)
    table[3, 0] = stray
    write_norb(info, table)
    with pytest.raises(DataFormatError, match=rf"{info.name}: instances \[{stray}\] do not belong to the {split} split"):
        prepare_fixture("smallnorb", tmp_path, verify=False)


def test_swapped_smallnorb_info_files_are_refused_even_unverified(tmp_path) -> None:
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1)
    train, test = raw / f"{SMALLNORB_TRAIN_STEM}-info.mat.gz", raw / f"{SMALLNORB_TEST_STEM}-info.mat.gz"
    train_bytes = train.read_bytes()
    train.write_bytes(test.read_bytes())
    test.write_bytes(train_bytes)
    with pytest.raises(DataFormatError, match=r"instances \[0\] do not belong to the train split.*swapped"):
        prepare_fixture("smallnorb", tmp_path, verify=False)


# ----------------------------------------------------------------------------- checksums


def fixture_sums(raw: Path, name: str) -> dict[str, OfficialSums]:
    """The fixture's own sums, as if they were the published ones."""
    table = {}
    for source in source_files(name):
        data = (raw / source.filename).read_bytes()
        table[source.filename] = OfficialSums(hashlib.md5(data).hexdigest(), hashlib.md5(gzip.decompress(data)).hexdigest())
    return table


def test_unofficial_files_are_refused_by_default_naming_file_and_sums(tmp_path, capsys) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20)
    path = raw / "t10k-images-idx3-ubyte.gz"
    found = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
    official = checksums.OFFICIAL_MD5["mnist"][path.name]
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch for {path.name} of mnist: expected MD5 "
                                            rf"{official.content_md5} decompressed \(official \.gz: {official.gz_md5}\), "
                                            rf"found MD5 {found} once decompressed .*--no-verify") as error:
        prepare_fixture("mnist", tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "mnist" / "prepared").exists()

    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0] and path.name in lines[0] and "--no-verify" in lines[0]


def test_no_verify_is_recorded_and_a_verifying_prepare_rebuilds(tmp_path, monkeypatch, capsys) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20)
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    assert "NOT verified" in capsys.readouterr().out
    manifest_path = tmp_path / "mnist" / "prepared" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["verified"] is False
    images = raw / "train-images-idx3-ubyte.gz"
    assert manifest["sources"]["train_images"]["md5"] == hashlib.md5(images.read_bytes()).hexdigest()
    assert manifest["sources"]["train_images"]["content_md5"] == hashlib.md5(gzip.decompress(images.read_bytes())).hexdigest()
    assert is_valid_cache("mnist", tmp_path) and not is_valid_cache("mnist", tmp_path, verified=True)

    # an unverified cache does not satisfy a verifying prepare, which fails and keeps it
    with pytest.raises(ChecksumError):
        prepare_fixture("mnist", tmp_path)
    assert is_valid_cache("mnist", tmp_path)

    # once the files are "official", the verifying prepare rebuilds and records it
    monkeypatch.setitem(checksums.OFFICIAL_MD5, "mnist", fixture_sums(raw, "mnist"))
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mnist: prepared" in out and "MD5 sums verified" in out
    assert json.loads(manifest_path.read_text())["verified"] is True
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--quiet"]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_decompressed_and_recompressed_copies_of_official_files_pass(tmp_path, monkeypatch) -> None:
    raw = write_tiny_mnist(tmp_path, n_train=30, n_test=20)
    monkeypatch.setitem(checksums.OFFICIAL_MD5, "mnist", fixture_sums(raw, "mnist"))
    plain = raw / "train-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((raw / "train-labels-idx1-ubyte.gz").read_bytes()))
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    images = raw / "train-images-idx3-ubyte.gz"
    recompressed = gzip.compress(gzip.decompress(images.read_bytes()), compresslevel=9, mtime=12345)
    assert recompressed != images.read_bytes()
    images.write_bytes(recompressed)
    cache = prepare_fixture("mnist", tmp_path)
    assert json.loads((cache / "manifest.json").read_text())["verified"] is True


def test_swapped_smallnorb_image_files_and_altered_labels_are_refused(tmp_path, monkeypatch) -> None:
    """Same shapes and valid codes, so only the checksums can tell."""
    raw = write_tiny_smallnorb(tmp_path, instances_per_split=1)
    monkeypatch.setitem(checksums.OFFICIAL_MD5, "smallnorb", fixture_sums(raw, "smallnorb"))
    train, test = raw / f"{SMALLNORB_TRAIN_STEM}-dat.mat.gz", raw / f"{SMALLNORB_TEST_STEM}-dat.mat.gz"
    train_bytes = train.read_bytes()
    train.write_bytes(test.read_bytes())
    test.write_bytes(train_bytes)
    prepare_fixture("smallnorb", tmp_path, verify=False)  # without checksums nothing can tell
    with pytest.raises(ChecksumError, match=rf"{SMALLNORB_TEST_STEM}-dat.mat.gz: checksum mismatch"):
        prepare_fixture("smallnorb", tmp_path, force=True)

    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    cat = raw / f"{SMALLNORB_TEST_STEM}-cat.mat.gz"
    labels = read_norb(cat)
    labels[0] = (labels[0] + 1) % 5  # still a valid category
    write_norb(cat, labels)
    with pytest.raises(ChecksumError, match=rf"{cat.name}: checksum mismatch"):
        prepare_fixture("smallnorb", tmp_path, force=True)
    assert json.loads((tmp_path / "smallnorb" / "prepared" / "manifest.json").read_text())["verified"] is False


def test_every_official_file_has_sums_of_the_right_form() -> None:
    assert set(checksums.OFFICIAL_MD5) == set(DATASET_NAMES)
    for name in DATASET_NAMES:
        files = {source.filename for source in source_files(name)}
        assert set(checksums.OFFICIAL_MD5[name]) == files
        for sums in checksums.OFFICIAL_MD5[name].values():
            published = [sums.gz_md5] + ([sums.content_md5] if sums.content_md5 is not None else [])
            assert all(len(s) == 32 and int(s, 16) >= 0 for s in published)
            assert sums.content_md5 is not None or name == "cifar10"  # CIFAR-10: no sum of the decompressed tar
