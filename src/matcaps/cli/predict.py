"""``matcaps predict CKPT|RUN_DIR|NAME IMAGE...``: class scores and the top-k classes of image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` sub-command."""
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with a trained or pretrained network",
        description=(
            "Classify image files (PNG, JPEG, ...) with a trained network: a run directory, a checkpoint "
            "file, or the name of a pretrained network (mnist, fashion-mnist). Each image is read as grey or "
            "RGB (as the network was trained), resized so that its shorter side is the size of the "
            "dataset's images, centre-cropped and preprocessed exactly as the test images. Prints every "
            "image's best classes with their class-capsule activations (softmax probabilities for the CNN "
            "baseline), as a table or as JSON."
        ),
    )
    parser.add_argument("target", metavar="CKPT|RUN_DIR|NAME", help="checkpoint, run directory or pretrained name")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    parser.add_argument("--top-k", type=int, default=3, help="best classes listed per image (default: 3)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Print the predictions; returns 0."""
    from matcaps.distributed import resolve_device
    from matcaps.predict import format_predictions, predict_images, predictions_to_json
    from matcaps.trained import load_trained

    network = load_trained(args.target, which=args.checkpoint, device=resolve_device(args.device))
    predictions = predict_images(network, args.images, top_k=args.top_k, batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps(predictions_to_json(network, predictions), indent=2))
    else:
        print(format_predictions(network, predictions))
    return 0
