"""NORB and IDX binary formats: exact round trips, and loud failures on damaged files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from matcaps.data.idx_format import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx, write_idx
from matcaps.data.norb_format import (
    NORB_DTYPE_TO_MAGIC,
    encode_norb,
    read_norb,
    read_norb_header,
    stream_norb_into,
    write_norb,
)
from matcaps.errors import DataFormatError

NORB_DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(7,), (5, 4), (3, 2, 6), (4, 2, 3, 5)]


def random_array(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", NORB_DTYPES, ids=lambda d: np.dtype(d).name)
def test_norb_round_trip(tmp_path: Path, dtype, shape, compress) -> None:
    array = random_array(dtype, shape)
    path = write_norb(tmp_path / ("m.mat.gz" if compress else "m.mat"), array)
    header = read_norb_header(path)
    assert header.shape == shape
    assert header.dtype == np.dtype(dtype).newbyteorder("<")
    assert header.header_bytes == 8 + 4 * max(len(shape), 3)
    back = read_norb(path)
    assert back.shape == shape and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)
    out = np.empty(shape, dtype=dtype)
    stream_norb_into(path, out)
    np.testing.assert_array_equal(out, array)


def test_norb_header_layout_matches_the_documented_bytes() -> None:
    """A smallNORB ``-cat``-like file: magic 0x1E3D4C54, ndim 1, dims [n, 1, 1] (the 3-dims quirk)."""
    data = encode_norb(np.array([0, 4, 2], dtype=np.int32))
    assert data[:20] == struct.pack("<5i", 0x1E3D4C54, 1, 3, 1, 1)
    assert np.frombuffer(data[20:], "<i4").tolist() == [0, 4, 2]
    dat = encode_norb(np.zeros((2, 2, 3, 3), dtype=np.uint8))
    assert dat[:24] == struct.pack("<6i", 0x1E3D4C55, 4, 2, 2, 3, 3) and len(dat) == 24 + 36


def test_norb_magics_are_the_documented_ones() -> None:
    assert {np.dtype(k).name: v for k, v in NORB_DTYPE_TO_MAGIC.items()} == {
        "float32": 0x1E3D4C51, "float64": 0x1E3D4C53, "int32": 0x1E3D4C54, "uint8": 0x1E3D4C55, "int16": 0x1E3D4C56,
    }


def write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_norb_bad_magic_names_file_and_magic(tmp_path: Path, compress: bool) -> None:
    data = bytearray(encode_norb(np.arange(6, dtype=np.int32)))
    data[0:4] = struct.pack("<i", 0x12345678)
    path = write_bytes(tmp_path / "bad-cat.mat", bytes(data), compress)
    with pytest.raises(DataFormatError, match=r"bad-cat\.mat.*0x12345678"):
        read_norb(path)


def test_norb_packed_magic_is_rejected(tmp_path: Path) -> None:
    data = struct.pack("<5i", 0x1E3D4C52, 1, 3, 1, 1) + b"\0" * 12
    path = write_bytes(tmp_path / "packed.mat", data, False)
    with pytest.raises(DataFormatError, match="packed"):
        read_norb(path)


@pytest.mark.parametrize("ndim", [0, -1, 1000])
def test_norb_impossible_ndim(tmp_path: Path, ndim: int) -> None:
    data = struct.pack("<5i", 0x1E3D4C55, ndim, 3, 1, 1) + b"\0" * 3
    path = write_bytes(tmp_path / "x.mat", data, False)
    with pytest.raises(DataFormatError, match=r"x\.mat.*ndim"):
        read_norb(path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("keep", [3, 15, 24 + 100], ids=["in-magic", "in-dims", "in-data"])
def test_norb_truncated_file_reports_expected_and_actual(tmp_path: Path, compress: bool, keep: int) -> None:
    data = encode_norb(np.ones((2, 2, 10, 10), dtype=np.uint8))
    path = write_bytes(tmp_path / "short-dat.mat", data[:keep], compress)
    if keep > 24 and not compress:  # a plain file's size is compared with the header before reading
        expected = r"short-dat\.mat: truncated: the header announces 424 bytes in total, the file has only 124"
    else:
        expected = r"short-dat\.mat.*truncated.*expected \d+ bytes.*found only \d+"
    with pytest.raises(DataFormatError, match=expected):
        read_norb(path)
    if keep > 24:
        out = np.empty((2, 2, 10, 10), np.uint8)
        with pytest.raises(DataFormatError, match=expected if not compress else r"short-dat\.mat.*expected 400 bytes.*found only 100"):
            stream_norb_into(path, out)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_norb_trailing_bytes_are_an_error(tmp_path: Path, compress: bool) -> None:
    data = encode_norb(np.ones((3,), dtype=np.int32)) + b"junk"
    path = write_bytes(tmp_path / "long.mat", data, compress)
    with pytest.raises(DataFormatError, match=r"long\.mat.*32 bytes.*36"):
        read_norb(path)


def test_norb_damaged_gzip_stream(tmp_path: Path) -> None:
    path = write_norb(tmp_path / "d.mat.gz", random_array(np.uint8, (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut the gzip stream itself
    with pytest.raises(DataFormatError, match=r"d\.mat\.gz"):
        read_norb(path)


def test_stream_into_wrong_size_or_dtype(tmp_path: Path) -> None:
    path = write_norb(tmp_path / "s.mat", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataFormatError, match=r"s\.mat.*expected 15 elements"):
        stream_norb_into(path, np.empty(15, np.uint8))
    with pytest.raises(DataFormatError, match=r"s\.mat.*expected int32"):
        stream_norb_into(path, np.empty(16, np.uint8), expected_dtype=np.int32)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", IDX_DTYPES, ids=lambda d: np.dtype(d).name)
def test_idx_round_trip(tmp_path: Path, dtype, compress: bool) -> None:
    array = random_array(dtype, (5, 3, 4), seed=1)
    path = write_idx(tmp_path / ("a.gz" if compress else "a"), array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (5, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_idx_mnist_magics_and_big_endian_header(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images", np.zeros((2, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labels", np.array([3, 7], np.uint8))
    assert images.read_bytes()[:16] == struct.pack(">4I", IDX_IMAGES_MAGIC, 2, 28, 28)
    assert labels.read_bytes()[:8] == struct.pack(">2I", IDX_LABELS_MAGIC, 2)
    assert read_idx(labels, expected_magic=IDX_LABELS_MAGIC).tolist() == [3, 7]
    with pytest.raises(DataFormatError, match=r"labels.*0x00000801.*expected 0x00000803"):
        read_idx(labels, expected_magic=IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_corrupted_and_truncated(tmp_path: Path, compress: bool) -> None:
    good = write_idx(tmp_path / "good", np.ones((4, 5, 5), np.uint8))
    data = good.read_bytes()
    bad_magic = write_bytes(tmp_path / "bad-magic", b"\x12\x34" + data[2:], compress)
    with pytest.raises(DataFormatError, match=r"bad-magic.*not an IDX file.*0x12340803"):
        read_idx(bad_magic)
    short = write_bytes(tmp_path / "short", data[:-7], compress)
    expected = r"announces 116 bytes in total, the file has only 109" if not compress else r"expected 100 bytes.*found only 93"
    with pytest.raises(DataFormatError, match=rf"short: truncated.*{expected}"):
        read_idx(short)
    long = write_bytes(tmp_path / "long", data + b"\0", compress)
    with pytest.raises(DataFormatError, match=r"long.*size mismatch"):
        read_idx(long)


def test_writers_reject_unsupported_dtypes(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError):
        write_norb(tmp_path / "x.mat", np.zeros(3, np.int64))
    with pytest.raises(DataFormatError):
        write_idx(tmp_path / "x", np.zeros(3, np.uint16))
