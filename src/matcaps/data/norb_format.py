"""Reader and writer of NYU's binary matrix format (the ``*.mat`` files of smallNORB).

Layout (all integers little-endian int32, from the NORB dataset documentation):

* ``magic``: the element type, one of :data:`NORB_MAGIC_TO_DTYPE` (``0x1E3D4C52``,
  "packed matrix", is recognised but not supported);
* ``ndim``: the number of dimensions;
* ``max(ndim, 3)`` dimensions: **at least three are always stored**, the unused ones
  (set to 1) padding the header of 1- and 2-dimensional matrices to 20 bytes;
* the elements in C order.

smallNORB has ``-dat`` (uint8, ``(24300, 2, 96, 96)``, 24-byte header), ``-cat``
(int32, ``(24300,)``, 20-byte header) and ``-info`` (int32, ``(24300, 4)``, 20-byte
header).  Every inconsistency (unknown magic, impossible ``ndim``, short or long file,
damaged gzip stream) raises :class:`~matcaps.errors.DataFormatError` naming the file and
what was expected; a wrong array is never returned silently.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from matcaps.errors import DataFormatError
from matcaps.data.fileio import (
    GZIP_ERRORS,
    check_at_end,
    check_plain_size,
    open_maybe_gzip,
    read_exactly,
    write_maybe_gzip,
)

#: Magic number → element type.
NORB_MAGIC_TO_DTYPE: dict[int, np.dtype] = {
    0x1E3D4C51: np.dtype("<f4"),  # single precision
    0x1E3D4C53: np.dtype("<f8"),  # double precision
    0x1E3D4C54: np.dtype("<i4"),  # integer
    0x1E3D4C55: np.dtype("u1"),  # byte
    0x1E3D4C56: np.dtype("<i2"),  # short
}

#: "Packed matrix": defined by the format, never used by NORB, not supported here.
NORB_PACKED_MAGIC = 0x1E3D4C52

#: Element type → magic number, for the writer.
NORB_DTYPE_TO_MAGIC: dict[np.dtype, int] = {dtype: magic for magic, dtype in NORB_MAGIC_TO_DTYPE.items()}

#: The header always stores at least this many dimensions.
NORB_MIN_STORED_DIMS = 3

#: Largest ``ndim`` accepted; a bigger value means a corrupted header.
NORB_MAX_NDIM = 32

#: Bytes read/written per step when streaming the data.
CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class NorbHeader:
    """The parsed header of a NORB matrix file.

    Attributes:
        dtype: element type (little-endian numpy dtype).
        shape: the ``ndim`` dimensions (padding dimensions dropped).
        header_bytes: size of the header: ``8 + 4·max(ndim, 3)``.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def count(self) -> int:
        """Number of elements (exact: Python integers never overflow)."""
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        """Size of the data that follows the header."""
        return self.count * self.dtype.itemsize


def _read_header(handle: BinaryIO, path: Path) -> NorbHeader:
    magic, ndim = struct.unpack("<ii", read_exactly(handle, 8, path, "NORB header"))
    magic &= 0xFFFFFFFF
    if magic == NORB_PACKED_MAGIC:
        raise DataFormatError(f"{path}: packed NORB matrices (magic 0x{magic:08X}) are not supported")
    if magic not in NORB_MAGIC_TO_DTYPE:
        known = ", ".join(f"0x{m:08X}" for m in NORB_MAGIC_TO_DTYPE)
        raise DataFormatError(f"{path}: not a NORB matrix file: magic 0x{magic:08X}, expected one of {known}")
    if not 0 < ndim <= NORB_MAX_NDIM:
        raise DataFormatError(f"{path}: corrupted NORB header: ndim {ndim} is not in 1..{NORB_MAX_NDIM}")
    stored = max(ndim, NORB_MIN_STORED_DIMS)
    dims = struct.unpack(f"<{stored}i", read_exactly(handle, 4 * stored, path, "NORB header dimensions"))
    if any(d < 0 for d in dims):
        raise DataFormatError(f"{path}: corrupted NORB header: negative dimension in {list(dims)}")
    return NorbHeader(NORB_MAGIC_TO_DTYPE[magic], tuple(int(d) for d in dims[:ndim]), 8 + 4 * stored)


def read_norb_header(path: Path | str) -> NorbHeader:
    """Parse only the header of the NORB matrix file ``path`` (gzipped or not)."""
    path = Path(path)
    with open_maybe_gzip(path) as handle:
        return _read_header(handle, path)


