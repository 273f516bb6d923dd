"""File-system helpers for writes that must survive a crash (checkpoints, dataset caches)."""

from __future__ import annotations

import os
from pathlib import Path


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
