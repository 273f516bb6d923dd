"""Training curves of a run (``matcaps plot RUN_DIR``): loss, accuracy, learning rate and margin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matcaps.errors import CheckpointError
from matcaps.figures import pyplot, save_and_close
from matcaps.train.metrics import read_metrics

#: File name of the figure inside the run directory.
CURVES_FILE = "curves.png"
#: Panels of the figure: (metric, title, whether validation values exist).
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("loss", "spread loss", True),
    ("accuracy", "accuracy", True),
    ("lr", "learning rate", False),
    ("margin", "spread-loss margin", False),
)


def series(records: list[dict], phase: str, metric: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``metric`` in the records of ``phase`` (missing or non-finite values skipped)."""
    points = [(r["step"], r[metric]) for r in records if r["phase"] == phase and r.get(metric) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(
    run_dir: str | Path, output: str | Path | None = None, warn: Callable[[str], None] | None = None
) -> Path:
    """Draw the curves of ``run_dir/metrics.jsonl`` to a PNG (default ``run_dir/curves.png``).

    ``warn`` receives a message naming the lines of ``metrics.jsonl`` that could not be read.
    """
    plt = pyplot()

    run_dir = Path(run_dir)
    records = read_metrics(run_dir, warn=warn)
    if not any(r["phase"] == "train" for r in records):
        raise CheckpointError(f"{run_dir} has no training metrics to plot yet")
    figure, grid = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for axes, (metric, title, has_val) in zip(grid.flat, PANELS):
        steps, values = series(records, "train", metric)
        axes.plot(steps, values, label="train", linewidth=1)
        if has_val:
            val_steps, val_values = series(records, "val", metric)
            if val_steps:
                axes.plot(val_steps, val_values, "o-", label="validation", markersize=3)
            axes.legend()
        axes.set_title(title)
        axes.ticklabel_format(axis="y", useOffset=False)
        axes.grid(alpha=0.3)
    for axes in grid[-1]:
        axes.set_xlabel("step")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    return save_and_close(figure, Path(output) if output is not None else run_dir / CURVES_FILE, dpi=110)
