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
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matcaps.errors import CheckpointError
from matcaps.fsutil import fsync_directory

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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a matcaps checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


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
