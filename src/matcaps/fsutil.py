"""File-system helpers for writes that must survive a crash (checkpoints, dataset caches, figures)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def fsync_directory(path: Path | str) -> None:
    """Flush a directory's entries to disk, so that a rename into it survives a power loss.

    A no-op where directories cannot be opened (Windows).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover - file systems that do not support it
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` (UTF-8); see :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` so that a crash leaves the old or the new file.

    The data go to a temporary file in the same directory, are flushed to disk and renamed
    over ``path``; the new file gets the mode an ordinary new file would.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def save_png_atomic(figure: Any, path: Path | str, dpi: int) -> Path:
    """Write the matplotlib ``figure`` as a PNG at ``path`` (its folder created if absent), atomically.

    The figure is drawn into memory first, so a failure while drawing leaves no file behind.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path
