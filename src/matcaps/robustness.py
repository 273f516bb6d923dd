"""``matcaps attack``: FGSM and BIM against a trained network over a list of ε, with a report and a plot.

:func:`attack_checkpoint` loads a checkpoint and its test set (the whole set, or a seeded subset of
``limit`` images), runs every requested attack (:mod:`matcaps.adversarial`) at every ε and counts,
per (method, mode, ε), the images still classified correctly and, for targeted attacks, those
classified as their target.  The target of each image is drawn once, uniformly among the wrong
classes, from the subset's seed, and is the same for every method and ε.  :func:`plot_attack_reports`
draws one or several reports on one figure (accuracy under untargeted attacks on the left,
targeted success rate on the right), e.g. capsules beside the CNN as in Hinton et al.'s Figure 3.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from matcaps.adversarial import (
    ATTACK_LOSSES,
    ATTACK_METHODS,
    ATTACK_MODES,
    PIXEL_HIGH,
    PIXEL_LOW,
    PixelModel,
    bim,
    check_epsilon,
    fgsm_from_gradient,
    input_gradient,
)
from matcaps.data.transforms import PIXEL_SCALE
from matcaps.errors import CheckpointError, ConfigError
from matcaps.evaluate import LoadedCheckpoint
from matcaps.figures import pyplot, save_and_close
from matcaps.fsutil import write_text_atomic
from matcaps.models import CapsNetConfig, count_parameters

#: ε of ``matcaps attack`` by default ([0, 1] pixel units; 0.1 = 25.5 grey levels).
DEFAULT_EPSILONS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
#: BIM iterations by default.
DEFAULT_BIM_ITERATIONS = 10
#: BIM step size by default, as a multiple of ε / iterations (Madry et al. 2018's 2.5: the ε-ball's
#: boundary can be reached and the path can still turn).
BIM_STEP_FACTOR = 2.5
#: What ε means, written into every report.
EPSILON_UNITS = (
    "epsilon is the largest change of one pixel on the [0, 1] scale of the raw image (intensity / 255), made "
    "before the per-image standardisation (which is part of the attacked function); epsilon = 0.1 is 25.5 of 255 "
    "grey levels; adversarial pixels are clipped to [0, 1]. smallNORB: the pixels of the 48x48 image resized "
    "from 96x96 (before standardisation and the 32x32 crop)"
)


@dataclass(frozen=True)
class AttackSettings:
    """What to run.

    Attributes:
        methods: Subset of ``fgsm``, ``bim``.
        modes: Subset of ``untargeted``, ``targeted``.
        epsilons: Sizes of the perturbation, in ``[0, 1]`` pixel units.
        bim_iterations: BIM steps.
        bim_step_size: BIM step in pixel units (None: ``2.5 · ε / bim_iterations``).
        loss: ``cross-entropy`` or ``margin`` (see :mod:`matcaps.adversarial`).
        limit: Attack a seeded random subset of this many test images (None: all).
        seed: Seeds the subset and the targets.
    """

    methods: tuple[str, ...] = ATTACK_METHODS
    modes: tuple[str, ...] = ATTACK_MODES
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    bim_iterations: int = DEFAULT_BIM_ITERATIONS
    bim_step_size: float | None = None
    loss: str = "cross-entropy"
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, values, known in (("method", self.methods, ATTACK_METHODS), ("mode", self.modes, ATTACK_MODES)):
            if not values:
                raise ConfigError(f"give at least one attack {name}")
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ConfigError(f"unknown attack {name} {unknown[0]!r}; choose from {', '.join(known)}")
        if not self.epsilons:
            raise ConfigError("give at least one epsilon")
        for epsilon in self.epsilons:
            check_epsilon(epsilon)
        if self.bim_iterations < 1:
            raise ConfigError(f"--bim-iterations must be at least 1, got {self.bim_iterations}")
        if self.bim_step_size is not None and not 0 < self.bim_step_size <= 1:
            raise ConfigError(f"--bim-step-size must be in (0, 1], got {self.bim_step_size}")
        if self.loss not in ATTACK_LOSSES:
            raise ConfigError(f"unknown attack loss {self.loss!r}; choose from {', '.join(ATTACK_LOSSES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")

    def step_size(self, epsilon: float) -> float:
        """BIM's step for ``epsilon``."""
        if self.bim_step_size is not None:
            return self.bim_step_size
        return BIM_STEP_FACTOR * epsilon / self.bim_iterations


