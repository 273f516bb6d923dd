"""Reusable scratch buffers for the fused routing on CPU, owned by whoever creates them.

Each routed layer needs a few scratch tensors the size of its votes (hundreds of MB at
batch 64).  On CPU, a fresh allocation that large is served by ``mmap`` and every page is
faulted in on first touch, which costs as much as several passes of arithmetic over the
tensor; PyTorch has no caching allocator on CPU.  The fused implementation therefore
takes its scratch space from a :class:`RoutingWorkspace` when it is given one: a handful
of flat buffers per thread, grown to the largest size asked for and reused by every call
that uses the same workspace.  On other devices (CUDA's caching allocator already reuses
memory), or without a workspace, it allocates normally and keeps nothing.

A workspace belongs to its creator: every routed layer owns one, and
:class:`~matcaps.models.CapsNet` gives all its layers a single shared one
(:func:`matcaps.layers.share_workspace`).  Its memory is freed with it, or earlier by
:meth:`RoutingWorkspace.release` (:func:`release_workspace` releases every live
workspace's buffers of the calling thread).

Scratch tensors never escape the function that requested them: nothing returned to the
caller or saved for the backward pass aliases a scratch buffer.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch
from torch import Tensor


class RoutingWorkspace:
    """Scratch buffers reused by the fused routing on CPU, one set per thread.

    Two calls of :meth:`scratch` with the same ``slot`` on one thread return views of the
    same memory, so a caller uses distinct slots for buffers that are alive at the same
    time.  Copying a workspace (``copy.deepcopy`` of a model) or pickling it gives an
    empty one; it holds no state worth saving.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        _LIVE_WORKSPACES.add(self)

    def _buffers(self) -> dict[tuple[int, torch.dtype], Tensor]:
        return self._local.__dict__.setdefault("buffers", {})

    def scratch(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, backed by buffer ``slot`` on CPU."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        pool = self._buffers()
        numel = math.prod(shape)
        key = (slot, dtype)
        buffer = pool.get(key)
        if buffer is None or buffer.numel() < numel:
            pool.pop(key, None)  # free the old buffer before allocating the larger one
            with torch.inference_mode(False):  # a normal tensor, reusable in and out of inference mode
                buffer = torch.empty(numel, dtype=dtype)
            pool[key] = buffer
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes this workspace holds for the calling thread."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers().values())

    def release(self) -> None:
        """Free the calling thread's buffers (they grow again on the next use)."""
        self._local.__dict__.pop("buffers", None)

    def __deepcopy__(self, memo: dict[int, Any]) -> RoutingWorkspace:
        return RoutingWorkspace()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (RoutingWorkspace, ())

    def __repr__(self) -> str:
        return f"RoutingWorkspace({self.nbytes()} bytes on this thread)"


#: Every workspace alive, for :func:`workspace_bytes` and :func:`release_workspace`.
_LIVE_WORKSPACES: weakref.WeakSet[RoutingWorkspace] = weakref.WeakSet()


def scratch(
    workspace: RoutingWorkspace | None, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``workspace.scratch(...)``, or a fresh uninitialised tensor without a workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.scratch(slot, shape, dtype, device)


def workspace_bytes() -> int:
    """Bytes held for the calling thread by every live :class:`RoutingWorkspace`."""
    return sum(workspace.nbytes() for workspace in list(_LIVE_WORKSPACES))


def release_workspace() -> None:
    """Free the calling thread's buffers of every live :class:`RoutingWorkspace`."""
    for workspace in list(_LIVE_WORKSPACES):
        workspace.release()
