"""Generalisation to novel viewpoints at matched familiar-viewpoint error (Hinton et al. 2018, Table 2).

The paper trains the capsule network and the CNN baseline on smallNORB images from a few
viewpoints only (azimuths 300–40°, or the 3 lowest elevations), stops each network when its error
on the *test* images at those familiar viewpoints reaches the same value, and only then compares the
errors on the novel viewpoints: a fair comparison of viewpoint generalisation needs equal
familiar-viewpoint performance.

:func:`train_to_familiar_error` does this for one network: it trains in chunks of ``check_every``
steps (each chunk resumes the previous one exactly, through ``last.pt``), scores the
familiar-viewpoint test images after each chunk, and stops at the first check whose error is at most
the target (or at ``max_steps``); then it scores the novel viewpoints with the same checkpoint.
:func:`run_protocol` does it for several networks and writes ``viewpoints-<split>.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from matcaps.data import load_splits
from matcaps.data.splits import VIEWPOINT_SPLITS
from matcaps.errors import ConfigError
from matcaps.fsutil import write_text_atomic
from matcaps.models import build_model
from matcaps.scoring import evaluate_model
from matcaps.train.checkpoint import LAST_CHECKPOINT, load_checkpoint
from matcaps.train.config import TrainConfig, data_config, default_model_name, resolve_model_config
from matcaps.train.run import train_run

#: File the protocol's results are written to, in its output directory.
REPORT_NAME = "viewpoints-{split}.json"


@dataclass(frozen=True)
class ViewpointSettings:
    """The protocol's parameters.

    Attributes:
        split: ``azimuth`` or ``elevation``.
        familiar_error: Stop a network once its familiar-viewpoint test error is at most this (0..1).
        check_every: Training steps between two checks.
        max_steps: Give up after this many steps (the network is then reported as not having reached it).
    """

    split: str
    familiar_error: float
    check_every: int
    max_steps: int

    def __post_init__(self) -> None:
        if self.split not in VIEWPOINT_SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(VIEWPOINT_SPLITS)}, got {self.split!r}")
        if not 0 <= self.familiar_error <= 1:
            raise ConfigError(f"--familiar-error must be between 0 and 1, got {self.familiar_error}")
        if self.check_every < 1:
            raise ConfigError(f"--check-every must be at least 1, got {self.check_every}")
        if self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")


@dataclass
class ViewpointResult:
    """One network's outcome.

    Attributes:
        label: Its name in the report.
        run_dir: Its run directory (``last.pt`` is the checkpoint scored).
        model: The model name (capsule preset or ``cnn-baseline``).
        steps: Steps trained when it stopped.
        reached: Whether the familiar error reached the target (else ``max_steps`` stopped it).
        familiar_error, novel_error: Test errors on the familiar and the novel viewpoints.
        familiar_images, novel_images: Their numbers of test images.
        checks: ``[step, familiar error]`` of every check.
    """

    label: str
    run_dir: str
    model: str
    steps: int
    reached: bool
    familiar_error: float
    novel_error: float
    familiar_images: int
    novel_images: int
    checks: list[list[float]] = field(default_factory=list)


def _score(model: torch.nn.Module, dataset, num_classes: int, config: TrainConfig, device: torch.device) -> tuple[float, int]:
    """(error, images) of ``model`` on ``dataset``."""
    counts = evaluate_model(model, dataset, num_classes, batch_size=config.val_batch_size, device=device,
                            workers=config.workers)  # fmt: skip
    return 1.0 - counts.accuracy, counts.total


def train_to_familiar_error(
    config: TrainConfig,
    run_dir: str | Path,
    settings: ViewpointSettings,
    label: str | None = None,
    log: Callable[[str], None] = print,
) -> ViewpointResult:
    """Train ``config`` on the familiar viewpoints of ``settings.split`` until the target error (see the module)."""
    from matcaps.distributed import resolve_device

    run_dir = Path(run_dir)
    config = config.replace(split=settings.split)
    splits = load_splits(data_config(config))
    familiar = load_splits(data_config(config, validation=False, test_viewpoints="familiar")).test
    novel = load_splits(data_config(config, validation=False)).test
    info = splits.info
    model_config = resolve_model_config(config, info.num_classes, info.image_size, info.channels)
    device = resolve_device(config.device)
    checks: list[list[float]] = []
    step, error = 0, 1.0
    while True:
        step = min(step + settings.check_every, settings.max_steps)
        train_run(config.replace(max_steps=step), model_config, splits.train, splits.val, run_dir, resume=bool(checks))
        payload = load_checkpoint(run_dir / LAST_CHECKPOINT, map_location=device)
        model = build_model(model_config)
        model.load_state_dict(payload["model"])
        model.to(device)
        error, familiar_images = _score(model, familiar, info.num_classes, config, device)
        checks.append([step, error])
        log(f"{label or run_dir.name}: step {step}, familiar-viewpoint test error {100 * error:.2f} % "
            f"(target {100 * settings.familiar_error:.2f} %)")  # fmt: skip
        if error <= settings.familiar_error or step >= settings.max_steps:
            break
    novel_error, novel_images = _score(model, novel, info.num_classes, config, device)
    return ViewpointResult(
        label=label or run_dir.name, run_dir=str(run_dir), model=config.model or default_model_name(config.dataset),
        steps=step, reached=error <= settings.familiar_error, familiar_error=error, novel_error=novel_error,
        familiar_images=familiar_images, novel_images=novel_images, checks=checks,
    )  # fmt: skip


def run_protocol(
    configs: Sequence[tuple[str, TrainConfig]],
    settings: ViewpointSettings,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> tuple[list[ViewpointResult], Path]:
    """Train every ``(label, config)`` into ``out_dir/label`` to the familiar error; write and return the report."""
    out_dir = Path(out_dir)
    labels = [label for label, _ in configs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"the networks need different names, got {', '.join(labels)}")
    for label, _ in configs:
        if (out_dir / label).exists():
            raise ConfigError(f"{out_dir / label} already exists; choose another output directory")
    results = [train_to_familiar_error(config, out_dir / label, settings, label, log) for label, config in configs]
    report = {
        "protocol": "Hinton et al. 2018, Table 2: train on the familiar viewpoints, stop at a familiar-viewpoint "
                    "test error, report the novel-viewpoint test error",
        "settings": asdict(settings),
        "dataset": configs[0][1].dataset if configs else None,
        "results": [asdict(result) for result in results],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    path = out_dir / REPORT_NAME.format(split=settings.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return results, path


def format_results(results: Sequence[ViewpointResult], settings: ViewpointSettings) -> str:
    """A table: network, steps, familiar and novel errors."""
    lines = [
        f"novel viewpoints ({settings.split}) at a familiar-viewpoint test error of at most "
        f"{100 * settings.familiar_error:.2f} %:",
        f"{'network':<20} {'steps':>7} {'reached':>7} {'familiar error':>14} {'novel error':>11}",
    ]
    for r in results:
        lines.append(f"{r.label:<20} {r.steps:>7} {'yes' if r.reached else 'no':>7} "
                     f"{100 * r.familiar_error:>12.2f} % {100 * r.novel_error:>9.2f} %")  # fmt: skip
    return "\n".join(lines)


def config_label(config: TrainConfig, source: Path | None = None) -> str:
    """The name of a network in the protocol: its configuration file's stem, else its model name."""
    if source is not None:
        return source.stem
    return config.model or default_model_name(config.dataset)

