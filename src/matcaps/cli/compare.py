"""``matcaps compare RUN_DIR…``: runs side by side — best validation, steps to a validation accuracy,
training minutes, test accuracy — as a table (text, Markdown or JSON) and, with ``--plot``, one figure."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Output formats of the table.
FORMATS = ("text", "markdown", "json")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    from matcaps.compare import DEFAULT_THRESHOLDS

    parser = subparsers.add_parser(
        "compare",
        help="compare runs: best validation, steps to a validation accuracy, minutes, test accuracy",
        description="Summarise run directories (also published ones) side by side from their metrics.jsonl, "
        "config.toml and test-*.json: the best validation accuracy and its step (that of best.pt), the first "
        "step and training minutes at which validation reached each --threshold, training minutes without "
        "pauses, and the test accuracy of every matcaps test report.",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--threshold", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), metavar="ACC",
                        help="validation accuracies (fractions) to report the first step reaching "
                        f"(default: {' '.join(map(str, DEFAULT_THRESHOLDS))})")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="text", help="table format (default: text)")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="also draw validation error, training loss and gradient norm of every run to PNG")  # fmt: skip
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Print the table (and draw the figure); returns 0."""
    from matcaps.compare import check_thresholds, format_table, plot_comparison, summarise_records
    from matcaps.train.metrics import read_metrics

    def warn(message: str) -> None:
        print(f"matcaps compare: warning: {message}", file=sys.stderr)

    thresholds = check_thresholds(args.threshold)  # a bad --threshold is reported before any file is read
    records = [read_metrics(run_dir, warn=warn) for run_dir in args.run_dirs]  # read once: table and figure
    summaries = [summarise_records(d, r, thresholds, warn=warn) for d, r in zip(args.run_dirs, records)]
    if args.format == "json":
        print(json.dumps([summary.to_dict() for summary in summaries], indent=2))
    else:
        print(format_table(summaries, args.format))
    if args.plot is not None:
        path = plot_comparison(args.run_dirs, records, args.plot)
        print(f"saved {path}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0
