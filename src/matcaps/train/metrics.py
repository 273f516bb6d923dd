"""Where a run's numbers go: TensorBoard event files and a JSON-lines file.

Each call of :meth:`MetricsWriter.scalars` appends one line
``{"step": …, "epoch": …, "phase": "train"|"val", "time": …, <name>: <value>, …}`` to
``metrics.jsonl`` in the run directory and adds ``<phase>/<name>`` scalars to
TensorBoard (``tensorboard --logdir RUN``); ``epoch`` counts from 1 (the epoch in which
``step`` was taken), as in every message.  :func:`read_metrics` reads the file back
(``matcaps plot`` draws it).  Only the main process writes; on the others the writer
is a :class:`NullWriter`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
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


def _end_cut_line(path: Path) -> None:
    """End a last line cut by a crash, so that a resumed run's first record starts a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) != b"\n":
            handle.write(b"\n")


class MetricsWriter(NullWriter):
    """Writes scalars to ``metrics.jsonl`` and TensorBoard, histograms to TensorBoard.

    Args:
        run_dir: The run directory (created by the caller).
        tensorboard: Also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _end_cut_line(self.run_dir / METRICS_FILE)
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


#: Line numbers listed in full in the warning about unreadable lines (then "and N more").
LISTED_BAD_LINES = 10


def read_metrics(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``; unreadable lines are skipped and reported to ``warn``.

    A line cut by a crash, or anything that is not a JSON record with ``phase`` and
    ``step``, is skipped; ``warn`` (if given) receives one message naming the file and
    the numbers of the skipped lines.  A resumed run may have logged some steps twice
    (those between its last checkpoint and the crash); the later record of each
    ``(phase, step)`` wins.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"run directory {run_dir} has no {METRICS_FILE}")
    records: dict[tuple[str, int], dict[str, Any]] = {}
    bad_lines: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None  # e.g. a line cut by a crash
            if not (isinstance(record, dict) and "phase" in record and isinstance(record.get("step"), int)):
                bad_lines.append(number)
                continue
            records.pop((record["phase"], record["step"]), None)
            records[(record["phase"], record["step"])] = record
    if bad_lines and warn is not None:
        listed = ", ".join(map(str, bad_lines[:LISTED_BAD_LINES]))
        more = f" and {len(bad_lines) - LISTED_BAD_LINES} more" if len(bad_lines) > LISTED_BAD_LINES else ""
        warn(f"{path}: skipped unreadable line{'s' if len(bad_lines) > 1 else ''} {listed}{more}")
    return sorted(records.values(), key=lambda r: (r["step"], r["phase"]))
