"""Reader and writer of the IDX format of MNIST and Fashion-MNIST.

Layout (big-endian): two zero bytes, a type byte (:data:`IDX_TYPE_TO_DTYPE`), a byte
``ndim``, ``ndim`` uint32 dimensions, then the elements in C order.  Images are
``0x00000803`` (uint8, ``(N, 28, 28)``), labels ``0x00000801`` (uint8, ``(N,)``).
Inconsistencies raise :class:`~matcaps.errors.DataFormatError` naming the file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from matcaps.errors import DataFormatError
from matcaps.data.fileio import check_at_end, check_plain_size, open_maybe_gzip, read_exactly, write_maybe_gzip

#: Type byte → element type (big-endian for the multi-byte ones).
IDX_TYPE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Element type (any byte order) → type byte, for the writer.
IDX_DTYPE_TO_TYPE: dict[str, int] = {dtype.newbyteorder("=").str[1:]: code for code, dtype in IDX_TYPE_TO_DTYPE.items()}

#: Magic of MNIST image files (uint8, 3 dimensions).
IDX_IMAGES_MAGIC = 0x00000803

#: Magic of MNIST label files (uint8, 1 dimension).
IDX_LABELS_MAGIC = 0x00000801


@dataclass(frozen=True)
class IdxHeader:
    """The parsed header of an IDX file: magic, dtype, shape and header size in bytes."""

    magic: int
    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def data_bytes(self) -> int:
        """Size of the data that follows the header (exact: Python integers never overflow)."""
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(handle: BinaryIO, path: Path, expected_magic: int | None) -> IdxHeader:
    magic = struct.unpack(">I", read_exactly(handle, 4, path, "IDX header"))[0]
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in IDX_TYPE_TO_DTYPE or ndim == 0:
        raise DataFormatError(f"{path}: not an IDX file: magic 0x{magic:08X}")
    if expected_magic is not None and magic != expected_magic:
        raise DataFormatError(f"{path}: wrong IDX magic 0x{magic:08X}, expected 0x{expected_magic:08X}")
    dims = struct.unpack(f">{ndim}I", read_exactly(handle, 4 * ndim, path, "IDX dimensions"))
    return IdxHeader(magic, IDX_TYPE_TO_DTYPE[type_code], tuple(int(d) for d in dims), 4 + 4 * ndim)


def read_idx_header(path: Path | str, expected_magic: int | None = None) -> IdxHeader:
    """Parse only the header of the IDX file ``path`` (gzipped or not)."""
    path = Path(path)
    with open_maybe_gzip(path) as handle:
        return _read_header(handle, path, expected_magic)


def read_idx(path: Path | str, expected_magic: int | None = None) -> np.ndarray:
    """Read a whole IDX file (gzipped or not).

    Never allocates more than the file really holds: an uncompressed file's size is
    compared with what the header announces first, and data are read in chunks.

    Args:
        path: the file.
        expected_magic: e.g. :data:`IDX_IMAGES_MAGIC`; any other magic is an error.

    Returns:
        An array of the header's shape, native byte order.
    """
    path = Path(path)
    with open_maybe_gzip(path) as handle:
        header = _read_header(handle, path, expected_magic)
        check_plain_size(handle, path, header.header_bytes + header.data_bytes)
        raw = read_exactly(handle, header.data_bytes, path, "IDX data")
        check_at_end(handle, path, header.header_bytes + header.data_bytes)
    return np.frombuffer(raw, dtype=header.dtype).reshape(header.shape).astype(header.dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
    """The bytes of ``array`` in the IDX format."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in IDX_DTYPE_TO_TYPE:
        raise DataFormatError(f"cannot write {array.dtype} as IDX; supported: u1, i1, i2, i4, f4, f8")
    if not 0 < array.ndim < 256:
        raise DataFormatError(f"cannot write a {array.ndim}-dimensional array as IDX")
    code = IDX_DTYPE_TO_TYPE[key]
    header = struct.pack(f">I{array.ndim}I", (code << 8) | array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_TYPE_TO_DTYPE[code]).tobytes()


def write_idx(path: Path | str, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``compress`` (default: name ends in ``.gz``)."""
    return write_maybe_gzip(path, encode_idx(array), compress)
