"""What is timed: a full training step and an inference forward pass on seeded random data.

* training step: forward, spread loss, backward, Adam update (model in training mode);
* inference: forward only, model in evaluation mode, under ``torch.inference_mode()``.

With ``dtype="bf16"`` both run under bfloat16 autocast (the routing itself stays float32,
see :mod:`matcaps.routing.em`).  Weights, images ``(N, C, S, S)`` and labels ``(N,)`` are
drawn from the bench's seed, so every implementation sees the same computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matcaps.losses import MarginSchedule, spread_loss
from matcaps.models import CapsNet, CapsNetConfig, build_model

#: Learning rate of the Adam optimiser (the value does not change the cost of a step).
LEARNING_RATE = 3e-3
#: The spread-loss margin at the start of training (0.214 with the IBM schedule).
MARGIN = MarginSchedule()(0)
#: Torch dtype of each ``--precision`` under autocast (None: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Workload:
    """A model, its optimiser and one batch of random data.

    Attributes:
        model: The network (possibly wrapped by ``torch.compile``: see ``compiled``).
        network: The uncompiled :class:`CapsNet` (whose layers are hooked and profiled).
        optimiser: Adam over the network's parameters.
        images: ``(N, C, S, S)`` standard-normal images.
        labels: ``(N,)`` int64 class indices.
        dtype: ``fp32`` or ``bf16``.
    """

    model: nn.Module
    network: CapsNet
    optimiser: torch.optim.Optimizer
    images: Tensor
    labels: Tensor
    dtype: str

    @property
    def device(self) -> torch.device:
        return self.images.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context of the bench's dtype (a no-op for fp32)."""
        dtype = AUTOCAST_DTYPES[self.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> float:
        """One optimisation step; returns the loss as a Python float (synchronises)."""
        self.model.train()
        self.optimiser.zero_grad(set_to_none=True)
        with self.autocast():
            output = self.model(self.images)
            loss = spread_loss(output.activations.float(), self.labels, MARGIN)
        loss.backward()
        self.optimiser.step()
        return loss.item()

    def inference_step(self) -> Tensor:
        """One forward pass without autograd; returns the ``(N, K)`` class activations."""
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            return self.model(self.images).activations

    def step(self, phase: str) -> Callable[[], object]:
        """The step of ``phase`` (``train`` or ``inference``)."""
        return {"train": self.train_step, "inference": self.inference_step}[phase]


def make_workload(
    config: CapsNetConfig, batch_size: int, device: torch.device, dtype: str, seed: int, compile: bool = False
) -> Workload:
    """Build the network from ``config`` and a batch of random data, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with _seeded(seed):
        network = build_model(config).to(device)
    images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(config.num_classes, (batch_size,), generator=generator)
    optimiser = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
    model: nn.Module = torch.compile(network) if compile else network
    return Workload(model, network, optimiser, images.to(device), labels.to(device), dtype)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the global RNG seeded (parameter initialisers draw from it), then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
