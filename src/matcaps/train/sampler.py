"""Deterministic, resumable, shardable order of training batches.

The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of the
dataset drawn from a generator seeded with both.  It is cut into *global* batches of
``batch_size × world_size`` samples (the incomplete last one is dropped, as IBM's
``drop_remainder=True``), and process ``rank`` takes the ``rank``-th slice of each.  So
two processes with batch 4 see, step by step, exactly the samples that one process with
batch 8 sees, and a resumed run can skip the batches it has already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from matcaps.errors import ConfigError

#: Mixes the epoch into the seed of the permutation generator (a large odd constant
#: keeps ``(seed, epoch)`` pairs from colliding for any realistic number of epochs).
EPOCH_SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in ``epoch`` (data order, loader workers)."""
    return (seed * EPOCH_SEED_STRIDE + epoch) % (2**63 - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one process; call :meth:`set_epoch` before iterating.

    Args:
        num_samples: Size of the dataset.
        batch_size: Samples per batch *of this process*.
        seed: Base seed of the order.
        rank: This process's index in ``[0, world_size)``.
        world_size: Number of processes sharing each global batch.
        shuffle: Permute the dataset (False: dataset order).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid sampler: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if num_samples < batch_size * world_size:
            raise ConfigError(
                f"the training set has {num_samples} images, fewer than one global batch of {batch_size * world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch``'s batches from ``start_batch`` on (to resume mid-epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return self.num_samples // (self.batch_size * self.world_size)

    def order(self) -> torch.Tensor:
        """``(num_samples,)`` the permutation of the current epoch."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        global_batch = self.batch_size * self.world_size
        for index in range(self.start_batch, len(self)):
            start = index * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()
