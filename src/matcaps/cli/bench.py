"""``matcaps bench``: time training and inference of a capsule network, per routing implementation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from matcaps.bench.config import (
    ALLOCATORS,
    DEFAULT_PROFILE_ROWS,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_WARMUP,
    DEVICES,
    DTYPES,
    ITERATION_CHOICES,
    BenchConfig,
    parse_batch_size,
)
from matcaps.errors import ConfigError
from matcaps.models import PRESETS
from matcaps.models.options import parse_model_options
from matcaps.routing import ROUTING_IMPLEMENTATIONS

DESCRIPTION = (
    "Time a full training step (forward, spread loss, backward, Adam) and an inference forward pass of a "
    "capsule network on seeded random data, for one or several routing implementations, each measured in its "
    "own fresh process. Prints a table (with the speed-up over naive when both are measured) and optionally "
    "writes a JSON report."
)


def _choices(values) -> str:
    """``{a,b,c}``, the way argparse shows the choices of the other commands' options."""
    return "{" + ",".join(values) + "}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    parser = subparsers.add_parser(
        "bench", help="benchmark training and inference speed and memory", description=DESCRIPTION,
    )  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``matcaps bench`` (validated by :class:`BenchConfig`, not by argparse).

    Choices are shown as argparse shows them elsewhere (``{a,b}``) but checked by
    :class:`BenchConfig`, whose errors name the option in one line.
    """
    parser.add_argument("--model", default="smallnorb", metavar=_choices(PRESETS),
                        help="model preset (default: smallnorb)")
    parser.add_argument(
        "--set", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
        help="change a field of the preset as train --model-option does, e.g. --set conv1_channels=32 "
             "or --set 'routing.e_step_scales=[1,0.2]' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", default="32", metavar="N|max",
        help="images per step, or max: for each implementation the largest training batch that fits in the "
             "GPU's memory, found by doubling and bisection (CUDA only) (default: 32)",
    )  # fmt: skip
    parser.add_argument("--iters", type=int, default=2, metavar=_choices(map(str, ITERATION_CHOICES)),
                        help="EM-routing iterations (default: 2)")
    parser.add_argument("--device", default="cpu",
                        help=f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]}; auto: cuda if available (default: cpu)")
    parser.add_argument("--precision", "--dtype", dest="dtype", default="fp32", metavar=_choices(DTYPES),
                        help="bf16 = autocast, the routing stays fp32; as matcaps train --precision (default: fp32)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (default: PyTorch's)")
    parser.add_argument(
        "--routing-impl", "--impl", dest="impl", nargs="+", default=[ROUTING_IMPLEMENTATIONS[0]], metavar="IMPL",
        help=f"routing implementation(s) to measure: {', '.join(ROUTING_IMPLEMENTATIONS)}; as matcaps train "
             f"--routing-impl, which takes one (default: {ROUTING_IMPLEMENTATIONS[0]})",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed steps per phase (default: {DEFAULT_WARMUP})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"timed steps per phase (default: {DEFAULT_STEPS})")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument(
        "--allocator", default="default", metavar=_choices(ALLOCATORS),
        help="tuned raises glibc's mmap and trim thresholds at worker start (default: default)",
    )  # fmt: skip
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown of one step per phase")
    parser.add_argument(
        "--profile-rows", type=int, default=DEFAULT_PROFILE_ROWS,
        help=f"rows of the profiler table (default: {DEFAULT_PROFILE_ROWS})",
    )  # fmt: skip
    parser.add_argument("--trace", dest="trace_path", metavar="PATH", help="with --profile, write a Chrome trace of the train step")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the weights and random input (default: {DEFAULT_SEED})")
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="skip checking that the implementations give the same outputs and gradients",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Build and validate the :class:`BenchConfig` of the parsed options."""
    return BenchConfig(
        model=args.model,
        model_options=parse_model_options(args.model_options, flag="--set"),
        batch_size=parse_batch_size(args.batch_size),
        iterations=args.iters,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        implementations=tuple(args.impl),
        warmup=args.warmup,
        steps=args.steps,
        compile=args.compile,
        allocator=args.allocator,
        json_path=args.json_path,
        profile=args.profile or args.trace_path is not None,
        profile_rows=args.profile_rows,
        trace_path=args.trace_path,
        seed=args.seed,
        verify=args.verify,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table (and profiles), write the JSON report."""
    from matcaps.bench.report import format_profiles, format_report, write_json
    from matcaps.bench.runner import run_bench

    config = config_from_args(args)
    if config.json_path:
        check_writable(config.json_path)
    report = run_bench(config, command=invoked_command())
    profiles = format_profiles(report)
    if profiles:
        print(profiles)
    print(format_report(report))
    if config.json_path:
        write_json(report, config.json_path)
        print(f"report written to {config.json_path}")
    return 0


def check_writable(path: str) -> None:
    """Fail before the (long) measurement if the JSON report could not be written."""
    folder = Path(path).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--json {path}: cannot create folder {folder}: {error.strerror or error}") from None
    if Path(path).is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"--json {path}: not a writable file path")


def invoked_command() -> list[str]:
    """The command line as typed (``matcaps bench ...`` or ``python -m matcaps.bench ...``)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else "matcaps"
    if program == "__main__.py":
        return ["python", "-m", "matcaps.bench", *sys.argv[1:]]
    return [program, *sys.argv[1:]]