@dataclass
class AttackReport:
    """The result of :func:`attack_checkpoint` (saved as JSON; :meth:`from_dict` reads it back).

    ``results`` holds one record per (method, mode, ε): ``accuracy`` (fraction of the attacked images
    still classified as their label), ``success_rate`` (targeted: fraction classified as their target;
    None for untargeted attacks), the counts behind them, the BIM step and iterations.
    """

    label: str
    checkpoint: str
    dataset: str
    split: str
    network: str
    parameters: int
    step: int
    num_classes: int
    num_images: int
    test_set_size: int
    subset_seed: int
    subset_indices: list[int] | None
    clean_accuracy: float
    loss: str
    bim_iterations: int
    bim_step_size: str
    targets: str
    results: list[dict[str, Any]]
    pixel_range: tuple[float, float] = (PIXEL_LOW, PIXEL_HIGH)
    epsilon_units: str = EPSILON_UNITS
    device: str = "cpu"
    wall_seconds: float = 0.0
    evaluated: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "attack report") -> "AttackReport":
        known = {f for f in cls.__dataclass_fields__}
        try:
            report = cls(**{k: v for k, v in values.items() if k in known})
        except TypeError as error:
            raise CheckpointError(f"{source} is not an attack report: {error}") from None
        if not isinstance(report.results, list) or not all(isinstance(r, dict) for r in report.results):
            raise CheckpointError(f"{source} is not an attack report: its results are not a list of records")
        return report

    def result(self, method: str, mode: str, epsilon: float) -> dict[str, Any]:
        """The record of one attack."""
        for record in self.results:
            if (record["method"], record["mode"]) == (method, mode) and math.isclose(record["epsilon"], epsilon):
                return record
        raise KeyError((method, mode, epsilon))


def describe_network(loaded: LoadedCheckpoint) -> str:
    """E.g. ``capsules (2 routing iterations)`` or ``cnn-baseline``."""
    if isinstance(loaded.model_config, CapsNetConfig):
        return f"capsules ({loaded.model_config.routing.iterations} routing iterations)"
    return getattr(loaded.model_config, "architecture", type(loaded.model).__name__)


