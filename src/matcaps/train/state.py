"""Where a training run stands (saved in every checkpoint) and what a finished run reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        step: Batches consumed so far (optimizer steps, skipped ones included).
        epoch: Current epoch (0-based; printed and written 1-based).
        batch_in_epoch: Index of the next batch of ``epoch``.
        skipped_steps: Steps whose loss or gradients were not finite.
        best_val_accuracy: Best validation accuracy so far (-1 before any validation).
        best_step: Step at which it was reached.
        validated_step: Step of the latest validation (-1 before any).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    validated_step: int = -1


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished :meth:`~matcaps.train.Trainer.fit`."""

    step: int
    epoch: int
    skipped_steps: int
    best_val_accuracy: float | None
    last_val_accuracy: float | None
    last_train_loss: float | None
    run_dir: Path | None
    batch_in_epoch: int = 0
    #: Why training stopped before its last step: "time" (``--max-minutes``), a signal's name, or None.
    stopped_by: str | None = None
