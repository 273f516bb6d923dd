"""Run directories: creating one, writing its configuration, training or resuming into it.

Layout of ``RUN/``:

* ``config.toml``: the full resolved :class:`~matcaps.train.config.TrainConfig`
  (``matcaps train --config RUN/config.toml`` trains the same run again); a resume that
  changes options (``--epochs``, ``--max-steps``, …) rewrites it and records the change in
  its header comments;
* ``run.json``: the resolved network, world size, versions, start time;
* ``last.pt`` / ``best.pt``: checkpoints (latest; best validation accuracy);
* ``metrics.jsonl``: one JSON record per logged step; ``tensorboard/``: event files;
* after ``matcaps test``/``matcaps plot``: ``test-<split>-<checkpoint>.json``,
  ``confusion-<split>-<checkpoint>.png``, ``curves.png``.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from matcaps import __version__
from matcaps.errors import CheckpointError, ConfigError
from matcaps.fsutil import write_text_atomic
from matcaps.models import CapsNetConfig, count_parameters
from matcaps.train.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, DamagedCheckpointError, load_checkpoint
from matcaps.train.config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    holdout_mismatch,
    load_config_file,
    save_config,
    to_toml,
)
from matcaps.distributed import DistributedContext
from matcaps.train.metrics import METRICS_FILE
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

    A directory that already holds a run, or the files of one, is refused (nothing in it is
    overwritten or appended to): resume it with ``--resume`` when it has a checkpoint.
    """
    path = Path(run_dir) if run_dir is not None else Path(runs_root) / (name or default_run_name(dataset))
    if (path / LAST_CHECKPOINT).exists():
        raise ConfigError(f"run directory {path} already holds a run; continue it with --resume {path} "
                          "or choose another --run-dir/--name")
    if (path / CONFIG_FILE).exists():
        raise ConfigError(f"run directory {path} holds a run that stopped before its first checkpoint; choose "
                          f"another --run-dir/--name (its options: --config {path / CONFIG_FILE})")
    leftovers = [name for name in (METRICS_FILE, BEST_CHECKPOINT) if (path / name).exists()]
    if leftovers:
        raise ConfigError(f"run directory {path} already holds {' and '.join(leftovers)} of another run; "
                          "choose another --run-dir/--name")
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


def merge_resume_overrides(
    saved: TrainConfig, overrides: dict[str, Any], names: Mapping[str, str] | None = None
) -> TrainConfig:
    """The saved configuration with the options a resumed run may change (others refused).

    ``names`` maps option keys to the way the user wrote them (``batch_size`` → ``--batch-size``)
    for the error message; keys are shown as they are otherwise.
    """
    names = names or {}
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_CHANGES and getattr(saved, k) != v)
    if changed:
        raise ConfigError(f"cannot change {', '.join(names.get(k, k) for k in changed)} when resuming (only "
                          f"{', '.join(sorted(names.get(k, k) for k in RESUMABLE_CHANGES))} may change)")
    return saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE_CHANGES})


def describe_progress(epoch: int, batch_in_epoch: int, steps_per_epoch: int | None = None) -> str:
    """Where a run stands, for people: epochs count from 1 (``epoch`` is the 0-based counter of the checkpoint).

    ``(2, 0, 10)`` → ``"2 epochs completed"``; ``(0, 7, 10)`` → ``"epoch 1, 7 of 10 batches done"``
    (``"epoch 1, 7 batches done"`` without ``steps_per_epoch``).
    """
    if steps_per_epoch is not None and batch_in_epoch >= steps_per_epoch:  # complete, counter not yet advanced
        epoch, batch_in_epoch = epoch + 1, 0
    if batch_in_epoch == 0:
        return f"{epoch} epoch{'' if epoch == 1 else 's'} completed"
    of_all = f" of {steps_per_epoch}" if steps_per_epoch is not None else ""
    return f"epoch {epoch + 1}, {batch_in_epoch}{of_all} batch{'' if batch_in_epoch == 1 else 'es'} done"


def epoch_of_last_step(state: Mapping[str, Any]) -> int:
    """The epoch, counted from 1, in which a checkpoint's last step was taken (0 before any step).

    ``state`` is a checkpoint's ``state`` dict, whose ``epoch`` counter is 0-based and advances
    after an epoch's last step: ``epoch 2, batch 0`` follows the last step of epoch 2;
    ``epoch 0, batch 10`` (``best.pt`` written by the validation closing epoch 1) and
    ``epoch 1, batch 3`` are in epochs 1 and 2.
    """
    epoch, batch = int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0))
    return epoch + 1 if batch > 0 else epoch


