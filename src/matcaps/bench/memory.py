"""Peak memory of a measured phase: resident-set high-water mark on CPU, allocator peak on CUDA.

On CPU the figure is the growth of the process's resident set: the high-water mark
(``VmHWM`` of ``/proc/self/status``, or ``ru_maxrss`` of ``getrusage`` elsewhere) minus the
resident set when the probe was started.  Where Linux allows it the high-water mark is
reset when the probe starts (writing ``5`` to ``/proc/self/clear_refs``), so that memory
touched while building the model does not count.  On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated when the probe started.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
#: Writing this to ``clear_refs`` resets the peak resident set size (Linux ≥ 4.0).
_RESET_PEAK_RSS = "5"
_KIB = 1024


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * _KIB
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where it cannot be read)."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """High-water mark of the resident set in bytes since start (or since the last reset)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * _KIB  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark; False where the system does not allow it."""
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


class PeakMemoryProbe:
    """Measures the peak memory growth of what runs between :meth:`start` and :meth:`peak_bytes`.

    Args:
        device: The device the phase runs on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self._baseline = 0

    def start(self) -> None:
        """Record the baseline and reset the peak counters."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus allocated at start"
            return
        reset = reset_peak_rss()
        rss = current_rss()
        self._baseline = rss if rss is not None else peak_rss()
        source = "VmHWM" if _status_bytes("VmHWM") is not None else "getrusage ru_maxrss"
        self.method = f"{source} minus VmRSS at start" + (" (peak reset at start)" if reset else " (peak not resettable)")

    def peak_bytes(self) -> int:
        """Peak growth since :meth:`start` in bytes (never negative)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline)
        return max(0, peak_rss() - self._baseline)
