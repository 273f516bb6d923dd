"""Opening raw dataset files that may or may not be gzip-compressed.

The source files are distributed gzipped (``*.gz``) but users often have them already
decompressed; both are accepted and recognised by their first bytes, not their name.

Nothing here allocates what a header merely announces: data are read in chunks of at
most :data:`READ_CHUNK_BYTES`, a plain file's announced size is compared with its real
size before its data are read, and :func:`digest_file` decompresses under a cap.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from matcaps.errors import DataFormatError

#: The two bytes every gzip stream starts with (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"

#: Exceptions that a damaged gzip stream raises while being read.
GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)

#: Most bytes read (and allocated) per step, whatever a header announces.
READ_CHUNK_BYTES = 1 << 24

#: Bytes hashed per step by :func:`digest_file`.
DIGEST_CHUNK_BYTES = 1 << 20


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
    parts: list[bytes] = []
    done = 0
    while done < count:  # in chunks: a damaged header must not make us allocate what it announces
        try:
            chunk = handle.read(min(READ_CHUNK_BYTES, count - done))
        except GZIP_ERRORS as error:
            raise DataFormatError(f"{path}: corrupted gzip stream while reading the {what}: {error}") from error
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    if done != count:
        raise DataFormatError(f"{path}: truncated {what}: expected {count} bytes, found only {done}")
    return b"".join(parts)


def check_plain_size(handle: BinaryIO, path: Path, expected_total: int) -> None:
    """For an uncompressed file, compare its size with what its header announces, before reading.

    A gzip stream's decompressed size is unknown until it is read; :func:`read_exactly`
    and :func:`check_at_end` catch it then (and :func:`digest_file` before, in ``prepare``).
    """
    if isinstance(handle, gzip.GzipFile):
        return
    actual = os.fstat(handle.fileno()).st_size
    if actual < expected_total:
        raise DataFormatError(
            f"{path}: truncated: the header announces {expected_total} bytes in total, the file has only {actual}"
        )
    if actual > expected_total:
        raise DataFormatError(
            f"{path}: size mismatch: the header announces {expected_total} bytes in total but the file has {actual}"
        )


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


@dataclass(frozen=True)
class FileDigest:
    """Sizes and MD5 sums of a raw file, as stored and decompressed.

    Attributes:
        path: the file.
        gzipped: whether it is a gzip stream.
        file_bytes, file_md5: size and MD5 (hex) of the bytes on disk.
        content_bytes, content_md5: size and MD5 of the decompressed content (equal to
            the above for an uncompressed file).
    """

    path: Path
    gzipped: bool
    file_bytes: int
    file_md5: str
    content_bytes: int
    content_md5: str


def _md5_of_stream(
    handle: BinaryIO, path: Path, max_bytes: int | None, on_bytes: Callable[[int], None] | None
) -> tuple[int, str]:
    """Size and MD5 of what ``handle`` yields, in chunks; more than ``max_bytes`` is an error."""
    digest = hashlib.md5()
    total = 0
    while True:
        try:
            chunk = handle.read(DIGEST_CHUNK_BYTES)
        except GZIP_ERRORS as error:
            raise DataFormatError(f"{path}: corrupted gzip stream (in decompressed bytes {total:,} to "
                                  f"{total + DIGEST_CHUNK_BYTES:,}): {error}") from error
        if not chunk:
            return total, digest.hexdigest()
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise DataFormatError(
                f"{path}: too large: more than {max_bytes} bytes once decompressed, the size of the official "
                f"file; it is damaged or not this dataset's file"
            )
        digest.update(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))


def digest_file(path: Path | str, max_content_bytes: int, on_bytes: Callable[[int], None] | None = None) -> FileDigest:
    """Size and MD5 of ``path`` and of its decompressed content, decompressing under a cap.

    Args:
        path: a raw file, gzipped or not.
        max_content_bytes: the largest acceptable (decompressed) size; a plain file over it
            is refused before being read, and a gzip stream is decompressed chunk by chunk
            and abandoned as soon as it exceeds it, so a hostile stream ("zip bomb") costs
            neither memory nor much time.
        on_bytes: called with the number of content bytes after each chunk (progress).

    Raises:
        DataFormatError: unreadable file, damaged gzip stream, or content over the cap.
    """
    path = Path(path)
    try:
        gzipped = is_gzip(path)
        size = path.stat().st_size
        if not gzipped and size > max_content_bytes:
            raise DataFormatError(
                f"{path}: too large: {size} bytes, more than the {max_content_bytes} of the official file; "
                f"it is damaged or not this dataset's file"
            )
        with open(path, "rb") as handle:
            file_bytes, file_md5 = _md5_of_stream(handle, path, None, None if gzipped else on_bytes)
    except OSError as error:
        raise DataFormatError(f"{path}: cannot read: {error}") from error
    if not gzipped:
        return FileDigest(path, False, file_bytes, file_md5, file_bytes, file_md5)
    with open_maybe_gzip(path) as handle:
        content_bytes, content_md5 = _md5_of_stream(handle, path, max_content_bytes, on_bytes)
    return FileDigest(path, True, file_bytes, file_md5, content_bytes, content_md5)


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
