"""Batch normalisation whose statistics can span several processes: of the input images
(:class:`InputNorm`, no learned scale or shift, as IBM) and of convolution features
(:class:`FeatureNorm`, with them, ``model option conv_norm``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from matcaps.errors import InvalidInputError

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
    one process (this also works on CPU with the gloo backend, unlike
    :class:`torch.nn.SyncBatchNorm`).

    The output is differentiable with respect to the input, through the batch statistics
    too (adversarial inputs, a model of one's own).  Across processes the gradient is that
    of the sum of every process's loss, as with :class:`torch.nn.SyncBatchNorm`: when the
    input requires a gradient, the backward pass all-reduces the gradient of the
    statistics, so every process must then run its backward pass.

    Args:
        channels: Number of input channels.

    Shapes:
        ``(N, channels, H, W)`` → same.

    Raises:
        InvalidInputError: (when called) the input is not ``(N, channels, H, W)``.
    """

    #: Whether the normalised channels are scaled and shifted by learned ``weight`` and ``bias``.
    affine = False
    #: Whether training on one process also sums the batch statistics in float64 (as across processes);
    #: False: ``torch.nn.functional.batch_norm``'s native kernel, in the input's dtype (its forward and
    #: backward took about 1/4 of the float64 path's time for 64 channels of 14×14 at batch 64 on the
    #: 2-vCPU machine: a timing of that layer alone, not a ``matcaps bench`` measurement).
    float64_statistics = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        if self.affine:  # BatchNorm2d's initialisation: γ = 1, β = 0
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
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
        """``(N, channels, H, W)`` images → the same shape, normalised."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.channels:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InvalidInputError(f"{type(self).__name__}({self.channels}) expects images (N, {self.channels}, H, W), got {got}")
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        if self.training and not self._synchronised and not self.float64_statistics:
            with torch.no_grad():
                self.num_batches_tracked += 1
            return F.batch_norm(images, self.running_mean, self.running_var, weight, bias, training=True,
                                momentum=RUNNING_STATS_MOMENTUM, eps=VARIANCE_EPSILON)  # fmt: skip
        shape = (1, self.channels, 1, 1)
        normalised = self._normalise(images, shape)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised

    def _normalise(self, images: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``(x − mean) / sqrt(var + ε)`` per channel: batch statistics in training, running ones in eval."""
        if not self.training:
            return (images - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + VARIANCE_EPSILON)
        x = images.double()  # the statistics in float64 (and differentiable)
        moments = torch.stack([
            torch.full((self.channels,), float(x.numel() // self.channels), dtype=x.dtype, device=x.device),
            x.sum(dim=(0, 2, 3)),
            x.square().sum(dim=(0, 2, 3)),
        ])  # fmt: skip
        if self._synchronised:
            if moments.requires_grad:
                moments = _SumOverProcesses.apply(moments, self.process_group)
            else:
                dist.all_reduce(moments, group=self.process_group)
        count, total, total_squares = moments
        mean = total / count
        variance = (total_squares / count - mean.square()).clamp(min=0)
        with torch.no_grad():
            unbiased = variance * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), RUNNING_STATS_MOMENTUM)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), RUNNING_STATS_MOMENTUM)
            self.num_batches_tracked += 1
        scale = torch.rsqrt(variance + VARIANCE_EPSILON).to(images.dtype).view(shape)
        shift = mean.to(images.dtype).view(shape)
        return (images - shift) * scale

    def extra_repr(self) -> str:
        return f"channels={self.channels}, synchronised={self._synchronised}"


class FeatureNorm(InputNorm):
    """``BatchNorm2d`` (learned per-channel scale γ and shift β) whose statistics can span processes.

    Ioffe & Szegedy (2015), Algorithm 1: ``y = γ·(x − μ_B)/sqrt(σ²_B + ε) + β``.  It normalises the
    convolution features of :attr:`~matcaps.models.CapsNetConfig.conv_norm` (not in the paper); like
    :class:`InputNorm`, under data parallelism it uses the statistics of the global batch (summed in
    float64), so training on several processes is the same as on one; on one process it runs
    ``torch.nn.functional.batch_norm`` (:attr:`float64_statistics` is False).

    Args:
        channels: Number of feature channels.

    Shapes:
        ``(N, channels, H, W)`` → same.
    """

    affine = True
    float64_statistics = False


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` of a tensor; its backward all-reduces the gradient the same way.

    Every process's statistics are the sum of every process's share, so the gradient of a
    share is the sum of every process's gradient of the statistics.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None