def record_resume(run_dir: Path, config: TrainConfig, step: int) -> None:
    """Rewrite ``RUN/config.toml`` with the resumed run's configuration, adding a comment line on the resume.

    So ``matcaps train --config RUN/config.toml`` still trains the same run (e.g. for the
    ``--epochs`` given when resuming), and the file tells which options changed when.
    """
    path = run_dir / CONFIG_FILE
    saved = read_run_config(run_dir).to_dict()
    current = config.to_dict()
    changes = [f"{key} {saved[key]!r} -> {value!r}" for key, value in current.items() if saved[key] != value]
    lines = path.read_text(encoding="utf-8").splitlines()
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    header.append(f"# resumed at step {step} on {when}" + (f": {', '.join(changes)}" if changes else ""))
    write_text_atomic(path, "\n".join(header) + "\n" + to_toml(current))


def _load_resume_checkpoint(run_dir: Path, trainer: Trainer) -> None:
    """Load ``RUN/last.pt`` into ``trainer``; a damaged file says how to use the run's ``best.pt``."""
    path = run_dir / LAST_CHECKPOINT
    if not path.exists() and not (run_dir / BEST_CHECKPOINT).exists():
        raise CheckpointError(f"{run_dir} stopped before its first checkpoint: nothing to resume; train it again "
                              f"with --config {run_dir / CONFIG_FILE} and another --run-dir")
    try:
        payload = load_checkpoint(path, map_location=trainer.device)
    except DamagedCheckpointError as error:
        if error.alternative is None:
            raise
        raise CheckpointError(f"{error}: copy it to {path} to resume from step {error.alternative_step}") from None
    try:
        trainer.load_checkpoint(payload)
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} lacks {error}; it was not written by matcaps train") from None
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def write_run_files(run_dir: Path, config: TrainConfig, model_config: CapsNetConfig, context: DistributedContext,
                    extra: dict[str, Any] | None = None) -> None:
    """``config.toml`` and ``run.json`` of a new run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE, header=f"matcaps {__version__} training configuration; "
                f"reproduce with: matcaps train --config {run_dir.resolve() / CONFIG_FILE}")
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
    stop_requested: Callable[[], str | None] | None = None,
    class_names: Sequence[str] | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue from ``RUN/last.pt``) into ``run_dir``.

    Every process calls this; only the main one writes files.  ``stop_requested`` is asked after
    every step; once it names a reason (e.g. ``StopSignals().requested``), training stops there with
    a checkpoint, as at ``config.max_minutes``.  ``class_names`` (the data's, in label order) go into
    every checkpoint; on resume they must equal the checkpoint's.
    """
    run_dir = Path(run_dir)
    trainer = Trainer(config, model_config, train_set, val_set, run_dir=run_dir, context=context, step_hook=step_hook,
                      stop_requested=stop_requested, class_names=class_names)  # fmt: skip
    if not resume and config.init_from is not None:
        initial = trainer.load_initial_weights(config.init_from)
        changed = f" (routing changed: {', '.join(initial.routing_changes)})" if initial.routing_changes else ""
        trainer.log(f"starting from the weights of {initial.path}{changed}")
        mismatch = holdout_mismatch(initial.source_config, config)
        if mismatch is not None:
            trainer.log(mismatch)
    if resume:
        _load_resume_checkpoint(run_dir, trainer)
        state = trainer.state
        progress = describe_progress(state.epoch, state.batch_in_epoch, trainer.steps_per_epoch)
        validation_due = val_set is not None and config.val_every > 0 and state.validated_step != state.step
        if state.step >= trainer.total_steps and not validation_due:
            trainer.log(f"{run_dir} is already finished (step {state.step} of {trainer.total_steps}, {progress}); "
                        "nothing to do: resume with a larger --epochs or --max-steps to train longer")
            return TrainResult(
                step=state.step, epoch=state.epoch, skipped_steps=state.skipped_steps,
                best_val_accuracy=state.best_val_accuracy if state.best_step >= 0 else None,
                last_val_accuracy=None, last_train_loss=None, run_dir=run_dir, batch_in_epoch=state.batch_in_epoch,
            )  # fmt: skip
        if trainer.context.is_main:
            record_resume(run_dir, config, state.step)
        trainer.log(f"resuming {run_dir} at step {state.step} ({progress})")
    elif trainer.context.is_main:
        info = {"parameters": count_parameters(trainer.model), **(extra_info or {})}
        write_run_files(run_dir, config, model_config, trainer.context, info)
    return trainer.fit()
