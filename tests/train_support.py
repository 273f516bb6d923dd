"""Shared helpers of the training tests: a tiny network and tiny in-memory datasets (no tests here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from matcaps.models import CapsNetConfig
from matcaps.train import TrainConfig
from matcaps.train.config import resolve_model_config

#: A CapsNet small enough to train a few steps in milliseconds on CPU.
TINY_MODEL_OPTIONS: dict[str, Any] = {"conv1_channels": 8, "primary_types": 2, "conv_caps1_types": 2, "conv_caps2_types": 2}
#: Side of the tiny images (conv1 → 8×8, ConvCaps1 → 3×3, ConvCaps2 → 1×1).
TINY_IMAGE_SIZE = 16
NUM_CLASSES = 5


class TinyImages(Dataset):
    """Random ``(1, S, S)`` images whose class shifts their mean; with ``set_epoch`` like the real data.

    The "augmentation" adds noise that is a deterministic function of ``(epoch, index)``,
    so a resumed run only reproduces the uninterrupted one if it calls ``set_epoch``.
    """

    def __init__(self, count: int, seed: int = 0, size: int = TINY_IMAGE_SIZE, augment: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        self.images = torch.randn(count, 1, size, size, generator=generator) + self.labels.view(-1, 1, 1, 1).float()
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            noise = torch.Generator().manual_seed(1000 * self.epoch + index)
            image = image + 0.1 * torch.randn(image.shape, generator=noise)
        return image, self.labels[index]


class Crash(Exception):
    """Raised by a step hook to simulate a run killed after some step."""


def crash_at(step: int):
    """A step hook that raises :class:`Crash` once the trainer has taken ``step`` steps."""

    def hook(trainer: Any) -> None:
        if trainer.state.step == step:
            raise Crash(step)

    return hook


def tiny_config(**changes: Any) -> TrainConfig:
    """A fast configuration: batch 8, no workers, no progress bars, frequent logging."""
    values: dict[str, Any] = dict(
        epochs=2, batch_size=8, workers=0, progress=False, log_every=2, histogram_every=3,
        checkpoint_every=4, val_batch_size=16, device="cpu", model_options=dict(TINY_MODEL_OPTIONS),
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def tiny_model_config(config: TrainConfig, size: int = TINY_IMAGE_SIZE) -> CapsNetConfig:
    return resolve_model_config(config, NUM_CLASSES, size, 1)


def state_dicts_equal(first: dict[str, Tensor], second: dict[str, Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class _Unsafe:
    """A class that the weights-only checkpoint loader refuses to rebuild."""


#: Ways a checkpoint file is found damaged or foreign (see :func:`damage_checkpoint`).
CHECKPOINT_DAMAGES = ("random", "truncated", "cut-header", "empty", "unsafe-object", "foreign", "legacy-pickle")


def damage_checkpoint(path: Path, kind: str) -> None:
    """Replace the valid checkpoint ``path`` by a damaged or foreign file of kind ``kind``."""
    data = path.read_bytes()
    if kind == "random":  # e.g. `head -c 100000 /dev/urandom > last.pt`
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "cut-header":
        path.write_bytes(data[:500])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "unsafe-object":
        torch.save({"format": 1, "thing": _Unsafe()}, path)
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif kind == "legacy-pickle":
        torch.save({"weights": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    else:
        raise ValueError(f"unknown damage {kind!r}")


def train_resume_and_test_tiny_mnist(tmp_path: Path, model_options: list[str]) -> tuple[Path, list[str]]:
    """``matcaps train`` (2 steps) → ``--resume`` (to step 3) → ``matcaps test`` on a tiny MNIST, with
    the given ``KEY=VALUE`` model options; asserts every command succeeds and the whole test set is
    scored.  Returns the run directory and the data options (for further commands)."""
    import json

    from data_fixtures import write_tiny_mnist

    from matcaps.cli import main
    from matcaps.data import prepare

    root = tmp_path / "data"
    write_tiny_mnist(root, n_train=30, n_test=10)
    prepare("mnist", root, download=False, progress=False, verify=False)
    run = tmp_path / "run"
    common = ["--data-root", str(root), "--no-progress", "--workers", "0"]
    options = [item for option in model_options for item in ("--model-option", option)]
    assert main(["train", "--dataset", "mnist", *options, "--val-size", "10", "--batch-size", "5", "--max-steps", "2",
                 "--run-dir", str(run), *common]) == 0  # fmt: skip
    assert main(["train", "--resume", str(run), "--max-steps", "3", *common]) == 0
    assert main(["test", str(run), "--no-progress", "--workers", "0"]) == 0
    assert json.loads((run / "test-standard-best.json").read_text())["num_images"] == 10
    return run, common
