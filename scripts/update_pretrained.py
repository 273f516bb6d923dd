#!/usr/bin/env python3
"""Ship a run's best checkpoint as a pretrained network: copy it, score it, rewrite the registry.

Usage (from the repository root)::

    python3 scripts/update_pretrained.py mnist runs/mnist-long --data-root data \\
        --source "runs/mnist-long/best.pt (step 120,000)" --trained "2026-12-01, 2-core CPU, 40 h" \\
        --notes "mnist capsule preset, 2 EM iterations, IBM recipe"

copies ``RUN/best.pt`` (weights, configuration and step only: the optimizer state is left out,
so the file stays small) to ``src/matcaps/pretrained/NAME.pt``, scores it on the whole test set
of its dataset and on the first ``--check-images`` test images (``matcaps.scoring``, as
``matcaps test`` does), and writes the entry ``[NAME]`` of ``src/matcaps/pretrained/weights.toml``
(file, dataset, SHA-256, test accuracy, the check count, provenance).  ``tests/test_pretrained.py``
then re-scores the shipped weights against the registry wherever the real test files are at hand.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from torch.utils.data import Subset

from matcaps.data import load_splits
from matcaps.models import build_model, model_config_from_dict
from matcaps.models.weights import PRETRAINED_DIR, REGISTRY_FILE
from matcaps.scoring import evaluate_model
from matcaps.tomlread import tomllib
from matcaps.train.checkpoint import load_checkpoint, resolve_checkpoint, save_weights_only
from matcaps.train.config import TrainConfig, data_config, to_toml

#: Test images re-scored by the quick check of tests/test_pretrained.py.
DEFAULT_CHECK_IMAGES = 500


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the pretrained name (mnist, fashion-mnist, ...)")
    parser.add_argument("run", type=Path, help="run directory or checkpoint file")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--data-root", type=Path, required=True, help="prepared data (matcaps data DATASET --root DIR)")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES)
    parser.add_argument("--source", required=True, help="where the weights come from (run, step)")
    parser.add_argument("--trained", required=True, help="when, on what hardware, how long")
    parser.add_argument("--notes", required=True, help="network, iterations, recipe; how far from published figures")
    args = parser.parse_args(argv)

    path = resolve_checkpoint(args.run, args.checkpoint)
    payload = load_checkpoint(path)
    config = TrainConfig.from_dict(payload["config"])
    model_config = model_config_from_dict(payload["model_config"])
    model = build_model(model_config)
    model.load_state_dict(payload["model"])
    # As the network saw its data (e.g. digits on a canvas), on the standard test split.
    test = load_splits(data_config(config, root=args.data_root, split="standard", validation=False)).test
    margin = config.margin_schedule()(int(payload["state"]["step"]))
    whole = evaluate_model(model, test, model_config.num_classes, margin=margin, progress=True, description="test")
    check = evaluate_model(model, Subset(test, range(args.check_images)), model_config.num_classes, margin=margin)

    target = PRETRAINED_DIR / f"{args.name}.pt"
    save_weights_only(payload, target)
    entries = tomllib.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    entries[args.name] = {
        "file": target.name, "dataset": config.dataset, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "test_accuracy": round(whole.accuracy, 6), "test_correct": int(whole.confusion.diagonal().sum()),
        "test_images": whole.total, "check_images": check.total,
        "check_correct": int(check.confusion.diagonal().sum()), "source": args.source, "trained": args.trained,
        "notes": args.notes,
    }  # fmt: skip
    header = "".join(line + "\n" for line in REGISTRY_FILE.read_text(encoding="utf-8").splitlines()
                     if line.startswith("#"))  # fmt: skip
    REGISTRY_FILE.write_text(header + "\n" + to_toml(entries).lstrip("\n"), encoding="utf-8")
    print(f"{args.name}: {target} ({target.stat().st_size:,} bytes), test accuracy {whole.accuracy:.4f} "
          f"({whole.total} images), {entries[args.name]['check_correct']}/{check.total} of the first test images; "
          f"registry {REGISTRY_FILE} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