class _PixelsOnly:
    """A test transform's first half: the item is the ``[0, 1]`` image, not yet standardised."""

    def __init__(self, base: Any) -> None:
        if not hasattr(base, "pixels") or not hasattr(base, "normalise"):
            raise ConfigError(f"the test transform {type(base).__name__} cannot be attacked in pixel space")
        self.base = base
        self.random = bool(getattr(base, "random", False))

    def __call__(self, image: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.base.pixels(image, generator)


def choose_subset(size: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the attacked images: all, or ``limit`` drawn without replacement with ``seed``."""
    if limit is None or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=limit, replace=False))


def choose_targets(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """One target per image, uniform among the ``K − 1`` classes other than its label."""
    shifts = np.random.default_rng([seed, 1]).integers(1, num_classes, size=len(labels))
    return (labels + shifts) % num_classes


def attack_checkpoint(
    loaded: LoadedCheckpoint,
    settings: AttackSettings,
    batch_size: int = 100,
    workers: int = 0,
    progress: bool = True,
    label: str | None = None,
) -> AttackReport:
    """Run every attack of ``settings`` at every ε on ``loaded``'s test set (or its seeded subset)."""
    started = time.monotonic()
    model = loaded.model.eval()
    pixel_set = copy.copy(loaded.test_set)
    pixel_set.transform = _PixelsOnly(loaded.test_set.transform)
    attacked_model = PixelModel(model, pixel_set.transform.base.normalise).eval()
    num_classes = loaded.model_config.num_classes
    indices = choose_subset(len(pixel_set), settings.limit, settings.seed)
    labels_all = np.asarray(pixel_set.labels)[indices]
    targets_all = choose_targets(labels_all, num_classes, settings.seed)
    keys = [(method, mode, float(eps)) for method in settings.methods for mode in settings.modes
            for eps in settings.epsilons]  # fmt: skip
    correct = {key: 0 for key in keys}
    hits = {key: 0 for key in keys}
    clean_correct = 0
    loader = DataLoader(Subset(pixel_set, indices.tolist()), batch_size=batch_size, shuffle=False, num_workers=workers)
    batches: Any = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"attack {loaded.split}", leave=False, dynamic_ncols=True)

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return attacked_model(images).argmax(dim=1)

    start = 0
    for pixels, labels in batches:
        pixels = pixels.to(loaded.device)
        labels = labels.to(loaded.device).long()
        targets = torch.as_tensor(targets_all[start : start + len(labels)], device=loaded.device).long()
        start += len(labels)
        clean_predictions = predict(pixels)
        clean_correct += int((clean_predictions == labels).sum())
        for mode in settings.modes:
            targeted = mode == "targeted"
            classes = targets if targeted else labels
            for method in settings.methods:
                gradient = input_gradient(attacked_model, pixels, classes, settings.loss) if method == "fgsm" else None
                for eps in settings.epsilons:
                    if eps == 0:
                        predictions = clean_predictions
                    elif method == "fgsm":
                        predictions = predict(fgsm_from_gradient(pixels, gradient, eps, targeted))
                    else:
                        adversarial = bim(attacked_model, pixels, classes, eps, settings.bim_iterations,
                                          settings.step_size(eps), targeted, settings.loss)  # fmt: skip
                        predictions = predict(adversarial)
                    key = (method, mode, float(eps))
                    correct[key] += int((predictions == labels).sum())
                    hits[key] += int((predictions == targets).sum())
    total = len(indices)
    results = []
    for method, mode, eps in keys:
        key = (method, mode, eps)
        results.append({
            "method": method, "mode": mode, "epsilon": eps, "epsilon_grey_levels": eps * PIXEL_SCALE,
            "iterations": settings.bim_iterations if method == "bim" else 1,
            "step_size": settings.step_size(eps) if method == "bim" else eps,
            "images": total, "correct": correct[key], "accuracy": correct[key] / max(total, 1),
            "target_hits": hits[key] if mode == "targeted" else None,
            "success_rate": hits[key] / max(total, 1) if mode == "targeted" else None,
        })  # fmt: skip
    step_rule = (f"{settings.bim_step_size:g}" if settings.bim_step_size is not None
                 else f"{BIM_STEP_FACTOR:g} * epsilon / {settings.bim_iterations}")  # fmt: skip
    subset = indices.tolist() if settings.limit is not None and settings.limit < len(pixel_set) else None
    return AttackReport(
        label=label or loaded.path.parent.name, checkpoint=str(loaded.path), dataset=loaded.config.dataset,
        split=loaded.split, network=describe_network(loaded), parameters=count_parameters(model), step=loaded.step,
        num_classes=num_classes, num_images=total, test_set_size=len(pixel_set), subset_seed=settings.seed,
        subset_indices=subset, clean_accuracy=clean_correct / max(total, 1), loss=settings.loss,
        bim_iterations=settings.bim_iterations, bim_step_size=step_rule,
        targets=f"one per image, uniform among the {num_classes - 1} wrong classes (numpy default_rng([{settings.seed}, 1]))",
        results=results, device=str(loaded.device), wall_seconds=time.monotonic() - started,
    )  # fmt: skip


def format_attack_report(report: AttackReport) -> str:
    """The report as a table: one line per (method, mode, ε)."""
    subset = (f"{report.num_images} of {report.test_set_size} test images (seed {report.subset_seed})"
              if report.subset_indices is not None else f"all {report.num_images} test images")  # fmt: skip
    lines = [
        f"{report.label}: {report.network}, {report.dataset} {report.split}, {subset}, checkpoint {report.checkpoint} "
        f"(step {report.step}); clean accuracy {report.clean_accuracy:.4f}; loss {report.loss}; "
        f"BIM {report.bim_iterations} iterations of {report.bim_step_size}",
        f"{'method':<6} {'mode':<10} {'epsilon':>7} {'grey levels':>11} {'accuracy':>8} {'target success':>14}",
    ]
    for r in report.results:
        success = "-" if r["success_rate"] is None else f"{r['success_rate']:.4f}"
        lines.append(f"{r['method']:<6} {r['mode']:<10} {r['epsilon']:>7.3f} {r['epsilon_grey_levels']:>11.1f} "
                     f"{r['accuracy']:>8.4f} {success:>14}")  # fmt: skip
    return "\n".join(lines)


def report_path(report: AttackReport, directory: str | Path | None = None) -> Path:
    """``attack-<split>-<checkpoint>.json`` in ``directory`` (default: next to the checkpoint)."""
    checkpoint = Path(report.checkpoint)
    folder = Path(directory) if directory is not None else checkpoint.parent
    return folder / f"attack-{report.split}-{checkpoint.stem}.json"


def save_attack_report(report: AttackReport, path: str | Path | None = None) -> Path:
    """Write the report as JSON (atomically); returns its path."""
    path = Path(path) if path is not None else report_path(report)
    write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def load_attack_report(path: str | Path) -> AttackReport:
    """Read a report written by :func:`save_attack_report`."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read attack report {path}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"attack report {path} is not JSON: {error}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"attack report {path} is not a JSON object")
    return AttackReport.from_dict(values, f"attack report {path}")


#: Line style per attack method in the plots.
METHOD_STYLES = {"fgsm": "-", "bim": "--"}


def plot_attack_reports(reports: Sequence[AttackReport], path: str | Path) -> Path:
    """Accuracy under untargeted attacks (left) and targeted success rate (right) against ε, every report
    and method on the same axes; chance (1/K) is drawn as a dotted line."""
    plt = pyplot()

    modes = [mode for mode in ATTACK_MODES if any(r["mode"] == mode for report in reports for r in report.results)]
    figure, axes_list = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, mode in zip(axes_list[0], modes):
        metric = "success_rate" if mode == "targeted" else "accuracy"
        for index, report in enumerate(reports):
            for method in ATTACK_METHODS:
                records = sorted((r for r in report.results if r["mode"] == mode and r["method"] == method),
                                 key=lambda r: r["epsilon"])  # fmt: skip
                if records:
                    axes.plot([r["epsilon"] for r in records], [100 * r[metric] for r in records],
                              METHOD_STYLES[method], marker="o", markersize=3, color=colours[index % len(colours)],
                              label=f"{report.label} {method.upper()}")  # fmt: skip
        if mode == "untargeted":
            classes = {report.num_classes for report in reports}
            for count in classes:
                axes.axhline(100 / count, linestyle=":", color="grey", linewidth=1, label=f"chance (1/{count})")
        axes.set_xlabel("ε (pixel units of [0, 1]; ×255 = grey levels)")
        axes.set_ylabel("accuracy (%)" if mode == "untargeted" else "targeted success rate (%)")
        axes.set_title(f"{mode} attacks")
        axes.set_ylim(-2, 102)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    images = sorted({report.num_images for report in reports})
    datasets = sorted({f"{report.dataset} {report.split}" for report in reports})
    figure.suptitle(f"{', '.join(datasets)}: {' / '.join(map(str, images))} test images, white-box FGSM and BIM")
    figure.tight_layout()
    return save_and_close(figure, path, dpi=120)
