#!/usr/bin/env python3
"""Score a trained network's weights under other routing settings, on its validation images.

Usage (from the repository root)::

    python3 scripts/routing_probe.py runs/mnist-i2-long --data-root data --images 5000 \\
        --setting iterations=2 --setting iterations=3 \\
        --setting "iterations=3 e_step_scales=[1,0.2]" --out probe.json

Each ``--setting`` is a space-separated list of ``EMRoutingConfig`` fields (values read as YAML)
applied to every routed layer of the network, or, written ``LAYER.FIELD=VALUE``, to one layer
(``conv_caps1``, ``conv_caps2``, ``class_caps``: ``CapsNetConfig.layer_routing``), e.g.
``--setting "class_caps.iterations=3"``; nothing is trained, the weights stay those of
``RUN``'s ``best.pt``.  This is how docs/learning-speed.md measured what the third EM iteration does
to the weights of a 2-iteration network, and what softening its second E-step undoes.  The
validation images are those the run held out (its ``--val-size``, its seed), prepared as in
training (e.g. centred on its ``--canvas``); the result is printed and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Subset

from matcaps.data import load_splits
from matcaps.errors import MatcapsError
from matcaps.fsutil import write_text_atomic
from matcaps.models import CapsNetConfig, build_model, model_config_from_dict
from matcaps.scoring import evaluate_model
from matcaps.train.checkpoint import load_checkpoint, resolve_checkpoint
from matcaps.train.config import TrainConfig, data_config


def parse_setting(text: str) -> dict[str, Any]:
    """``"iterations=3 e_step_scales=[1,0.2]"`` → ``{"iterations": 3, "e_step_scales": [1, 0.2]}``."""
    setting: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"a setting is KEY=VALUE items separated by spaces, got {item!r}")
        setting[key] = yaml.safe_load(value)
    return setting


def apply_setting(saved: CapsNetConfig, setting: dict[str, Any], implementation: str) -> CapsNetConfig:
    """``saved`` with the setting's plain fields changed in ``routing`` and its ``LAYER.FIELD`` ones in that layer."""
    shared = {key: value for key, value in setting.items() if "." not in key}
    layers = {layer: dict(changes) for layer, changes in saved.layer_routing.items()}
    for key, value in setting.items():
        if "." in key:
            layer, _, name = key.partition(".")
            layers.setdefault(layer, {})[name] = value
    return saved.replace(routing={**shared, "implementation": implementation}, layer_routing=layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (its best.pt) or a checkpoint file")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--images", type=int, default=5000, help="the first N validation images (default: 5000)")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True,
                        help="routing fields to set, e.g. 'iterations=3 e_step_scales=[1,0.2]' (repeatable)")
    parser.add_argument("--implementation", default="blocked", help="routing implementation (default: blocked)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.run, "best")
        payload = load_checkpoint(path)
        config = TrainConfig.from_dict(payload["config"], f"checkpoint {path}")
        splits = load_splits(data_config(config, root=args.data_root))
        if splits.val is None:
            raise MatcapsError(f"{path} was trained without a validation set")
        images = Subset(splits.val, range(min(args.images, len(splits.val))))
        saved = model_config_from_dict(payload["model_config"])
        if not isinstance(saved, CapsNetConfig):
            raise MatcapsError(f"{path} holds the CNN baseline, which has no routing to probe")
        results = []
        for setting in args.setting:
            model_config = apply_setting(saved, setting, args.implementation)
            model = build_model(model_config)
            model.load_state_dict(payload["model"])
            started = time.perf_counter()
            counts = evaluate_model(model, images, model_config.num_classes, batch_size=250)
            accuracy = int(counts.confusion.diagonal().sum()) / counts.total
            results.append({"setting": setting, "accuracy": accuracy, "images": counts.total,
                            "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
            print(f"{json.dumps(setting)}: {100 * accuracy:.2f} % of {counts.total} validation images", flush=True)
    except (MatcapsError, OSError, TypeError, ValueError) as error:
        print(f"routing_probe.py: error: {error}", file=sys.stderr)
        return 2
    if args.out is not None:
        report = {"checkpoint": str(path), "step": int(payload.get("state", {}).get("step", 0)),
                  "torch": torch.__version__, "results": results}  # fmt: skip
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
