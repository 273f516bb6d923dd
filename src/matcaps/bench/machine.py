"""Description of the machine a benchmark ran on (stored with every report)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from matcaps.allocator import glibc_version

_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the system has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, OS, Python, PyTorch and (for ``cuda``/``cuda:N``) GPU of this machine."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "glibc": glibc_version(),
        "default_threads": torch.get_num_threads(),
        "device": device,
        "device_name": "cpu",
        "load_average": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    return info
