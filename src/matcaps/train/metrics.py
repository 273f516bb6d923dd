"""Where a run's numbers go: TensorBoard event files and a JSON-lines file.

Each call of :meth:`MetricsWriter.scalars` appends one line
``{"step": …, "epoch": …, "phase": "train"|"val", "time": …, <name>: <value>, …}`` to
``metrics.jsonl`` in the run directory and adds ``<phase>/<name>`` scalars to
TensorBoard (``tensorboard --logdir RUN``).  :func:`read_metrics` reads the file back
(``matcaps plot`` draws it).  Only the main process writes; on the others the writer
is a :class:`NullWriter`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from matcaps.errors import CheckpointError

#: Name of the metrics file inside a run directory.
METRICS_FILE = "metrics.jsonl"
#: Sub-directory of a run holding the TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"


class NullWriter:
    """A writer that drops everything (used on every process but rank 0)."""

    def scalars(self, phase: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Record ``values`` of ``phase`` at ``step``."""

    def histogram(self, tag: str, step: int, values: torch.Tensor) -> None:
        """Record the distribution of ``values`` under ``tag``."""

    def flush(self) -> None:
        """Push buffered records to disk."""

    def close(self) -> None:
        """Flush and release the files."""


class MetricsWriter(NullWriter):
    """Writes scalars to ``metrics.jsonl`` and TensorBoard, histograms to TensorBoard.

    Args:
        run_dir: The run directory (created by the caller).
        tensorboard: Also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def scalars(self, phase: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"step": int(step), "epoch": int(epoch), "phase": phase, "time": round(time.time(), 3)}
        for name, value in values.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(f"{phase}/{name}", value, step)
        self._file.write(json.dumps(record) + "\n")

    def histogram(self, tag: str, step: int, values: torch.Tensor) -> None:
        values = values.detach().float().flatten().cpu()
        values = values[torch.isfinite(values)]
        if self._tensorboard is not None and values.numel():
            self._tensorboard.add_histogram(tag, values, step)

    def flush(self) -> None:
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a truncated last line is ignored).

    A resumed run may have logged some steps twice (those between its last checkpoint
    and the crash); the later record of each ``(phase, step)`` wins.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"run directory {run_dir} has no {METRICS_FILE}")
    records: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(record, dict) and "phase" in record and "step" in record:
                records.pop((record["phase"], record["step"]), None)
                records[(record["phase"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["step"], r["phase"]))
