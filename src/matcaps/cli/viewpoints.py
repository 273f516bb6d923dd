"""``matcaps viewpoints``: novel-viewpoint error of several networks at a matched familiar-viewpoint error."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Networks compared when neither --config nor --models is given.
DEFAULT_MODELS = ("smallnorb", "cnn-baseline")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``viewpoints`` sub-command."""
    parser = subparsers.add_parser(
        "viewpoints",
        help="novel viewpoints at matched familiar error (Hinton et al.'s Table 2)",
        description=(
            "Train each network on the familiar viewpoints of smallNORB (--split azimuth or elevation), check its "
            "error on the familiar-viewpoint test images every --check-every steps, stop it at the first check "
            "where that error is at most --familiar-error (or at --max-steps), then report its error on the novel "
            "viewpoints. Writes one run directory per network and viewpoints-SPLIT.json into --out."
        ),
    )
    parser.add_argument("--split", choices=("azimuth", "elevation"), required=True, help="which viewpoints are familiar")
    parser.add_argument("--familiar-error", type=float, required=True, metavar="ERROR",
                        help="target familiar-viewpoint test error, a fraction (e.g. 0.05)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (one run directory per network)")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"networks trained with the default recipe (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--config", type=Path, nargs="+", metavar="FILE",
                        help="training configurations (TOML/YAML/JSON, as for matcaps train --config), one per "
                             "network, named after the file; instead of --models")
    parser.add_argument("--check-every", type=int, default=500, help="steps between checks (default: 500)")
    parser.add_argument("--max-steps", type=int, default=100_000, help="give up after this many steps (default: 100000)")
    parser.add_argument("--data-root", type=Path, help="prepared data directory (default: the configuration's, or data)")
    parser.add_argument("--dataset", default="smallnorb", help="dataset with viewpoints (default: smallnorb)")
    parser.add_argument("--batch-size", type=int, help="batch size of every network (default: the configuration's)")
    parser.add_argument("--seed", type=int, help="seed of every network (default: the configuration's)")
    parser.add_argument("--workers", type=int, help="data-loader workers (default: the configuration's)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the configuration's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the protocol, print the table; returns 0."""
    from matcaps.errors import ConfigError
    from matcaps.train.config import build_config, load_config_file
    from matcaps.viewpoints import ViewpointSettings, config_label, format_results, run_protocol

    settings = ViewpointSettings(split=args.split, familiar_error=args.familiar_error, check_every=args.check_every,
                                 max_steps=args.max_steps)  # fmt: skip
    if args.config and args.models:
        raise ConfigError("give the networks either with --models or with --config files, not both")
    overrides = {name: getattr(args, name) for name in ("batch_size", "seed", "workers", "device")
                 if getattr(args, name) is not None}  # fmt: skip
    overrides.update(dataset=args.dataset, split=args.split, progress=args.progress)
    if args.data_root is not None:
        overrides["data_root"] = str(args.data_root.expanduser().resolve())
    configs = []
    if args.config:
        for path in args.config:
            config = build_config(load_config_file(path), overrides)
            configs.append((config_label(config, path), config))
    else:
        for model in args.models or DEFAULT_MODELS:
            config = build_config({}, {**overrides, "model": model})
            configs.append((config_label(config), config))
    results, path = run_protocol(configs, settings, args.out)
    print(format_results(results, settings))
    print(f"saved {path}")
    return 0
