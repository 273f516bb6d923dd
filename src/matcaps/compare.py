"""Runs side by side (``matcaps compare RUN_DIR…``): how fast and how far each one learned.

A summary of one run is read from its directory only — ``metrics.jsonl`` (written while it trains),
``config.toml`` and the ``test-*.json`` reports of ``matcaps test`` — so finished, stopped and
published runs (``docs/runs/…``) compare alike.  It holds the best validation accuracy and its step
(the step of ``best.pt``: the first validation with the highest accuracy), the first step (and the
training minutes) at which validation reached each threshold, the training time, and every test
report's accuracy.  :func:`plot_comparison` draws the runs' validation error, training loss and
gradient norm over the steps in one figure.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matcaps.errors import CheckpointError, ConfigError
from matcaps.figures import pyplot, save_and_close
from matcaps.plot import series
from matcaps.tomlread import tomllib
from matcaps.train.metrics import read_metrics

#: Validation accuracies reported by default: the issue's "steps to 98 % validation accuracy on MNIST".
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.98,)
#: A gap between two consecutive records longer than this many seconds *and* than
#: :data:`PAUSE_FACTOR` times the median gap is a pause (the run was stopped and resumed later, or
#: paused with SIGSTOP), not training, and is left out of the training time.
MIN_PAUSE_S = 120.0
#: See :data:`MIN_PAUSE_S`: how many typical gaps a pause is at least (a validation pass or a slow
#: logging window stays training time).
PAUSE_FACTOR = 5.0
#: The test report that the "test" column shows: one view of the whole standard test set, scored with
#: the checkpoint chosen on validation (``matcaps test RUN`` writes it).
MAIN_TEST_REPORT = "standard-best"


@dataclass
class RunSummary:
    """What one run reached and how fast.

    Attributes:
        run: The run directory as given.
        dataset, model, iterations, seed: From ``config.toml`` (``None`` where it is missing or
            unreadable; ``iterations`` is ``None`` for the CNN baseline, which does not route).
        last_step: The last step recorded (of training or validation).
        training_minutes: Minutes of training, pauses left out (see :func:`training_seconds`).
        best_val_accuracy, best_val_step: The highest validation accuracy and the first step that
            reached it (``None`` without validation).
        steps_to: For each threshold, the first validated step whose accuracy reached it (``None``: never).
        minutes_to: Training minutes until that step.
        tests: Accuracy of every ``test-*.json`` in the run directory, by the file's name without
            ``test-`` and ``.json`` (``standard-best``, ``standard-best-13crops``, …).
    """

    run: str
    dataset: str | None
    model: str | None
    iterations: int | None
    seed: int | None
    last_step: int
    training_minutes: float
    best_val_accuracy: float | None
    best_val_step: int | None
    steps_to: dict[float, int | None] = field(default_factory=dict)
    minutes_to: dict[float, float | None] = field(default_factory=dict)
    tests: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (threshold keys as strings)."""
        values = asdict(self)
        values["steps_to"] = {f"{t:g}": s for t, s in self.steps_to.items()}
        values["minutes_to"] = {f"{t:g}": m for t, m in self.minutes_to.items()}
        return values


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """``thresholds`` as a tuple, each a fraction in (0, 1]; :class:`ConfigError` otherwise."""
    for threshold in thresholds:
        if not (0.0 < threshold <= 1.0):
            raise ConfigError(f"--threshold takes a validation accuracy as a fraction in (0, 1] "
                              f"(0.98 for 98 %), got {threshold:g}")  # fmt: skip
    return tuple(thresholds)


def training_seconds(times: Sequence[float]) -> list[float]:
    """Cumulative training seconds at each of ``times`` (record times in seconds, in order of writing).

    The sum of the gaps between consecutive records, except pauses: gaps longer than both
    :data:`MIN_PAUSE_S` and :data:`PAUSE_FACTOR` × the median gap.  The time before the first record
    (its logging window) is not known and not counted.
    """
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    limit = max(MIN_PAUSE_S, PAUSE_FACTOR * statistics.median(gaps)) if gaps else MIN_PAUSE_S
    total, cumulative = 0.0, [0.0] * len(times)
    for index, gap in enumerate(gaps, start=1):
        total += gap if 0.0 <= gap <= limit else 0.0
        cumulative[index] = total
    return cumulative


