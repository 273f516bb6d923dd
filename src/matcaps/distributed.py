"""Data parallelism over processes started by ``torchrun`` (one process per GPU or CPU slot).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup_distributed` reads them, joins the default process group
(NCCL on CUDA, gloo on CPU) and pins each process to its GPU.  Without these variables
training runs in a single process.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from matcaps.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the processes of a run.

    Attributes:
        rank: Global index of this process (0 writes logs and checkpoints).
        world_size: Number of processes.
        local_rank: Index among the processes of this node (selects the GPU).
        device: The device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints progress."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:local_rank`` if CUDA is available, else ``cpu``; checks that CUDA exists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        return device
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None


def setup_distributed(device_name: str = "auto") -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_distributed(context: DistributedContext) -> None:
    """Leave the process group joined by :func:`setup_distributed`, and end its threads.

    ``destroy_process_group`` only drops the registry's reference to the group.  A finished
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper that sits in a reference cycle (a
    trainer and its monitor refer to each other) still holds one, so the group and its gloo threads
    would live until the garbage collector runs, possibly while the interpreter shuts down, where
    they can abort the process (SIGABRT after "terminate called without an active exception": seen
    once in CI and once in about 170 local repeats of a two-process test; PyTorch pull request
    179291 describes gloo threads crashing at interpreter shutdown).  Collecting the garbage first
    makes ``destroy_process_group`` free the group and join its threads here.
    """
    if context.distributed and dist.is_initialized():
        dist.barrier()  # let every process finish (rank 0 writes the last checkpoint) before tearing down
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``values`` over processes (in place on a copy; identity in a single process)."""
    if not context.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_agree(flag: bool, context: DistributedContext, any_process: bool = False) -> bool:
    """True only if ``flag`` is true on every process (with ``any_process``: on at least one)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if any_process else dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op in a single process)."""
    if context.distributed:
        dist.barrier()
