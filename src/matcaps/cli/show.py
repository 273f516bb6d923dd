"""``matcaps show RUN|CKPT|NAME IMAGE...``: pictures of the capsules and the routing on image files."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``show`` sub-command."""
    parser = subparsers.add_parser(
        "show",
        help="draw what the capsules and the EM routing do on an image",
        description=(
            "Run a capsule network (run directory, checkpoint or pretrained name) on image files and draw, "
            "for each, one PNG: the input, the class-capsule activations, the routing weights of each routed "
            "layer at each EM iteration, and Hinton et al.'s Figure 2 (for each class capsule, the "
            "distances of its votes to its mean after each iteration, weighted by the assignment "
            "probabilities). With --tensorboard the same figure goes into TensorBoard as an image."
        ),
    )
    parser.add_argument("target", metavar="RUN|CKPT|NAME", help="run directory, checkpoint or pretrained name")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    parser.add_argument("--output-dir", type=Path, default=Path("."),
                        help="where routing-IMAGE.png goes, created if absent (default: the current directory)")
    parser.add_argument("--tensorboard", nargs="?", const="", metavar="LOGDIR",
                        help="also log the figures to TensorBoard, under show/IMAGE at the checkpoint's step: into "
                             "LOGDIR, or without it into the run's own events (RUN/tensorboard)")
    parser.set_defaults(func=run_command)


def tensorboard_dir(option: str, checkpoint: Path) -> Path:
    """Where ``--tensorboard [LOGDIR]`` writes: LOGDIR, or the events directory of the checkpoint's run."""
    from matcaps.errors import ConfigError
    from matcaps.train.metrics import TENSORBOARD_DIR
    from matcaps.train.run import CONFIG_FILE

    if option:
        return Path(option)
    if not (checkpoint.parent / CONFIG_FILE).is_file():
        raise ConfigError(f"--tensorboard without LOGDIR writes into a run directory's events, and {checkpoint} "
                          "is not in a run directory; give --tensorboard LOGDIR")
    return checkpoint.parent / TENSORBOARD_DIR


def check_picture_names(images: list[Path]) -> None:
    """One line naming two images that would be drawn to the same ``routing-IMAGE.png`` (and TensorBoard tag)."""
    from matcaps.errors import ConfigError
    from matcaps.show import routing_picture_name

    drawn_to: dict[str, Path] = {}
    for image in images:
        name = routing_picture_name(image)
        if name in drawn_to:
            raise ConfigError(f"{drawn_to[name]} and {image} would both be drawn to {name}; "
                              "draw them in separate calls with different --output-dir")
        drawn_to[name] = image


def run_command(args: argparse.Namespace) -> int:
    """Draw and save one figure per image; returns 0."""
    from matcaps.errors import ConfigError
    from matcaps.show import draw_routing, panel_count, routing_picture_name, save_figure, trace_image
    from matcaps.trained import load_trained

    check_picture_names(args.images)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ConfigError(f"--output-dir {args.output_dir} is not a directory")
    network = load_trained(args.target, which=args.checkpoint)
    logdir = tensorboard_dir(args.tensorboard, network.checkpoint) if args.tensorboard is not None else None
    traces = [trace_image(network, image) for image in args.images]  # every image read before anything is written
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output-dir {args.output_dir}: cannot create it: {error.strerror or error}") from None
    writer = None
    if logdir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(logdir))
    try:
        for trace in traces:
            figure = draw_routing(trace, network.class_names, title=network.describe())
            if writer is not None:
                writer.add_figure(f"show/{trace.image.stem}", figure, global_step=network.step, close=False)
            path = save_figure(figure, args.output_dir / routing_picture_name(trace.image))
            print(f"{trace.image}: {network.class_names[trace.winner]} "
                  f"({float(trace.class_activations.max()):.4f}); "
                  f"{panel_count(len(network.class_names), trace.iterations)} panels in {path}")
    finally:
        if writer is not None:
            writer.close()
    if logdir is not None:
        print(f"TensorBoard: tensorboard --logdir {logdir} (images, tag show/IMAGE, step {network.step})")
    return 0
