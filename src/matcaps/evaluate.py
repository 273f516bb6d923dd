"""Evaluation of a trained network on the whole test set: accuracy, per-class accuracy, confusion matrix.

``matcaps test RUN_DIR`` calls :func:`evaluate_checkpoint`, prints :func:`format_report`
and writes, next to the checkpoint, ``test-<split>-<checkpoint>.json`` and the confusion
matrix as ``confusion-<split>-<checkpoint>.png`` (``-13crops`` added with multi-crop scoring).
:func:`load_for_testing` gives the network and its test set to other evaluations (attacks).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from matcaps.data import CachedImageDataset, DatasetInfo, load_splits
from matcaps.data.affine import AFFINE_SEED
from matcaps.data.crops import MultiCropTransform, crop_offsets
from matcaps.errors import CheckpointError
from matcaps.figures import pyplot, save_and_close
from matcaps.models import ModelConfig, build_model, model_config_from_dict
from matcaps.train.checkpoint import check_class_names, load_checkpoint, resolve_checkpoint
from matcaps.train.config import TrainConfig, data_config
from matcaps.distributed import resolve_device
from matcaps.train.run import epoch_of_last_step
from matcaps.scoring import evaluate_model


@dataclass(frozen=True)
class TestReport:
    """The result of scoring one checkpoint on one test set (saved as JSON).

    Attributes:
        dataset, split: What was scored (``split`` may differ from the training split).
        checkpoint: Path of the checkpoint file.
        step, epoch: Training progress stored in the checkpoint: steps taken, and the epoch
            (counted from 1, as in every message) in which the last of them was taken.
        num_images: Images scored (the whole test set).
        accuracy: Fraction predicted correctly; ``error_rate = 1 − accuracy``.
        loss: Mean training loss (spread loss at the checkpoint's margin, or cross-entropy).
        class_names: ``K`` names, index = label.
        per_class_accuracy: Recall of each class, by name.
        confusion_matrix: ``K × K`` counts, rows = true class, columns = predicted.
        crops: Windows per image whose class scores were averaged (1 or 13).
        mirrored: Whether each window was also scored mirrored left-right (``2·crops`` views).
        affine_seed: Seed of the ``affine`` test set (None for other splits).
    """

    dataset: str
    split: str
    checkpoint: str
    step: int
    epoch: int
    num_images: int
    accuracy: float
    error_rate: float
    loss: float
    class_names: list[str]
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    crops: int = 1
    affine_seed: int | None = None
    mirrored: bool = False
    evaluated: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def views_text(self) -> str:
        """The views averaged per image, in words: ``13 crops``, ``1 crop and its mirror image``, …"""
        crops = f"{self.crops} crop{'s' if self.crops > 1 else ''}"
        return f"{crops} and {'their mirror images' if self.crops > 1 else 'its mirror image'}" if self.mirrored else crops

    def to_dict(self) -> dict:
        values = asdict(self)
        values["per_class_accuracy"] = {k: (None if math.isnan(v) else v) for k, v in self.per_class_accuracy.items()}
        return values


@dataclass
class LoadedCheckpoint:
    """A trained network ready to score, with the test set it is scored on.

    Attributes:
        path: The checkpoint file.
        config: The run's training configuration.
        model_config: The network's configuration.
        model: The network, on ``device``, in evaluation mode.
        test_set: Items ``(image (C, S, S), label)`` of the chosen test split.
        info: Facts about the dataset (class names, input size).
        split: The test split's name.
        step, epoch: Training progress stored in the checkpoint (epoch counted from 1).
        device: Where the network is.
    """

    path: Path
    config: TrainConfig
    model_config: ModelConfig
    model: torch.nn.Module
    test_set: CachedImageDataset
    info: DatasetInfo
    split: str
    step: int
    epoch: int
    device: torch.device


def load_for_testing(
    target: str | Path,
    which: str = "best",
    split: str | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    viewpoints: str = "novel",
    affine_seed: int = AFFINE_SEED,
) -> LoadedCheckpoint:
    """Load the checkpoint ``target`` (a run directory + ``which``, or a ``.pt`` file) and its test set.

    Args:
        target: Run directory or checkpoint file.
        which: ``best`` or ``last`` (for a run directory).
        split: ``standard``, ``azimuth``, ``elevation`` or ``affine`` (default: the one trained on).
        data_root: Where the prepared data are (default: the training run's).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        viewpoints: With a viewpoint split, the ``novel`` or ``familiar`` test viewpoints.
        affine_seed: Seed of the ``affine`` test set.
    """
    path = resolve_checkpoint(target, which)
    payload = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(payload["config"], f"checkpoint {path}")
        model_config = model_config_from_dict(payload["model_config"])
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} lacks {error}") from None
    changes = {"root": Path(data_root)} if data_root is not None else {}
    data = data_config(config, split=split or config.split, validation=False, test_viewpoints=viewpoints,
                       affine_seed=affine_seed, **changes)  # fmt: skip
    splits = load_splits(data)
    check_class_names(payload, splits.info.class_names, f"the {config.dataset} data in {data.root}", path)
    torch_device = resolve_device(device)
    model = build_model(model_config)
    model.load_state_dict(payload["model"])
    model.to(torch_device).eval()
    state = payload.get("state", {})
    split_name = data.split if data.test_viewpoints == "novel" else f"{data.split}-familiar"
    return LoadedCheckpoint(
        path=path, config=config, model_config=model_config, model=model, test_set=splits.test, info=splits.info,
        split=split_name, step=int(state.get("step", 0)), epoch=epoch_of_last_step(state), device=torch_device,
    )  # fmt: skip


def evaluate_checkpoint(
    target: str | Path,
    which: str = "best",
    split: str | None = None,
    data_root: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    crops: int = 1,
    viewpoints: str = "novel",
    affine_seed: int = AFFINE_SEED,
    mirrored: bool = False,
) -> TestReport:
    """Score the checkpoint ``target`` (a run directory + ``which``, or a ``.pt`` file) on its test set.

    Args:
        target: Run directory or checkpoint file.
        which: ``best`` or ``last`` (for a run directory).
        split: ``standard``, ``azimuth``, ``elevation`` or ``affine`` (default: the one trained on).
        data_root: Where the prepared data are (default: the training run's).
        batch_size: Images per forward pass (each crop counts as an image).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: Data-loader workers.
        progress: Show a progress bar.
        crops: 1, or 13: average the class scores of the centre crop and 12 diagonal shifts
            (:mod:`matcaps.data.crops`).
        viewpoints: With a viewpoint split, score the ``novel`` or the ``familiar`` test viewpoints.
        affine_seed: Seed of the ``affine`` test set.
        mirrored: Also average the class scores of every window mirrored left-right (the test-time
            counterpart of ``--hflip`` training).
    """
    offsets = crop_offsets(crops)
    loaded = load_for_testing(target, which, split, data_root, device, viewpoints, affine_seed)
    test_set = loaded.test_set
    views = 1
    if crops > 1 or mirrored:
        test_set = copy.copy(test_set)
        test_set.transform = MultiCropTransform(test_set.transform, offsets, mirrored)
        views = test_set.transform.views
    counts = evaluate_model(
        loaded.model, test_set, loaded.model_config.num_classes, batch_size=max(1, batch_size // views),
        margin=loaded.config.margin_schedule()(loaded.step), device=loaded.device, workers=workers,
        progress=progress, description=f"test {loaded.split}",
    )  # fmt: skip
    names = list(loaded.info.class_names)
    return TestReport(
        dataset=loaded.config.dataset, split=loaded.split, checkpoint=str(loaded.path), step=loaded.step,
        epoch=loaded.epoch, num_images=counts.total, accuracy=counts.accuracy,
        error_rate=1.0 - counts.accuracy, loss=counts.loss, class_names=names,
        per_class_accuracy=dict(zip(names, counts.per_class_accuracy())),
        confusion_matrix=counts.confusion.tolist(), crops=crops,
        affine_seed=affine_seed if loaded.split == "affine" else None, mirrored=mirrored,
    )  # fmt: skip


def format_report(report: TestReport) -> str:
    """The report as text: accuracy, per-class accuracy and the confusion matrix."""
    names = report.class_names
    width = max(8, *(len(n) for n in names))
    lines = [
        f"{report.dataset} {report.split} test set, {report.num_images} images"
        f"{f' ({report.views_text()} each)' if report.crops > 1 or report.mirrored else ''}, "
        f"checkpoint {report.checkpoint} "
        f"(step {report.step}, epoch {report.epoch}): accuracy {report.accuracy:.4f} "
        f"(error {100 * report.error_rate:.2f} %), loss {report.loss:.4f}",
        "per-class accuracy:",
        *(f"  {name:<{width}} {value:.4f}" for name, value in report.per_class_accuracy.items()),
        "confusion matrix (rows: true class, columns: predicted):",
        " " * (width + 2) + " ".join(f"{name[:width]:>{width}}" for name in names),
        *(f"  {name:<{width}}" + " ".join(f"{count:>{width}d}" for count in row)
          for name, row in zip(names, report.confusion_matrix)),
    ]  # fmt: skip
    return "\n".join(lines)


def plot_confusion(report: TestReport, path: str | Path) -> Path:
    """Draw the confusion matrix (row-normalised colours, counts written in the cells) to a PNG."""
    plt = pyplot()

    counts = torch.tensor(report.confusion_matrix, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.7 * len(report.class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(report.class_names))
    axes.set_xticks(ticks, report.class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, report.class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    views = f", {report.views_text()}" if report.crops > 1 or report.mirrored else ""
    axes.set_title(f"{report.dataset} {report.split} test set{views}\n{Path(report.checkpoint).name} "
                   f"(step {report.step}, epoch {report.epoch}): accuracy {100 * report.accuracy:.2f} %", fontsize=9)
    for row in ticks:
        for column in ticks:
            colour = "white" if rates[row, column] > 0.5 else "black"
            axes.text(column, row, int(counts[row, column]), ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    figure.tight_layout()
    return save_and_close(figure, path, dpi=120)


def save_report(report: TestReport, directory: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``test-<split>-<checkpoint>.json`` and ``confusion-<split>-<checkpoint>.png``; returns both paths."""
    checkpoint = Path(report.checkpoint)
    directory = Path(directory) if directory is not None else checkpoint.parent
    stem = f"{report.split}-{checkpoint.stem}" + (f"-{report.crops}crops" if report.crops > 1 else "")
    stem += "-mirrored" if report.mirrored else ""
    json_path, png_path = directory / f"test-{stem}.json", directory / f"confusion-{stem}.png"
    plot_confusion(report, png_path)
    values = {**report.to_dict(), "confusion_png": str(png_path)}
    json_path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return json_path, png_path
