"""Check that the routing implementations compute the same thing before comparing their speed.

A benchmark that times two implementations must time the same computation.  Here the
full network is built once per implementation with the same weights and fed the same
batch; outputs, loss and the gradient of every parameter must agree.  The check runs in
float64: in float32 the implementations, which sum in different orders, can differ by a
few 1e-3 of a gradient's scale with 3 routing iterations (EM amplifies rounding), which
would hide a small real discrepancy; in float64 they agree to about 1e-11.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from matcaps.errors import MatcapsError
from matcaps.losses import spread_loss
from matcaps.models import CapsNetConfig, build_model

#: Batch of the check (small: it runs before the timed workers).
VERIFY_BATCH_SIZE = 4
#: Precision of the check (see the module's docstring).
VERIFY_DTYPE = torch.float64
#: Agreement required in float64, relative to the largest magnitude of each compared tensor.
RELATIVE_TOLERANCE = 1e-7
#: Weight of the pose term added to the loss so that the class poses receive gradient too.
POSE_LOSS_WEIGHT = 1e-2


class ImplementationMismatch(MatcapsError):
    """Two routing implementations give different outputs or gradients."""


@dataclass(frozen=True)
class Difference:
    """Largest difference of one compared tensor, relative to its largest magnitude."""

    name: str
    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


def model_outputs_and_gradients(
    config: CapsNetConfig, images: torch.Tensor, labels: torch.Tensor, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Activations, poses, loss and every parameter gradient of one training forward/backward.

    Args:
        config: The network (its routing implementation included).
        images: ``(N, C, S, S)``; the network is converted to their dtype.
        labels: ``(N,)``.
        state: Weights loaded into the network.

    Returns:
        Tensors by name: ``activations`` ``(N, K)``, ``poses`` ``(N, K, P, P)``, ``loss`` and
        ``grad/<parameter>``.
    """
    model = build_model(config).to(device=images.device, dtype=images.dtype)
    model.load_state_dict(state)
    output = model(images)
    loss = spread_loss(output.activations, labels, margin=0.5) + POSE_LOSS_WEIGHT * output.poses.square().mean()
    loss.backward()
    tensors = {"activations": output.activations.detach(), "poses": output.poses.detach(), "loss": loss.detach()}
    tensors.update({f"grad/{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return tensors


def compare_implementations(
    config: CapsNetConfig,
    implementations: Sequence[str],
    batch_size: int = VERIFY_BATCH_SIZE,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, list[Difference]]:
    """Run the network with each implementation on the same weights and batch.

    Returns:
        For every implementation after the first, the differences of each compared tensor
        from the first implementation's.

    Raises:
        ImplementationMismatch: When a tensor differs by more than :data:`RELATIVE_TOLERANCE`
            of its largest magnitude, or one gradient exists for one implementation only.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_model(config).state_dict()
    images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(config.num_classes, (batch_size,), generator=generator)
    images, labels = images.to(device=device, dtype=VERIFY_DTYPE), labels.to(device)
    runs = {
        name: model_outputs_and_gradients(config.replace(routing={"implementation": name}), images, labels, state)
        for name in implementations
    }
    reference_name = implementations[0]
    reference = runs[reference_name]
    report: dict[str, list[Difference]] = {}
    for name in implementations[1:]:
        other = runs[name]
        if other.keys() != reference.keys():
            raise ImplementationMismatch(
                f"routing implementations {reference_name} and {name} give gradients to different parameters: "
                f"{sorted(reference.keys() ^ other.keys())}"
            )
        differences = [
            Difference(key, (other[key] - value).abs().max().item(), value.abs().max().item())
            for key, value in reference.items()
        ]
        worst = max(differences, key=lambda d: d.relative)
        if worst.relative > RELATIVE_TOLERANCE or not all(torch.isfinite(t).all() for t in other.values()):
            raise ImplementationMismatch(
                f"routing implementations {reference_name} and {name} disagree on {worst.name}: "
                f"max difference {worst.max_abs:.3g} for values up to {worst.scale:.3g}"
            )
        report[name] = differences
    return report
