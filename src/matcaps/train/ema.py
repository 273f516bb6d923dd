"""An exponential moving average of the weights: the network that is validated and kept with ``--ema-decay``.

After every applied optimizer step the average moves towards the trained weights θ (``t``: the run's
step count, 1, 2, …, skipped non-finite steps included):

    θ̄ ← d_t · θ̄ + (1 − d_t) · θ,   d_t = min(d, (1 + t) / (10 + t))

``d`` is ``--ema-decay``; the warm-up ``(1 + t) / (10 + t)`` is TensorFlow's
``tf.train.ExponentialMovingAverage(num_updates=t)``, so that the average of the first steps is not
dominated by the initial weights (d_1 = 0.18, d_100 = 0.92, d_1000 ≈ 0.991). Buffers (the input
normalisation's running statistics) are copied, not averaged. The average starts at the weights
training starts from (``--init-from`` included). Not in Hinton et al. 2018 nor in IBM's code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

#: The warm-up of the decay, ``d_t = min(d, (WARMUP_NUMERATOR_OFFSET + t) / (WARMUP_DENOMINATOR_OFFSET + t))``:
#: TensorFlow's ``tf.train.ExponentialMovingAverage`` with ``num_updates``.
WARMUP_NUMERATOR_OFFSET = 1.0
WARMUP_DENOMINATOR_OFFSET = 10.0


def warmed_up_decay(decay: float, update: int) -> float:
    """``d_t = min(decay, (1 + t) / (10 + t))`` for the ``update``-th update (``t`` ≥ 1)."""
    return min(decay, (WARMUP_NUMERATOR_OFFSET + update) / (WARMUP_DENOMINATOR_OFFSET + update))


class WeightAverage:
    """The moving average of a network's weights, held as a second copy of the network.

    Args:
        model: The trained network; the average starts as a copy of it.
        decay: ``d`` in ``[0, 1)``.

    Attributes:
        average: A network of the same class holding θ̄ (no gradients; evaluate it).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the weight average's decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.average = copy.deepcopy(model)
        self.average.requires_grad_(False)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Set the average to ``model``'s current weights (after a warm start)."""
        self.average.load_state_dict(model.state_dict())

    @torch.no_grad()
    def update(self, model: nn.Module, update: int) -> None:
        """Move the average towards ``model`` as the ``update``-th update (counted from 1)."""
        weight = 1.0 - warmed_up_decay(self.decay, update)
        for mine, theirs in zip(self.average.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), weight)
        for mine, theirs in zip(self.average.buffers(), model.buffers()):
            mine.copy_(theirs)
