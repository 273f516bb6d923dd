"""Checkpoints: written atomically, holding everything needed to resume a run exactly.

A checkpoint is a dict saved with :func:`torch.save`:

* ``model``, ``optimizer``, ``scheduler``: state dicts (the model unwrapped from DDP and
  ``torch.compile``);
* ``step`` (optimizer steps taken, skipped ones included), ``epoch`` and ``batch_in_epoch``
  (the next batch to consume), ``skipped_steps``, ``best_val_accuracy``;
* ``rng``: the states of torch (CPU and CUDA), numpy and python ``random``;
* ``config`` (the :class:`~matcaps.train.config.TrainConfig` dict) and ``model_config``.

RNG states are stored as tensors and plain Python values so the file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matcaps.errors import CheckpointError, ConfigError
from matcaps.fsutil import fsync_directory
from matcaps.models import model_config_from_dict
from matcaps.models.weights import PretrainedWeights, pretrained_checkpoint, pretrained_names, pretrained_weights

#: Bumped when the layout of the checkpoint dict changes incompatibly.
CHECKPOINT_FORMAT = 1
#: File names inside a run directory.
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


def capture_rng_state() -> dict[str, Any]:
    """The states of every random generator a run may use."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    Works whatever device the checkpoint was loaded onto (``torch.load(map_location=...)``
    moves the state tensors too): every generator state is restored from a CPU copy.
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gauss"],
    ))  # fmt: skip
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_cpu_bytes(s) for s in state["cuda"]])


def _cpu_bytes(generator_state: torch.Tensor) -> torch.Tensor:
    """A generator state as the CPU ``uint8`` tensor that ``set_rng_state`` requires."""
    return generator_state.detach().to("cpu", torch.uint8)


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666`` minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomic(payload: Any, path: str | Path) -> None:
    """``torch.save(payload, path)`` so that ``path`` is always a whole file.

    The data go to a temporary file in the same directory, are flushed to disk, and the
    file is renamed over ``path`` (atomic on POSIX); a crash leaves the previous file.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, _default_file_mode())  # mkstemp creates 0600; checkpoints are ordinary files
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)  # make the rename itself durable


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file cannot be read as a matcaps checkpoint (damaged, truncated, empty or foreign).

    Attributes:
        path: The file.
        alternative: The run's other checkpoint (``best.pt`` for ``last.pt`` and vice versa)
            if it exists and is readable, else None.
        alternative_step: The step stored in ``alternative`` (None without one).
    """

    def __init__(self, path: Path, reason: str, alternative: Path | None = None, alternative_step: int | None = None):
        self.path, self.reason = path, reason
        self.alternative, self.alternative_step = alternative, alternative_step
        message = f"checkpoint {path} is damaged or not a matcaps checkpoint ({reason})"
        if alternative is not None:
            message += f"; the run's other checkpoint {alternative} (step {alternative_step}) is readable"
        super().__init__(message)


#: Each checkpoint of a run directory and the other one, pointed to when it is damaged.
OTHER_CHECKPOINT = {LAST_CHECKPOINT: BEST_CHECKPOINT, BEST_CHECKPOINT: LAST_CHECKPOINT}
#: ``torch.save`` writes a zip archive, which starts with a local file header.
ZIP_MAGIC = b"PK\x03\x04"