def read_norb(path: Path | str) -> np.ndarray:
    """Read a whole NORB matrix file (gzipped or not) into memory.

    Returns:
        An array of the header's shape and dtype (native byte order).

    Raises:
        DataFormatError: bad magic/ndim, truncated or over-long data, damaged gzip.
    """
    path = Path(path)
    with open_maybe_gzip(path) as handle:
        header = _read_header(handle, path)
        check_plain_size(handle, path, header.header_bytes + header.data_bytes)
        raw = read_exactly(handle, header.data_bytes, path, "NORB data")
        check_at_end(handle, path, header.header_bytes + header.data_bytes)
    return np.frombuffer(raw, dtype=header.dtype).reshape(header.shape).astype(header.dtype.newbyteorder("="))


def stream_norb_data(
    path: Path | str,
    write: Callable[[bytes], object],
    expected_dtype: np.dtype | None = None,
    expected_count: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> NorbHeader:
    """Pass the data of a NORB matrix file to ``write`` chunk by chunk (raw little-endian bytes).

    Used for the 450 MB image files so that neither the compressed nor the decompressed
    file is ever held in memory at once.

    Args:
        path: the NORB file.
        write: receives consecutive chunks of at most :data:`CHUNK_BYTES` bytes.
        expected_dtype: if given, the file's dtype must be this one.
        expected_count: if given, the file must hold exactly this many elements.
        on_bytes: called with the number of bytes copied after each chunk (progress).

    Returns:
        The parsed header.
    """
    path = Path(path)
    with open_maybe_gzip(path) as handle:
        header = _read_header(handle, path)
        if expected_dtype is not None and header.dtype != np.dtype(expected_dtype).newbyteorder("<"):
            raise DataFormatError(f"{path}: expected {np.dtype(expected_dtype)} elements, the header says {header.dtype}")
        if expected_count is not None and header.count != expected_count:
            raise DataFormatError(
                f"{path}: expected {expected_count} elements, the header announces {header.count} "
                f"(shape {list(header.shape)})"
            )
        check_plain_size(handle, path, header.header_bytes + header.data_bytes)
        done = 0
        while done < header.data_bytes:
            step = min(CHUNK_BYTES, header.data_bytes - done)
            try:
                chunk = handle.read(step)
            except GZIP_ERRORS as error:
                raise DataFormatError(f"{path}: corrupted gzip stream in the NORB data: {error}") from error
            if len(chunk) != step:
                raise DataFormatError(
                    f"{path}: truncated NORB data: expected {header.data_bytes} bytes after the "
                    f"{header.header_bytes}-byte header, found only {done + len(chunk)}"
                )
            write(chunk)
            done += step
            if on_bytes is not None:
                on_bytes(step)
        check_at_end(handle, path, header.header_bytes + header.data_bytes)
    return header


def stream_norb_into(
    path: Path | str,
    out: np.ndarray,
    expected_dtype: np.dtype | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> NorbHeader:
    """Copy the data of a NORB matrix file into the pre-allocated C-contiguous ``out``.

    ``out`` must have exactly as many elements as the file, of the file's dtype.
    """
    path = Path(path)
    header = read_norb_header(path)
    if out.size != header.count or out.dtype.itemsize != header.dtype.itemsize:
        raise DataFormatError(
            f"{path}: expected {out.size} elements of {out.dtype}, the header announces "
            f"{header.count} of {header.dtype} (shape {list(header.shape)})"
        )
    flat = out.reshape(-1).view(np.uint8)
    position = 0

    def write(chunk: bytes) -> None:
        nonlocal position
        flat[position : position + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        position += len(chunk)

    return stream_norb_data(path, write, expected_dtype=expected_dtype, expected_count=out.size, on_bytes=on_bytes)


def encode_norb(array: np.ndarray) -> bytes:
    """The bytes of ``array`` in the NORB matrix format (header + data)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in NORB_DTYPE_TO_MAGIC:
        supported = ", ".join(str(d) for d in NORB_DTYPE_TO_MAGIC)
        raise DataFormatError(f"cannot write {array.dtype} as a NORB matrix; supported: {supported}")
    if array.ndim == 0:
        raise DataFormatError("cannot write a 0-dimensional array as a NORB matrix")
    dims = list(array.shape) + [1] * max(0, NORB_MIN_STORED_DIMS - array.ndim)
    header = struct.pack(f"<ii{len(dims)}i", NORB_DTYPE_TO_MAGIC[dtype], array.ndim, *dims)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_norb(path: Path | str, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as a NORB matrix file.

    Args:
        path: destination; gzipped when ``compress`` is True, or when it is None and the
            name ends in ``.gz``.
        array: any array of a supported dtype (float32, float64, int32, uint8, int16).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return write_maybe_gzip(path, encode_norb(array), compress)
