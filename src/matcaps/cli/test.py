"""``matcaps test RUN_DIR|CHECKPOINT``: accuracy on the whole test set, per class, with a confusion matrix."""

from __future__ import annotations

import argparse
from pathlib import Path

from matcaps.allocator import ALLOCATOR_REGIMES

#: Where ``matcaps test NAME`` looks for the prepared data of a pretrained network without ``--data-root``.
PRETRAINED_DATA_ROOT = Path("data")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``test`` sub-command."""
    parser = subparsers.add_parser(
        "test",
        help="evaluate a trained run on the whole test set",
        description=(
            "Score a checkpoint on the whole test set: accuracy, per-class accuracy and confusion matrix "
            "are printed, and written next to the checkpoint as test-SPLIT-CHECKPOINT.json and "
            "confusion-SPLIT-CHECKPOINT.png."
        ),
    )
    parser.add_argument("target", type=Path, metavar="RUN_DIR|CHECKPOINT|NAME",
                        help="run directory, checkpoint file or pretrained network (mnist, fashion-mnist; its "
                             "report goes to the current directory and its data are looked for in data/)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best, by validation accuracy)")
    parser.add_argument("--split", choices=("standard", "azimuth", "elevation", "affine"),
                        help="test set: standard; the novel viewpoints of smallNORB; affine: every MNIST-like test "
                             "digit under a seeded random affine transformation, affNIST-style (default: the "
                             "training split)")
    parser.add_argument("--viewpoints", choices=("novel", "familiar"), default="novel",
                        help="with --split azimuth/elevation: score the novel (default) or the familiar viewpoints")
    parser.add_argument("--affine-seed", type=int, default=0, help="seed of the affine test set (default: 0)")
    parser.add_argument("--crops", type=int, choices=(1, 13), default=1,
                        help="1, or 13: average the class scores of the centre crop and the crops moved by "
                             "±1, ±2, ±3 pixels along both diagonals (the official smallNORB release's; default: 1)")
    parser.add_argument("--mirrored", action="store_true",
                        help="also average the class scores of every crop mirrored left-right (the test-time "
                             "counterpart of training with --hflip; reports get a -mirrored suffix)")
    parser.add_argument("--data-root", type=Path, help="prepared data directory (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (default: 2)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--allocator", choices=ALLOCATOR_REGIMES, default="tuned",
                        help="C allocator regime set at start: tuned (faster) or default (default: tuned)")
    parser.set_defaults(func=run_command)


def resolve_scored_target(target: Path, which: str, data_root: Path | None) -> tuple[Path, bool, Path | None]:
    """The checkpoint file of ``target``, whether it is a pretrained name, and the data root to score it on
    (``--data-root``, else ``PRETRAINED_DATA_ROOT`` for a pretrained name, else None: the run's own)."""
    from matcaps.trained import resolve_target

    check_target(target)
    checkpoint, pretrained = resolve_target(target, which)
    if data_root is None and pretrained is not None:
        data_root = PRETRAINED_DATA_ROOT
    return checkpoint, pretrained is not None, data_root


def check_target(target: Path) -> None:
    """A directory must be a run directory (``config.toml``) or at least hold a checkpoint."""
    from matcaps.errors import CheckpointError
    from matcaps.train.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
    from matcaps.train.run import CONFIG_FILE

    if target.is_dir() and not any((target / name).is_file() for name in (CONFIG_FILE, BEST_CHECKPOINT, LAST_CHECKPOINT)):
        raise CheckpointError(f"{target} is not a run directory (no {CONFIG_FILE})")


def run_command(args: argparse.Namespace) -> int:
    """Evaluate, print and save the report; returns 0."""
    from matcaps.allocator import apply_allocator
    from matcaps.errors import CheckpointError, ConfigError
    from matcaps.evaluate import evaluate_checkpoint, format_report, save_report
    from matcaps.train.checkpoint import DamagedCheckpointError
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must not be negative, got {args.workers}")
    target, pretrained, data_root = resolve_scored_target(args.target, args.checkpoint, args.data_root)
    apply_allocator(args.allocator)
    try:
        report = evaluate_checkpoint(
            target, which=args.checkpoint, split=args.split, data_root=data_root,
            batch_size=args.batch_size, device=args.device, workers=args.workers, progress=args.progress,
            crops=args.crops, viewpoints=args.viewpoints, affine_seed=args.affine_seed, mirrored=args.mirrored,
        )  # fmt: skip
    except DamagedCheckpointError as error:
        if error.alternative is None:
            raise
        raise CheckpointError(f"{error}: test it with `matcaps test {error.alternative}`") from None
    json_path, png_path = save_report(report, Path.cwd() if pretrained else None)
    print(format_report(report))
    print(f"saved {json_path} and {png_path}")
    return 0
