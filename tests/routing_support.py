"""Shared helpers of the routing tests: outputs and gradients of a routed layer, and their comparison (no tests here)."""

from __future__ import annotations

import torch


def outputs_and_gradients(layer, poses: torch.Tensor, activations: torch.Tensor) -> dict[str, torch.Tensor]:
    """Routed poses and activations, and the gradients of a random linear function of them."""
    poses = poses.clone().requires_grad_()
    activations = activations.clone().requires_grad_()
    layer.zero_grad()
    out_poses, out_activations = layer(poses, activations)
    generator = torch.Generator().manual_seed(11)
    pose_weights = torch.randn(out_poses.shape, generator=generator, dtype=torch.float64).to(out_poses.dtype)
    activation_weights = torch.randn(out_activations.shape, generator=generator, dtype=torch.float64).to(out_poses.dtype)
    ((out_poses * pose_weights).sum() + (out_activations * activation_weights).sum()).backward()
    results = {"poses": out_poses.detach(), "activations": out_activations.detach()}
    results["grad poses"], results["grad activations"] = poses.grad, activations.grad
    results.update({f"grad {name}": p.grad for name, p in layer.named_parameters()})
    return results


def assert_relatively_close(got: dict, expected: dict, tolerance: float) -> None:
    """Each tensor within ``tolerance`` of the other, relative to its largest entry."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = value.abs().max().item()
        error = (got[name].double() - value.double()).abs().max().item()
        assert error <= tolerance * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"
