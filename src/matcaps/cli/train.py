"""``matcaps train``: train a capsule network, resume a run, or reproduce one from its config.

Every field of :class:`matcaps.train.TrainConfig` is a flag (``batch_size`` → ``--batch-size``);
flags override ``--config FILE`` (TOML, YAML or JSON), which overrides the defaults (the
IBM smallNORB recipe).  Under ``torchrun`` each process runs this command; they train one
model with DistributedDataParallel and only rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matcaps.errors import ConfigError
from matcaps.models.options import parse_model_options, split_assignment
from matcaps.train.config import FIELDS, TrainConfig, build_config, default_model_name, load_config_file
from matcaps.train.param_groups import LR_GROUPS, check_lr_scales

#: Headings of the option groups in ``--help``.
GROUP_TITLES = {
    "data": "data", "model": "model", "optimisation": "optimisation (IBM smallNORB recipe by default)",
    "execution": "execution", "monitoring": "monitoring and checkpoints",
}  # fmt: skip


#: Parent of the run directories when neither ``--run-dir`` nor ``--runs-root`` is given.
DEFAULT_RUNS_ROOT = Path("runs")
#: Attribute of the parsed namespace mapping each option given on the command line to the flag typed.
TYPED_FLAGS = "_typed_flags"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _remember_flag(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    vars(namespace).setdefault(TYPED_FLAGS, {})[dest] = option_string or _flag(dest)


class _Store(argparse.Action):
    """``store``, also remembering which flag (or alias, e.g. ``--l2``) set the option."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _remember_flag(namespace, self.dest, option_string)


