"""Batch normalisation of the input images without learned scale or shift, optionally across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Momentum of the running statistics (``torch.nn.BatchNorm2d``'s default).
RUNNING_STATS_MOMENTUM = 0.1
#: Added to the variance before the square root (``torch.nn.BatchNorm2d``'s default).
VARIANCE_EPSILON = 1e-5


class InputNorm(nn.Module):
    """``BatchNorm2d(affine=False)`` whose batch statistics can span several processes.

    The IBM network normalises its input with batch statistics and no learned parameters.
    Under data parallelism each process sees only its shard of the batch; with
    ``process_group`` set, the per-channel sums are all-reduced so that every process
    normalises with the statistics of the global batch and training is the same as on
    one process.  The input of the network needs no gradient, so the statistics are
    reduced without autograd (unlike :class:`torch.nn.SyncBatchNorm`, this also works on
    CPU with the gloo backend).

    Args:
        channels: Number of input channels.
        process_group: Group to reduce over, or None (local statistics). Set it with
            :meth:`synchronise`.

    Shapes:
        ``(N, channels, H, W)`` → same.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.process_group: dist.ProcessGroup | None = None
        self._synchronised = False

    def synchronise(self, process_group: dist.ProcessGroup | None = None) -> "InputNorm":
        """Reduce batch statistics over ``process_group`` (the default group if None)."""
        self.process_group = process_group
        self._synchronised = True
        return self

    def forward(self, images: Tensor) -> Tensor:
        shape = (1, self.channels, 1, 1)
        if not self.training:
            return (images - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + VARIANCE_EPSILON)
        with torch.no_grad():
            x = images.detach().double()
            moments = torch.stack([
                torch.full((self.channels,), float(x.numel() // self.channels), dtype=x.dtype, device=x.device),
                x.sum(dim=(0, 2, 3)),
                x.pow(2).sum(dim=(0, 2, 3)),
            ])  # fmt: skip
            if self._synchronised:
                dist.all_reduce(moments, group=self.process_group)
            count, total, total_squares = moments
            mean = total / count
            variance = (total_squares / count - mean.pow(2)).clamp(min=0)
            unbiased = variance * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), RUNNING_STATS_MOMENTUM)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), RUNNING_STATS_MOMENTUM)
            self.num_batches_tracked += 1
            scale = torch.rsqrt(variance + VARIANCE_EPSILON).to(images.dtype).view(shape)
            shift = mean.to(images.dtype).view(shape)
        return (images - shift) * scale

    def extra_repr(self) -> str:
        return f"channels={self.channels}, synchronised={self._synchronised}"
