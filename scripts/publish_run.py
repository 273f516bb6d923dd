"""Copy a finished run's records into ``docs/runs/`` so that anyone can read and re-score it.

Usage::

    python scripts/publish_run.py runs/mnist-i2-decay docs/runs/cpu-2026-11-26/mnist-i2-decay [--log train.log]
        [--no-checkpoint]

Copied: ``config.toml``, ``run.json``, ``metrics.jsonl``, ``curves.png``, every test and attack report
(``test-*.json``, ``confusion-*.png``, ``attack-*.json``/``.png``) and, unless ``--no-checkpoint``,
``best.pt`` reduced to what ``matcaps test``, ``attack`` and ``predict`` need (network weights,
configurations, step): the optimizer state and random-number states are dropped, which makes the file
about a third of the size and not resumable.  ``--log`` adds the console log as ``train.log``.
TensorBoard events stay behind (large).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from matcaps.train.checkpoint import BEST_CHECKPOINT, load_checkpoint, save_weights_only

#: Files copied as they are (glob patterns, relative to the run directory).
RECORD_PATTERNS = ("config.toml", "run.json", "metrics.jsonl", "curves.png", "test-*.json", "confusion-*.png",
                   "attack-*.json", "attack-*.png")  # fmt: skip


def publish(run: Path, destination: Path, log: Path | None, checkpoint: bool) -> list[Path]:
    """Copy the records of ``run`` into ``destination``; returns the files written."""
    if not (run / "config.toml").is_file():
        raise SystemExit(f"error: {run} is not a run directory (no config.toml)")
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for pattern in RECORD_PATTERNS:
        for source in sorted(run.glob(pattern)):
            written.append(Path(shutil.copy2(source, destination / source.name)))
    if log is not None:
        written.append(Path(shutil.copy2(log, destination / "train.log")))
    if checkpoint and (run / BEST_CHECKPOINT).is_file():
        save_weights_only(load_checkpoint(run / BEST_CHECKPOINT), destination / BEST_CHECKPOINT)
        written.append(destination / BEST_CHECKPOINT)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory")
    parser.add_argument("destination", type=Path, help="directory under docs/runs/")
    parser.add_argument("--log", type=Path, help="console log of the run, copied as train.log")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false", help="leave best.pt out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in publish(args.run, args.destination, args.log, args.checkpoint):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