class _StoreBool(argparse.BooleanOptionalAction):
    """``--x/--no-x``, also remembering which one was typed."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember_flag(namespace, self.dest, option_string)


def _add_field_option(group: argparse._ArgumentGroup, name: str) -> None:
    metadata = FIELDS[name].metadata
    kind = metadata["kind"].rstrip("?")
    default = FIELDS[name].default
    help_text = metadata["help"] + ("" if default is None else f" (default: {_show(default)})")
    flags = [_flag(name), *metadata.get("aliases", ())]
    common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if kind == "bool":
        group.add_argument(*flags, action=_StoreBool, **common)
    elif kind == "ints":
        group.add_argument(*flags, action=_Store, nargs="+", type=int, metavar="N", **common)
    else:
        converter = {"int": int, "float": float, "str": str}[kind]
        group.add_argument(*flags, action=_Store, type=converter, choices=metadata.get("choices"),
                           metavar=name.upper() if not metadata.get("choices") else None, **common)  # fmt: skip


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train a capsule network (or resume a run)",
        description=(
            "Train a matrix-capsule network with EM routing. Defaults follow the IBM smallNORB recipe "
            "(Adam 3e-3 decayed x0.96 per 20k steps, batch 64, spread loss with Hinton's margin "
            "schedule, 2 routing iterations). Each run gets a directory with config.toml, checkpoints "
            "(last.pt, best.pt), metrics.jsonl and TensorBoard events. Under torchrun the processes "
            "train together (DistributedDataParallel; NCCL on GPU, gloo on CPU)."
        ),
    )
    run = parser.add_argument_group("run")
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="read options from a TOML/YAML/JSON file (flags override it); e.g. RUN/config.toml")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its last.pt, exactly where it stopped")
    run.add_argument("--run-dir", type=Path, help="directory of this run (default: RUNS_ROOT/NAME)")
    run.add_argument("--runs-root", type=Path, help=f"parent of run directories (default: {DEFAULT_RUNS_ROOT})")
    run.add_argument("--name", help="run name (default: DATASET-YYYYmmdd-HHMMSS)")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for name, f in FIELDS.items():
        if f.metadata["kind"] != "table":
            _add_field_option(groups[f.metadata["group"]], name)
    groups["model"].add_argument(
        "--model-option", action="append", default=[], metavar="KEY=VALUE",
        help="change a field of the model's configuration (CapsNetConfig or CNNBaselineConfig), e.g. "
             "conv1_channels=32 or routing.epsilon=1e-9 (repeatable)",
    )  # fmt: skip
    groups["optimisation"].add_argument(
        "--lr-scale", action="append", default=[], metavar="GROUP=FACTOR",
        help=f"multiply the learning rate of one parameter group ({', '.join(LR_GROUPS)}) by FACTOR, e.g. "
             "transforms=10 (repeatable; default: one learning rate for every parameter, IBM's)",
    )  # fmt: skip
    parser.set_defaults(func=run_command)


def parse_lr_scales(items: list[str]) -> dict[str, float]:
    """``["transforms=10", "beta_a=1e3"]`` → ``{"transforms": 10.0, "beta_a": 1000.0}``; one-line errors."""
    scales: dict[str, float] = {}
    for item in items:
        group, text = split_assignment(item, "--lr-scale", "GROUP=FACTOR")
        try:
            scales[group] = float(text)
        except ValueError:
            raise ConfigError(f"--lr-scale {group}: the factor must be a number, got {text!r}") from None
    try:
        check_lr_scales(scales)
    except ConfigError as error:
        raise ConfigError(str(error).replace("option lr_scales", "--lr-scale")) from None
    return scales


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _blame(error: ConfigError, typed: Mapping[str, str], file_keys: set[str], file: Path | None) -> ConfigError:
    """``error`` naming the option as the user gave it: the flag typed, or the configuration file.

    The configuration's checks name an option as ``option KEY`` (``option batch_size must be
    at least 1``); a key set by a flag becomes that flag (``--batch-size must be at least 1``),
    a key set by the file gets the file's name in front.
    """
    message = str(error)
    match = re.search(r"\boption ([a-z0-9_]+)\b", message)
    if match is None or match.group(1) not in FIELDS:
        return error
    key = match.group(1)
    if key in typed:
        return ConfigError(message[: match.start()] + typed[key] + message[match.end():])
    if key in file_keys and file is not None and str(file) not in message:
        return ConfigError(f"configuration file {file}: {message}")
    return error


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` file < flags (or, with ``--resume``, the run's saved configuration).

    ``data_root`` is made absolute, so that the saved ``config.toml`` works from any directory.
    """
    from matcaps.train.run import CONFIG_FILE, merge_resume_overrides, read_run_config

    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    typed: dict[str, str] = vars(args).get(TYPED_FLAGS, {})
    model_options = parse_model_options(args.model_option)
    lr_scales = parse_lr_scales(args.lr_scale)
    if args.resume is not None:
        if args.config is not None or model_options or lr_scales:
            raise ConfigError("--resume continues a run with its saved configuration; do not combine it "
                              "with --config, --model-option or --lr-scale")
        elsewhere = [flag for flag, value in (("--run-dir", args.run_dir), ("--runs-root", args.runs_root),
                                              ("--name", args.name)) if value is not None]
        if elsewhere:
            raise ConfigError(f"--resume {args.resume} continues the run in that directory; do not combine it "
                              f"with {', '.join(elsewhere)}")
        saved = read_run_config(args.resume)
        names = {name: typed.get(name, _flag(name)) for name in FIELDS}
        try:
            config = merge_resume_overrides(saved, overrides, names)
        except ConfigError as error:
            raise _blame(error, typed, set(FIELDS), Path(args.resume) / CONFIG_FILE) from None
    else:
        file_values = load_config_file(args.config) if args.config is not None else {}
        if model_options:
            overrides["model_options"] = _merge(file_values.get("model_options", {}), model_options)
        if lr_scales:
            overrides["lr_scales"] = {**file_values.get("lr_scales", {}), **lr_scales}
        try:
            config = build_config(file_values, overrides)
        except ConfigError as error:
            raise _blame(error, typed, set(file_values), args.config) from None
    return config.replace(data_root=str(Path(config.data_root).expanduser().resolve()))


