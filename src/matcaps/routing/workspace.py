"""Reusable scratch buffers for the fused routing on CPU.

Each routed layer needs a few scratch tensors the size of its votes (hundreds of MB at
batch 64).  On CPU, a fresh allocation that large is served by ``mmap`` and every page is
faulted in on first touch, which costs as much as several passes of arithmetic over the
tensor; PyTorch has no caching allocator on CPU.  The fused implementation therefore
takes its scratch space from this small per-thread pool: a handful of flat buffers,
grown to the largest size asked for and reused by every layer and every step.  On other
devices (CUDA's caching allocator already reuses memory) it allocates normally.

Scratch tensors never escape the function that requested them: nothing returned to the
caller or saved for the backward pass aliases a scratch buffer.  Call
:func:`release_workspace` to give the memory back.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` backed by the pool's buffer ``slot``.

    Two calls with the same ``slot`` return views of the same memory: a caller uses
    distinct slots for buffers that are alive at the same time.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool: dict[tuple[int, torch.dtype], Tensor] = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    key = (slot, dtype)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        pool.pop(key, None)  # free the old buffer before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor, reusable in and out of inference mode
            buffer = torch.empty(numel, dtype=dtype)
        pool[key] = buffer
    return buffer[:numel].view(shape)


def workspace_bytes() -> int:
    """Bytes currently held by this thread's pool."""
    pool = _local.__dict__.get("buffers", {})
    return sum(buffer.numel() * buffer.element_size() for buffer in pool.values())


def release_workspace() -> None:
    """Free every buffer of this thread's pool."""
    _local.__dict__.pop("buffers", None)
