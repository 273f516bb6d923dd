"""Losses: the spread loss with its margin schedule (Hinton et al. 2018, §3.1) and optional L2."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matcaps.errors import ConfigError, InvalidInputError, describe_tensor


@dataclass(frozen=True)
class MarginSchedule:
    """Margin of the spread loss as a function of the training step.

    ``m(step) = start + span · sigmoid(min(cap, step / steps_per_unit − offset))``
    (Hinton's OpenReview answer; the IBM defaults grow the margin from 0.2 to 0.99:
    0.214 at step 0, 0.595 at 200k steps, 0.896 at 300k).

    Attributes:
        start: Margin far before the transition.
        span: Total increase of the margin.
        steps_per_unit: Steps per unit of the sigmoid's argument.
        offset: Argument offset (the midpoint is reached at ``offset · steps_per_unit``).
        cap: Upper bound of the sigmoid's argument.
    """

    start: float = 0.2
    span: float = 0.79
    steps_per_unit: float = 50_000.0
    offset: float = 4.0
    cap: float = 10.0

    def __post_init__(self) -> None:
        if self.steps_per_unit <= 0:
            raise ConfigError(f"margin schedule steps_per_unit must be positive, got {self.steps_per_unit!r}")
        if not (0 <= self.start and self.span >= 0 and self.start + self.span <= 1 + 1e-12):
            raise ConfigError(
                f"margin schedule must stay within [0, 1], got start={self.start!r}, span={self.span!r}"
            )

    def __call__(self, step: int) -> float:
        argument = min(self.cap, step / self.steps_per_unit - self.offset)
        return self.start + self.span / (1.0 + math.exp(-argument))


def spread_loss(activations: Tensor, targets: Tensor, margin: float) -> Tensor:
    """Spread loss ``L = Σ_{i≠t} max(0, m − (a_t − a_i))²`` (Hinton et al. 2018, §3.1), averaged over
    the batch.

    Args:
        activations: ``(N, K)`` class activations ``a``.
        targets: ``(N,)`` int64 class indices ``t``.
        margin: ``m``.

    Returns:
        Scalar loss.

    Raises:
        InvalidInputError: not ``(N, K)`` floating-point scores and ``(N,)`` int64 targets with N ≥ 1.
    """
    check_scores_and_targets(activations, targets)
    target_activation = activations.gather(1, targets.unsqueeze(1))  # (N, 1)
    violations = torch.relu(margin - (target_activation - activations)) ** 2  # (N, K)
    not_target = torch.ones_like(violations).scatter_(1, targets.unsqueeze(1), 0.0)
    return (violations * not_target).sum(dim=1).mean()


def check_scores_and_targets(scores: Tensor, targets: Tensor) -> None:
    """Check that a loss is given ``(N, K)`` floating-point ``scores`` and ``(N,)`` int64 ``targets``, N ≥ 1.

    Shapes and dtypes only: checking the target values would synchronise a GPU at every step.

    Raises:
        InvalidInputError: naming the shapes and dtypes it was given.
    """
    valid = (
        isinstance(scores, Tensor) and isinstance(targets, Tensor)
        and scores.dim() == 2 and scores.is_floating_point()
        and targets.dim() == 1 and targets.dtype == torch.int64 and len(targets) == len(scores) > 0
    )  # fmt: skip
    if not valid:
        raise InvalidInputError(f"the loss expects (N, K) floating-point class scores and (N,) int64 class indices "
                                f"with N >= 1, got scores {describe_tensor(scores)} and targets {describe_tensor(targets)}")


#: Losses a network can declare in its ``loss_kind`` attribute.
LOSS_KINDS: tuple[str, ...] = ("spread", "cross_entropy")


def classification_loss(kind: str, scores: Tensor, targets: Tensor, margin: float) -> Tensor:
    """The batch-mean training loss of a network whose ``loss_kind`` is ``kind``.

    Args:
        kind: ``spread`` (capsule activations, Hinton et al. 2018 §3.1; uses ``margin``) or
            ``cross_entropy`` (softmax cross-entropy on logits, the CNN baseline; ignores ``margin``).
        scores: ``(N, K)`` class activations or logits.
        targets: ``(N,)`` int64 class indices.
        margin: Current spread-loss margin.

    Returns:
        Scalar loss.
    """
    if kind == "spread":
        return spread_loss(scores, targets, margin)
    if kind == "cross_entropy":
        check_scores_and_targets(scores, targets)
        return nn.functional.cross_entropy(scores, targets)
    raise ConfigError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


class SpreadLoss(nn.Module):
    """:func:`spread_loss` (Hinton et al. 2018, §3.1) with its margin from a :class:`MarginSchedule`.

    Call as ``loss(activations, targets, step)``: ``(N, K)`` class activations, ``(N,)`` int64 class
    indices and the training step that sets the margin; returns the scalar batch-mean loss.
    """

    def __init__(self, schedule: MarginSchedule = MarginSchedule()) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, activations: Tensor, targets: Tensor, step: int) -> Tensor:
        """``(N, K)`` activations and ``(N,)`` targets → scalar loss with the margin ``schedule(step)``."""
        return spread_loss(activations, targets, self.schedule(step))


def l2_penalty(parameters: Iterable[Tensor], weight: float) -> Tensor:
    """The scalar ``weight · Σ ‖p‖² / 2`` over tensors of any shape (TensorFlow's ``l2_loss``); Hinton et
    al. use ``weight = 2e-7``."""
    parameters = list(parameters)
    if not parameters:
        raise InvalidInputError("l2_penalty needs at least one parameter")
    return weight * sum(p.pow(2).sum() for p in parameters) / 2


def regularised_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters the IBM implementation regularises: convolution kernels and capsule transforms.

    Biases, ``β_a``/``β_v`` and normalisation statistics are excluded.
    """
    return [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1]


__all__ = [
    "LOSS_KINDS", "MarginSchedule", "SpreadLoss", "check_scores_and_targets", "classification_loss", "l2_penalty",
    "regularised_parameters", "spread_loss",
]  # fmt: skip