def _unreadable_reason(path: Path, error: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in words (never torch's advice to load unsafely)."""
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if not head:
        return "the file is empty"
    if head != ZIP_MAGIC:
        return "the file is not a PyTorch checkpoint archive"
    if isinstance(error, pickle.UnpicklingError):  # the weights-only loader refused an object
        return "it holds Python objects that a matcaps checkpoint never contains"
    return "the archive is truncated or corrupted"


def _read_payload(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The checkpoint dict in ``path``; raises :class:`DamagedCheckpointError` (without alternative)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise DamagedCheckpointError(path, _unreadable_reason(path, error)) from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise DamagedCheckpointError(path, "it holds no matcaps checkpoint data")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has matcaps checkpoint format {payload['format']!r}; "
                              f"this version reads format {CHECKPOINT_FORMAT}")
    return payload


def _readable_other_checkpoint(path: Path) -> tuple[Path, int] | None:
    """The run's other checkpoint and its step, if ``path`` is ``last.pt``/``best.pt`` and the other reads."""
    other_name = OTHER_CHECKPOINT.get(path.name)
    if other_name is None or not (path.parent / other_name).is_file():
        return None
    other = path.parent / other_name
    try:
        state = _read_payload(other, "cpu").get("state", {})
    except CheckpointError:
        return None
    return other, int(state.get("step", 0)) if isinstance(state, dict) else 0


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing file raises :class:`CheckpointError`.

    A damaged, truncated, empty or foreign file raises :class:`DamagedCheckpointError`,
    which names the run's other checkpoint (``best.pt`` for ``last.pt`` and vice versa)
    when that one is readable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return _read_payload(path, map_location)
    except DamagedCheckpointError as error:
        other = _readable_other_checkpoint(path)
        if other is None:
            raise
        raise DamagedCheckpointError(path, error.reason, *other) from None


def resolve_checkpoint(target: str | Path, which: str = "best") -> Path:
    """The checkpoint file meant by a run directory (``best``/``last``) or a file path."""
    target = Path(target)
    if target.is_dir():
        names = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
        if which not in names:
            raise CheckpointError(f"unknown checkpoint {which!r}; choose best or last")
        candidate = target / names[which]
        if which == "best" and not candidate.is_file() and (target / LAST_CHECKPOINT).is_file():
            candidate = target / LAST_CHECKPOINT  # a run without validation keeps no best.pt
        if not candidate.is_file():
            raise CheckpointError(f"run directory {target} has no {names[which]}")
        return candidate
    if not target.exists():
        raise CheckpointError(f"{target} is neither a run directory nor a checkpoint file")
    return target


def resolve_target(target: str | Path, which: str = "best") -> tuple[Path, PretrainedWeights | None]:
    """The checkpoint file meant by ``target`` and, for a pretrained name, its registry entry.

    An existing file or directory wins over a pretrained name.

    Raises:
        CheckpointError: ``target`` is none of the three (the message lists the pretrained names).
    """
    path = Path(target)
    if path.exists():
        return resolve_checkpoint(path, which), None
    if str(target) in pretrained_names():
        return pretrained_checkpoint(str(target)), pretrained_weights(str(target))
    raise CheckpointError(f"{target} is neither a run directory nor a checkpoint file nor a pretrained network "
                          f"(pretrained: {', '.join(pretrained_names())})")


def without_implementation(model_config: dict[str, Any]) -> dict[str, Any]:
    """A network's configuration without its routing implementation (all compute the same numbers)."""
    routing = model_config.get("routing")
    if isinstance(routing, dict):
        model_config = {**model_config, "routing": {k: v for k, v in routing.items() if k != "implementation"}}
    return model_config


#: The model-configuration field that holds the routing hyper-parameters: they shape no weight, so a warm
#: start may change them (e.g. train with 2 routing iterations, then fine-tune with 3).
ROUTING_FIELD = "routing"


def _comparable(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_config`` normalised (defaults made explicit), without its routing implementation."""
    return without_implementation(model_config_from_dict(saved).to_dict())


def network_differences(saved: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The top-level fields in which a checkpoint's ``model_config`` differs from ``wanted``
    (``ModelConfig.to_dict()``), the routing implementation and the fields in ``ignore`` left out;
    empty for the same network.

    ``saved`` is normalised first: a checkpoint written before a model option existed holds its
    default implicitly.

    Raises:
        ConfigError, TypeError: ``saved`` is not a valid model configuration.
    """
    saved, wanted = _comparable(saved), without_implementation(wanted)
    return sorted(k for k in saved.keys() | wanted.keys() if k not in ignore and saved.get(k) != wanted.get(k))


def routing_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"name old -> new"`` for each routing hyper-parameter (implementation aside) that ``wanted``
    changes from the checkpoint's ``saved`` model configuration; both as in :func:`network_differences`."""
    before = _comparable(saved).get(ROUTING_FIELD) or {}
    after = without_implementation(wanted).get(ROUTING_FIELD) or {}
    return [f"{name} {before.get(name)} -> {after.get(name)}"
            for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]


@dataclass(frozen=True)
class InitialWeights:
    """The network weights a warm start begins from.

    Attributes:
        path: The checkpoint file read.
        weights: Its model state dict.
        routing_changes: The routing hyper-parameters the new run changes (see :func:`routing_changes`).
        source_config: The training configuration of the source run (``TrainConfig.to_dict()``;
            empty where the file holds none).
    """

    path: Path
    weights: dict[str, torch.Tensor]
    routing_changes: list[str]
    source_config: dict[str, Any] = field(default_factory=dict)


def read_initial_weights(source: str | Path, model_config: dict[str, Any]) -> InitialWeights:
    """The network weights of ``source`` for a warm start of the network ``model_config``.

    Args:
        source: a run directory (its ``best.pt``, else ``last.pt``), a checkpoint file or a pretrained name.
        model_config: ``ModelConfig.to_dict()`` of the network to start; ``source`` must hold the same
            architecture.  The routing hyper-parameters (iterations, inverse temperature, variance
            floor, implementation) may differ: no weight depends on them.

    Raises:
        CheckpointError: ``source`` is not found, unreadable, or holds another architecture.
    """
    path, _ = resolve_target(source, "best")
    payload = load_checkpoint(path)
    try:
        differences = network_differences(payload["model_config"], model_config, ignore=(ROUTING_FIELD,))
        changes = routing_changes(payload["model_config"], model_config)
        weights = payload["model"]
    except KeyError as error:
        raise CheckpointError(f"{path} lacks {error}") from None
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"the model configuration in {path} is invalid: {error}") from None
    if differences:
        raise CheckpointError(f"{path} holds another network than the configured one (differs in "
                              f"{', '.join(differences)})")
    source_config = payload.get("config")
    return InitialWeights(path, weights, changes, dict(source_config) if isinstance(source_config, dict) else {})


#: Checkpoint entry with the names of the training data's classes in label order (checkpoints written
#: before it existed lack it): an image folder's classes are its sub-folders, so a renamed, added or
#: removed folder would silently shift the labels.
CLASS_NAMES_KEY = "class_names"


def check_class_names(payload: dict[str, Any], data_class_names: Sequence[str], data: str, path: str | Path) -> None:
    """Refuse, in one line, data whose classes differ from those the checkpoint at ``path`` was trained on.

    ``data`` names the data in the message (e.g. the image folder).  Checkpoints without
    :data:`CLASS_NAMES_KEY` pass.
    """
    trained = payload.get(CLASS_NAMES_KEY)
    if trained is not None and list(trained) != list(data_class_names):
        raise CheckpointError(
            f"{data} has the classes {', '.join(data_class_names)}, but {path} was trained on "
            f"{', '.join(trained)} (in this label order); scoring or training on it would mix up the labels"
        )


#: Checkpoint entries that scoring, attacking, predicting and warm starts need; the rest (optimizer,
#: scheduler, random-number states) only serves ``--resume``.
WEIGHTS_ONLY_KEYS: tuple[str, ...] = ("format", "model", "state", "config", "model_config", CLASS_NAMES_KEY)


def save_weights_only(payload: dict[str, Any], path: str | Path) -> None:
    """Write the :data:`WEIGHTS_ONLY_KEYS` of a checkpoint ``payload`` to ``path`` (atomically): a
    file about a third of the size that ``matcaps test``/``attack``/``predict`` and ``--init-from``
    read, but that cannot be resumed."""
    save_atomic({key: payload[key] for key in WEIGHTS_ONLY_KEYS if key in payload}, path)
