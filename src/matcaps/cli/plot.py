"""``matcaps plot RUN_DIR``: draw the training curves (loss, accuracy, learning rate, margin) to a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plot`` sub-command."""
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's training curves",
        description="Draw loss and accuracy (train and validation), learning rate and margin from RUN_DIR/metrics.jsonl.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--output", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Draw the curves; returns 0."""
    from matcaps.plot import plot_training_curves

    path = plot_training_curves(
        args.run_dir, args.output, warn=lambda message: print(f"matcaps plot: warning: {message}", file=sys.stderr)
    )
    print(f"saved {path}")
    return 0