def run_command(args: argparse.Namespace) -> int:
    """Train (or resume) as the options say; returns 0, or 128 + N when signal N stopped it (with a checkpoint)."""
    from matcaps.allocator import apply_allocator
    from matcaps.data import load_splits
    from matcaps.models import CapsNetConfig
    from matcaps.train.checkpoint import read_initial_weights
    from matcaps.train.config import data_config, resolve_model_config
    from matcaps.distributed import setup_distributed, teardown_distributed
    from matcaps.train.interrupt import SIGNAL_EXIT_BASE, StopSignals
    from matcaps.train.run import CONFIG_FILE, describe_progress, train_run

    config = resolve_config(args)
    allocator = apply_allocator(config.allocator)  # before the data and the network are allocated
    splits = load_splits(data_config(config))  # fails early (one line) if the data are not prepared
    report_skipped_images(splits)
    info = splits.info
    try:
        model_config = resolve_model_config(config, info.num_classes, info.image_size, info.channels)
    except ConfigError as error:
        source = args.resume / CONFIG_FILE if args.resume is not None else args.config
        if source is None or args.model_option or str(source) in str(error):
            raise
        raise ConfigError(f"configuration file {source}: {error}") from None
    if args.resume is None and isinstance(model_config, CapsNetConfig):  # record what the defaults resolved to
        config = config.replace(
            model=config.model or default_model_name(config.dataset), iters=model_config.routing.iterations,
            routing_impl=model_config.routing.implementation,
        )  # fmt: skip
    if args.resume is None and config.init_from is not None:  # before the run directory is made
        read_initial_weights(config.init_from, model_config.to_dict())
    context = setup_distributed(config.device)
    try:
        run_dir = Path(args.resume) if args.resume is not None else _agree_on_run_dir(args, config, context)
        with StopSignals() as stop_signals:  # Ctrl-C / SIGTERM: stop after the step, with a checkpoint
            result = train_run(
                config, model_config, splits.train, splits.val, run_dir, resume=args.resume is not None, context=context,
                extra_info={"allocator": allocator, "dataset_sizes": {"train": len(splits.train), "val": len(splits.val) if splits.val else 0,
                                              "test": len(splits.test)}},
                stop_requested=stop_signals.requested, class_names=info.class_names,
            )  # fmt: skip
    finally:
        teardown_distributed(context)
    if context.is_main:
        best = f", best validation accuracy {result.best_val_accuracy:.4f}" if result.best_val_accuracy is not None else ""
        progress = describe_progress(result.epoch, result.batch_in_epoch)
        print(f"finished at step {result.step} ({progress}){best}, {result.skipped_steps} skipped step(s); "
              f"run directory {run_dir}")
        print(f"evaluate with: matcaps test {run_dir}    curves: matcaps plot {run_dir}")
    if stop_signals.received is not None and result.stopped_by not in (None, "time"):
        return SIGNAL_EXIT_BASE + int(stop_signals.received)  # as a shell reports a process ended by it
    return 0


def report_skipped_images(splits) -> None:
    """One line per image of an image folder left out by ``--bad-images skip``, then their count."""
    import sys

    from matcaps.data.folders import skipped_images

    skipped = skipped_images(splits)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        total = sum(len(d) for d in (splits.train, splits.val, splits.test) if d is not None) + len(skipped)
        print(f"skipped {len(skipped)} of {total} images that could not be read (--bad-images skip)", file=sys.stderr)


def _agree_on_run_dir(args: argparse.Namespace, config: TrainConfig, context) -> Path:
    """Rank 0 picks (and checks) the run directory; every process gets the same one."""
    from matcaps.train.run import choose_run_dir

    runs_root = args.runs_root or DEFAULT_RUNS_ROOT
    if not context.distributed:
        return choose_run_dir(args.run_dir, runs_root, args.name, config.dataset)
    import torch.distributed as dist

    message: list[Any] = [None]
    if context.is_main:
        try:
            message = [str(choose_run_dir(args.run_dir, runs_root, args.name, config.dataset))]
        except ConfigError as error:
            message = [ConfigError(str(error))]
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], ConfigError):
        raise message[0]
    return Path(message[0])
