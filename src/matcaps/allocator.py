"""Make the C allocator's regime explicit: glibc ``mallopt`` settings applied at process start.

PyTorch has no caching allocator on CPU: every tensor comes from ``malloc``.  With glibc's
defaults an allocation above the (dynamic, at most 32 MiB) mmap threshold is served by a
fresh ``mmap`` and given back on ``free``, so every large temporary is page-faulted in
again at each step; this costs the naive routing (tens of votes-sized temporaries per
step) several times its arithmetic.  The ``tuned`` regime raises the mmap threshold and
the trim threshold so that large blocks come from the heap and stay there once freed:
they are reused without faults, at the price of a resident set that never shrinks.

The settings must be applied before the large allocations happen, i.e. at the start of
the process that is measured; :func:`apply_allocator` does that and returns a record of
what was (or could not be) applied, which the bench stores in its report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Any

#: ``mallopt`` parameter numbers from glibc's ``<malloc.h>``.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations below this size come from the heap instead of a fresh ``mmap`` (1 GiB:
#: every votes-sized tensor of the presets at the usual batch sizes).
TUNED_MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap is returned to the system only above this (2 GiB − 1,
#: the largest ``int``): in practice never, so freed blocks are reused without page faults.
TUNED_TRIM_THRESHOLD = (1 << 31) - 1

#: The regimes :func:`apply_allocator` knows.
ALLOCATOR_REGIMES: tuple[str, ...] = ("tuned", "default")

TUNED_SETTINGS: dict[str, int] = {
    "M_MMAP_THRESHOLD": TUNED_MMAP_THRESHOLD,
    "M_TRIM_THRESHOLD": TUNED_TRIM_THRESHOLD,
}
_PARAMETERS = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD}


def glibc_version() -> str | None:
    """The running glibc's version (e.g. ``"2.36"``), or None on another C library or OS."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return version().decode()


def apply_allocator(name: str) -> dict[str, Any]:
    """Apply the allocator regime ``name`` (``default`` or ``tuned``) to this process.

    Returns:
        ``{"name", "applied", "settings", "glibc", "note"}``: ``applied`` is False for
        ``default`` and wherever ``tuned`` is not possible (no glibc), with the reason in
        ``note``.
    """
    if name not in ALLOCATOR_REGIMES:
        raise ValueError(f"unknown allocator regime {name!r}; choose one of {', '.join(ALLOCATOR_REGIMES)}")
    version = glibc_version()
    record: dict[str, Any] = {"name": name, "applied": False, "settings": {}, "glibc": version, "note": ""}
    if name == "default":
        record["note"] = "C allocator left at its defaults"
        return record
    if version is None:
        record["note"] = "tuned allocator needs Linux with glibc; left at the defaults"
        return record
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    failed = [key for key, value in TUNED_SETTINGS.items() if libc.mallopt(_PARAMETERS[key], value) != 1]
    record["applied"] = not failed
    record["settings"] = {key: value for key, value in TUNED_SETTINGS.items() if key not in failed}
    record["note"] = f"mallopt refused {', '.join(failed)}" if failed else "glibc mallopt applied at process start"
    return record
