"""Run directories: creating one, writing its configuration, training or resuming into it.

Layout of ``RUN/``:

* ``config.toml``: the full resolved :class:`~matcaps.train.config.TrainConfig`
  (``matcaps train --config RUN/config.toml`` trains the same run again);
* ``run.json``: the resolved network, world size, versions, start time;
* ``last.pt`` / ``best.pt``: checkpoints (latest; best validation accuracy);
* ``metrics.jsonl``: one JSON record per logged step; ``tensorboard/``: event files;
* after ``matcaps test``/``matcaps plot``: ``test-<split>-<checkpoint>.json``,
  ``confusion-<split>-<checkpoint>.png``, ``curves.png``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from matcaps import __version__
from matcaps.errors import CheckpointError, ConfigError
from matcaps.models import CapsNetConfig, count_parameters
from matcaps.train.checkpoint import LAST_CHECKPOINT, load_checkpoint
from matcaps.train.config import RESUMABLE_CHANGES, TrainConfig, load_config_file, save_config
from matcaps.train.distributed import DistributedContext
from matcaps.train.trainer import StepHook, Trainer, TrainResult

#: Files of a run directory.
CONFIG_FILE = "config.toml"
RUN_INFO_FILE = "run.json"
#: Default parent of the run directories.
DEFAULT_RUNS_ROOT = "runs"


def default_run_name(dataset: str) -> str:
    """``<dataset>-<YYYYmmdd-HHMMSS>``, the name of a run started without ``--name``."""
    return f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def choose_run_dir(run_dir: str | Path | None, runs_root: str | Path, name: str | None, dataset: str) -> Path:
    """``run_dir`` if given, else ``runs_root/name`` (``name`` defaulting to a timestamped one).

    A directory that already holds a run is refused: resume it with ``--resume``.
    """
    path = Path(run_dir) if run_dir is not None else Path(runs_root) / (name or default_run_name(dataset))
    if (path / CONFIG_FILE).exists() or (path / LAST_CHECKPOINT).exists():
        raise ConfigError(f"run directory {path} already holds a run; continue it with --resume {path} "
                          "or choose another --run-dir/--name")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} exists and is not a directory")
    return path


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration saved in a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return TrainConfig.from_dict(load_config_file(path), f"configuration file {path}")


def merge_resume_overrides(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration with the options a resumed run may change (others refused)."""
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_CHANGES and getattr(saved, k) != v)
    if changed:
        raise ConfigError(f"cannot change {', '.join(changed)} when resuming (only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    return saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE_CHANGES})


def write_run_files(run_dir: Path, config: TrainConfig, model_config: CapsNetConfig, context: DistributedContext,
                    extra: dict[str, Any] | None = None) -> None:
    """``config.toml`` and ``run.json`` of a new run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE, header=f"matcaps {__version__} training configuration; "
                f"reproduce with: matcaps train --config {run_dir / CONFIG_FILE}")
    info = {
        "matcaps_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": context.world_size,
        "device": str(context.device),
        "device_name": torch.cuda.get_device_name(context.device) if context.device.type == "cuda" else platform.processor(),
        "model_config": model_config.to_dict(),
        **(extra or {}),
    }
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def train_run(
    config: TrainConfig,
    model_config: CapsNetConfig,
    train_set: Dataset,
    val_set: Dataset | None,
    run_dir: str | Path,
    resume: bool = False,
    context: DistributedContext | None = None,
    step_hook: StepHook | None = None,
    extra_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue from ``RUN/last.pt``) into ``run_dir``.

    Every process calls this; only the main one writes files.
    """
    run_dir = Path(run_dir)
    trainer = Trainer(config, model_config, train_set, val_set, run_dir=run_dir, context=context, step_hook=step_hook)
    if resume:
        trainer.load_checkpoint(load_checkpoint(run_dir / LAST_CHECKPOINT, map_location=trainer.device))
        trainer.log(f"resuming {run_dir} at step {trainer.state.step} (epoch {trainer.state.epoch}, "
                    f"batch {trainer.state.batch_in_epoch})")
    elif trainer.context.is_main:
        info = {"parameters": count_parameters(trainer.model), **(extra_info or {})}
        write_run_files(run_dir, config, model_config, trainer.context, info)
    return trainer.fit()
