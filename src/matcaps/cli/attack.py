"""``matcaps attack RUN_DIR|CHECKPOINT|NAME|REPORT.json ...``: white-box FGSM and BIM over a list of ε."""

from __future__ import annotations

import argparse
from pathlib import Path

from matcaps.allocator import ALLOCATOR_REGIMES

#: Suffix of a saved attack report given as a target (drawn, not recomputed).
REPORT_SUFFIX = ".json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attack`` sub-command."""
    from matcaps.adversarial import ATTACK_LOSSES, ATTACK_METHODS, ATTACK_MODES
    from matcaps.robustness import DEFAULT_BIM_ITERATIONS, DEFAULT_EPSILONS

    parser = subparsers.add_parser(
        "attack",
        help="adversarial robustness: FGSM and BIM against trained networks",
        description=(
            "Attack checkpoints with white-box FGSM and BIM (untargeted and targeted) at each epsilon, in pixel "
            "space (epsilon = largest change of a pixel on the [0, 1] scale, i.e. epsilon*255 grey levels; images "
            "clipped to [0, 1]; gradients through the standardisation and the whole network, routing included, "
            "in evaluation mode). Prints a table and writes attack-SPLIT-CHECKPOINT.json next to each checkpoint "
            "and a PNG plot; several targets (or saved reports) are drawn on one plot."
        ),
    )
    parser.add_argument("targets", type=Path, nargs="+", metavar="RUN_DIR|CHECKPOINT|NAME|REPORT.json",
                        help="run directories, checkpoints or pretrained networks (mnist, fashion-mnist; their "
                             "reports go to the current directory and their data are looked for in data/) to "
                             "attack, or attack reports to draw again")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    parser.add_argument("--split", choices=("standard", "azimuth", "elevation", "affine"),
                        help="test set (default: the training split)")
    parser.add_argument("--data-root", type=Path, help="prepared data directory (default: the run's)")
    parser.add_argument("--methods", nargs="+", choices=ATTACK_METHODS, default=list(ATTACK_METHODS),
                        help="attack methods (default: fgsm bim)")
    parser.add_argument("--modes", nargs="+", choices=ATTACK_MODES, default=list(ATTACK_MODES),
                        help="untargeted and/or targeted (default: both)")
    parser.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPSILONS), metavar="EPSILON",
                        help=f"perturbation sizes on the [0, 1] pixel scale "
                             f"(default: {' '.join(f'{e:g}' for e in DEFAULT_EPSILONS)})")
    parser.add_argument("--bim-iterations", type=int, default=DEFAULT_BIM_ITERATIONS,
                        help=f"BIM steps (default: {DEFAULT_BIM_ITERATIONS})")
    parser.add_argument("--bim-step-size", type=float,
                        help="BIM step on the [0, 1] pixel scale (default: 2.5 * epsilon / iterations)")
    parser.add_argument("--loss", choices=ATTACK_LOSSES, default="cross-entropy",
                        help="loss whose gradient the attacks follow: softmax cross-entropy of the class scores, "
                             "or the margin of the best other class (default: cross-entropy)")
    parser.add_argument("--limit", type=int, help="attack a seeded random subset of this many test images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the targets (default: 0)")
    parser.add_argument("--labels", nargs="+", help="names of the targets in the table and plot (default: run names)")
    parser.add_argument("--output", type=Path, metavar="JSON",
                        help="report file of the one target attacked (default: attack-SPLIT-CHECKPOINT.json next to "
                             "its checkpoint)")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="plot file (default for one target: attack-SPLIT-CHECKPOINT.png next to the report; "
                             "required for several)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch (default: 100)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default: 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--allocator", choices=ALLOCATOR_REGIMES, default="tuned",
                        help="C allocator regime set at start: tuned (faster) or default (default: tuned)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Attack (or read) every target, print and save the reports, draw the plot; returns 0."""
    from matcaps.allocator import apply_allocator
    from matcaps.cli.test import check_target, resolve_scored_target
    from matcaps.errors import ConfigError
    from matcaps.evaluate import load_for_testing
    from matcaps.robustness import (
        AttackSettings,
        attack_checkpoint,
        format_attack_report,
        load_attack_report,
        plot_attack_reports,
        report_path,
        save_attack_report,
    )

    settings = AttackSettings(
        methods=tuple(dict.fromkeys(args.methods)), modes=tuple(dict.fromkeys(args.modes)),
        epsilons=tuple(sorted(set(args.eps))), bim_iterations=args.bim_iterations, bim_step_size=args.bim_step_size,
        loss=args.loss, limit=args.limit, seed=args.seed,
    )  # fmt: skip
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must not be negative, got {args.workers}")
    if args.labels is not None and len(args.labels) != len(args.targets):
        raise ConfigError(f"--labels names {len(args.labels)} target(s) but {len(args.targets)} were given")
    if len(args.targets) > 1 and args.plot is None:
        raise ConfigError("several targets are drawn on one plot: name it with --plot PNG")
    if args.output is not None and (len(args.targets) > 1 or args.output.suffix.lower() != REPORT_SUFFIX):
        raise ConfigError(f"--output names the {REPORT_SUFFIX} report of one attacked target, got {args.output}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got {args.plot}")
    for target in args.targets:
        if target.suffix.lower() != REPORT_SUFFIX:
            check_target(target)
    apply_allocator(args.allocator)
    labels = args.labels or [None] * len(args.targets)
    reports, first_json = [], None
    for target, label in zip(args.targets, labels):
        if target.suffix.lower() == REPORT_SUFFIX:
            report = load_attack_report(target)
            if label is not None:
                report.label = label
            json_path = target
        else:
            checkpoint, pretrained, data_root = resolve_scored_target(target, args.checkpoint, args.data_root)
            loaded = load_for_testing(checkpoint, args.checkpoint, args.split, data_root, args.device)
            report = attack_checkpoint(loaded, settings, batch_size=args.batch_size, workers=args.workers,
                                       progress=args.progress, label=label or (str(target) if pretrained else None))
            output = args.output
            if output is None and pretrained:  # not inside the installed package
                output = report_path(report, Path.cwd())
            json_path = save_attack_report(report, output)
            print(f"saved {json_path}")
        print(format_attack_report(report))
        reports.append(report)
        first_json = first_json or json_path
    plot = args.plot if args.plot is not None else Path(first_json).with_suffix(".png")
    print(f"saved {plot_attack_reports(reports, plot)}")
    return 0