def _number(value: Any, default: float | None = 0.0) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else ``default``: what a hand-edited or
    damaged ``metrics.jsonl`` may hold instead of a time or an accuracy."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _typed(value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` (and not a bool), else ``None``."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def read_run_config(run_dir: Path, warn: Callable[[str], None] | None) -> dict[str, Any]:
    """The options saved in ``run_dir/config.toml``: empty if there is none, and with a warning if it cannot be read."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        if warn is not None:
            warn(f"{path}: cannot read the run's configuration ({type(error).__name__}); dataset, "
                 f"iterations and seed are left blank")  # fmt: skip
        return {}


def read_test_reports(run_dir: Path, warn: Callable[[str], None] | None) -> dict[str, float]:
    """Accuracy of each ``test-*.json`` in ``run_dir``; unreadable reports are skipped with a warning."""
    tests = {}
    for path in sorted(run_dir.glob("test-*.json")):
        try:
            accuracy = _number(json.loads(path.read_text(encoding="utf-8"))["accuracy"], None)
            if accuracy is None:
                raise ValueError("no finite accuracy")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            if warn is not None:
                warn(f"{path}: not a readable test report ({type(error).__name__}), skipped")
            continue
        tests[path.stem.removeprefix("test-")] = accuracy
    return tests


def summarise_run(
    run_dir: str | Path, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, warn: Callable[[str], None] | None = None
) -> RunSummary:
    """Summarise the run in ``run_dir`` (see :class:`RunSummary`).

    Raises:
        CheckpointError: ``run_dir`` holds no ``metrics.jsonl``.
        ConfigError: A threshold outside (0, 1].
    """
    return summarise_records(run_dir, read_metrics(run_dir, warn=warn), thresholds, warn)


def summarise_records(
    run_dir: str | Path,
    records: list[dict[str, Any]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """:func:`summarise_run` of metrics records already read from ``run_dir`` (by :func:`read_metrics`)."""
    thresholds = check_thresholds(thresholds)
    run_dir = Path(run_dir)
    by_time = sorted(range(len(records)), key=lambda index: _number(records[index].get("time")))
    elapsed = [0.0] * len(records)  # training seconds up to each record, in the order of ``records``
    for index, seconds in zip(by_time, training_seconds([_number(records[i].get("time")) for i in by_time])):
        elapsed[index] = seconds
    validations = [(r["step"], r["accuracy"], s) for r, s in zip(records, elapsed)
                   if r["phase"] == "val" and _number(r.get("accuracy"), None) is not None]  # fmt: skip
    best = max(validations, key=lambda v: v[1], default=None)  # max keeps the first of equals
    steps_to: dict[float, int | None] = {}
    minutes_to: dict[float, float | None] = {}
    for threshold in thresholds:
        reached = next((v for v in validations if v[1] >= threshold), None)
        steps_to[threshold] = reached[0] if reached else None
        minutes_to[threshold] = reached[2] / 60.0 if reached else None
    config = read_run_config(run_dir, warn)
    model = _typed(config.get("model"), str)
    return RunSummary(
        run=str(run_dir),
        dataset=_typed(config.get("dataset"), str),
        model=model,
        iterations=None if model == "cnn-baseline" else _typed(config.get("iters"), int),
        seed=_typed(config.get("seed"), int),
        last_step=max((r["step"] for r in records), default=0),
        training_minutes=max(elapsed, default=0.0) / 60.0,
        best_val_accuracy=best[1] if best else None,
        best_val_step=best[0] if best else None,
        steps_to=steps_to,
        minutes_to=minutes_to,
        tests=read_test_reports(run_dir, warn),
    )


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table_rows(summaries: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (percentages with two decimals, ``—`` for nothing)."""
    thresholds = list(summaries[0].steps_to) if summaries else []
    header = ["run", "data", "iters", "seed", "steps", "minutes", "best val % (step)",
              *(f"steps to {100 * t:g} % (min)" for t in thresholds), "test %", "other test views %"]  # fmt: skip
    rows = []
    for s in summaries:
        best = "—" if s.best_val_accuracy is None else f"{_percent(s.best_val_accuracy)} ({s.best_val_step:,})"
        reached = ["—" if s.steps_to[t] is None else f"{s.steps_to[t]:,} ({s.minutes_to[t]:.1f})" for t in thresholds]
        others = ", ".join(f"{name} {_percent(value)}" for name, value in s.tests.items() if name != MAIN_TEST_REPORT)
        rows.append([s.run, s.dataset or "—", "—" if s.iterations is None else str(s.iterations),
                     "—" if s.seed is None else str(s.seed), f"{s.last_step:,}", f"{s.training_minutes:.1f}", best,
                     *reached, _percent(s.tests.get(MAIN_TEST_REPORT)), others or "—"])  # fmt: skip
    return header, rows


def format_table(summaries: Sequence[RunSummary], style: str = "text") -> str:
    """The comparison as aligned ``text`` columns or a ``markdown`` table."""
    header, rows = table_rows(summaries)
    if style == "markdown":
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                     for cells in [header, *rows])  # fmt: skip


#: Panels of the comparison figure: (phase, metric, title, drawn as error = 1 − value).
COMPARISON_PANELS: tuple[tuple[str, str, str, bool], ...] = (
    ("val", "accuracy", "validation error (%)", True),
    ("train", "loss", "training loss", False),
    ("train", "grad_norm_mean", "gradient norm (mean per log window)", False),
)


def legend_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """The runs' folder names where they tell the runs apart, else the paths as given."""
    names = [Path(run_dir).name for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def plot_comparison(
    run_dirs: Sequence[str | Path], records: Sequence[list[dict[str, Any]]], output: str | Path
) -> Path:
    """Draw every run's validation error, training loss and gradient norm against the step, on log scales.

    ``records[i]`` are the metrics of ``run_dirs[i]`` (:func:`read_metrics`).  A panel whose metric no
    run recorded (``grad_norm_mean`` before it was logged) is left out.

    Raises:
        CheckpointError: Nothing to draw in any run.
    """
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    runs = list(zip(legend_labels(run_dirs), records))
    panels = [p for p in COMPARISON_PANELS if any(series(records, p[0], p[1])[0] for _, records in runs)]
    if not panels:
        raise CheckpointError(f"nothing to draw: no training or validation metrics in {', '.join(map(str, run_dirs))}")
    figure, grid = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for axes, (phase, metric, title, as_error) in zip(grid[0], panels):
        for name, records in runs:
            steps, values = series(records, phase, metric)
            if as_error:
                values = [max(100.0 * (1.0 - v), 1e-3) for v in values]  # log scale: a perfect score sits on the floor
            if steps:
                axes.plot(steps, values, "o-" if phase == "val" else "-", label=name, markersize=2.5, linewidth=1)
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.6, not 6 × 10⁻¹
        axes.yaxis.set_major_formatter(plain)
        low, high = axes.get_ylim()
        axes.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())  # within a decade: label 2, 3, …
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3, which="both")
    grid[0][0].legend(fontsize=7)
    figure.tight_layout()
    return save_and_close(figure, output, dpi=110)
