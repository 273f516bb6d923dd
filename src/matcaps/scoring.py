"""Scoring a model on a dataset: confusion matrix and mean training loss, optionally sharded over processes.

Used by validation during training and by ``matcaps test``; the loss is the network's own
(``loss_kind``: the spread loss of capsule networks, cross-entropy of the CNN baseline).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from matcaps.data.loader_workers import iterate_with_workers_forked_quietly, quiet_worker_init
from matcaps.losses import classification_loss
from matcaps.distributed import DistributedContext, all_reduce_sum


@dataclass(frozen=True)
class EvaluationCounts:
    """What scoring a dataset gives.

    Attributes:
        confusion: ``(K, K)`` int64 counts, rows = true class, columns = predicted class.
        loss_sum: Sum over images of the model's training loss (spread loss at the given margin, or cross-entropy).
    """

    confusion: Tensor
    loss_sum: float

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        """Fraction of images whose predicted class is the true one."""
        return float(self.confusion.diagonal().sum()) / max(self.total, 1)

    @property
    def loss(self) -> float:
        """Mean training loss per image."""
        return self.loss_sum / max(self.total, 1)

    def per_class_accuracy(self) -> list[float]:
        """Recall of each class (NaN for a class absent from the data)."""
        per_class = self.confusion.sum(dim=1).clamp(min=1)
        values = (self.confusion.diagonal().double() / per_class.double()).tolist()
        return [v if n > 0 else float("nan") for v, n in zip(values, self.confusion.sum(dim=1).tolist())]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``precision == "bf16"``, else nothing."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shard(dataset: Dataset, context: DistributedContext) -> Dataset:
    """The contiguous part of ``dataset`` that this process scores (all of it in one process)."""
    if not context.distributed:
        return dataset
    size = len(dataset)  # type: ignore[arg-type]
    start, stop = size * context.rank // context.world_size, size * (context.rank + 1) // context.world_size
    return Subset(dataset, range(start, stop))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int = 256,
    margin: float = 0.2,
    device: torch.device = torch.device("cpu"),
    context: DistributedContext | None = None,
    workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
    description: str = "eval",
) -> EvaluationCounts:
    """Score every image of ``dataset`` with ``model`` in eval mode (statistics summed over processes).

    Args:
        model: Returns a :class:`~matcaps.models.CapsNetOutput` for ``(N, 1, S, S)`` images.
        dataset: Items ``(image (C, S, S), label)``, or ``(views (V, C, S, S), label)``: the class scores of
            the ``V`` views of an image (multi-crop evaluation) are averaged.
        num_classes: ``K``.
        batch_size: Images per forward pass.
        margin: Margin of the reported spread loss (capsule networks).
        device: Where to compute.
        context: Process group to shard over (None: this process scores everything).
        workers: Data-loader workers.
        precision: ``bf16`` autocasts on CUDA; inputs take the dtype of the model's parameters.
        progress: Show a tqdm bar.
        description: Label of the bar.
    """
    context = context or DistributedContext(device=device)
    was_training = model.training
    model.eval()
    loader = DataLoader(shard(dataset, context), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=quiet_worker_init(workers))
    dtype = next(model.parameters()).dtype
    loss_kind = getattr(model, "loss_kind", "spread")
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        batches = iterate_with_workers_forked_quietly(loader)  # a Ctrl-C during validation must not kill a worker
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=len(loader), desc=description, leave=False, dynamic_ncols=True)
        for images, labels in batches:
            images = images.to(device, dtype=dtype, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long().view(-1)
            with autocast_context(device, precision):
                scores = model(images.flatten(0, 1) if images.dim() == 5 else images).scores
            scores = scores.to(torch.promote_types(dtype, torch.float32))
            if images.dim() == 5:  # (N, V, C, S, S): V views (crops) of each image, their scores averaged
                scores = scores.view(images.shape[0], images.shape[1], -1).mean(dim=1)
            predictions = scores.argmax(dim=1)
            confusion += torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
            loss_sum += classification_loss(loss_kind, scores, labels, margin).double() * labels.numel()
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.cat([confusion.double(), loss_sum.view(1)]), context)
    return EvaluationCounts(
        confusion=totals[:-1].round().long().view(num_classes, num_classes).cpu(), loss_sum=float(totals[-1])
    )
