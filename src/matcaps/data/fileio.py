"""Opening raw dataset files that may or may not be gzip-compressed.

The source files are distributed gzipped (``*.gz``) but users often have them already
decompressed; both are accepted and recognised by their first bytes, not their name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import BinaryIO

from matcaps.errors import DataFormatError

#: The two bytes every gzip stream starts with (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"

#: Exceptions that a damaged gzip stream raises while being read.
GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    with open(path, "rb") as handle:
        return handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def open_maybe_gzip(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing on the fly when it is gzipped."""
    path = Path(path)
    try:
        if is_gzip(path):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except OSError as error:
        raise DataFormatError(f"{path}: cannot open: {error}") from error


def read_exactly(handle: BinaryIO, count: int, path: Path, what: str) -> bytes:
    """Read exactly ``count`` bytes or raise :class:`DataFormatError` naming ``path``.

    Args:
        handle: an open binary stream (plain or gzip).
        count: number of bytes wanted.
        path: the file, for the error message.
        what: what is being read ("header", "data"), for the error message.
    """
    try:
        data = handle.read(count)
    except GZIP_ERRORS as error:
        raise DataFormatError(f"{path}: corrupted gzip stream while reading the {what}: {error}") from error
    if len(data) != count:
        raise DataFormatError(
            f"{path}: truncated {what}: expected {count} bytes, found only {len(data)}"
        )
    return data


def check_at_end(handle: BinaryIO, path: Path, expected_total: int) -> None:
    """Raise :class:`DataFormatError` if ``handle`` has bytes after the expected end.

    A file longer than its header announces is as suspicious as a short one: it usually
    means the header was damaged or two files were concatenated.
    """
    try:
        extra = handle.read(1 << 16)
    except GZIP_ERRORS as error:
        raise DataFormatError(f"{path}: corrupted gzip stream at the end of the data: {error}") from error
    if extra:
        total = expected_total + len(extra)
        while True:
            try:
                chunk = handle.read(1 << 20)
            except GZIP_ERRORS:
                break
            if not chunk:
                break
            total += len(chunk)
        raise DataFormatError(
            f"{path}: size mismatch: the header announces {expected_total} bytes in total "
            f"but the (decompressed) file has {total}"
        )


def write_maybe_gzip(path: Path | str, data: bytes, compress: bool | None = None) -> Path:
    """Write ``data`` to ``path``, gzipped when ``compress`` (default: the name ends in ``.gz``)."""
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path
