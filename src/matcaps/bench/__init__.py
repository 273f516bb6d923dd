"""Benchmarks of training and inference speed and memory (the application behind ``matcaps bench``).

* :class:`BenchConfig`: every option of a run, validated.
* :func:`run_bench`: verify the implementations agree, then measure each in a fresh
  worker process (:mod:`matcaps.bench.worker`); returns the report dict.
* :func:`measure_implementation`: the measurement itself, in the current process.
* :func:`compare_implementations`: outputs and gradients of the full network per
  implementation, on the same weights and batch.
* :func:`format_report`, :func:`write_json`: the readable table and the JSON file.
* :func:`apply_allocator`: the ``default``/``tuned`` glibc allocator regimes.

Names are imported lazily so that a worker can set up the C allocator before PyTorch is
imported (``import matcaps.allocator`` must not import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "matcaps.bench.config",
    "run_bench": "matcaps.bench.runner",
    "measure_implementation": "matcaps.bench.measure",
    "compare_implementations": "matcaps.bench.verify",
    "ImplementationMismatch": "matcaps.bench.verify",
    "format_report": "matcaps.bench.report",
    "write_json": "matcaps.bench.report",
    "apply_allocator": "matcaps.bench.allocator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'matcaps.bench' has no attribute {name!r}")
