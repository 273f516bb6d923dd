"""Shared machinery of the layers that route with EM: transforms, ``β`` parameters, geometry cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from matcaps.layers.init import init_beta_a_, init_beta_v_, init_transforms_
from matcaps.routing import (
    EMRoutingConfig,
    RoutingGeometry,
    RoutingTrace,
    compute_votes,
    route_capsules,
    trace_em_routing,
)


class RoutingInputs(NamedTuple):
    """What a routed layer feeds to :func:`matcaps.routing.route_capsules`.

    Attributes:
        windows: ``(N, L, I, P, P)`` child poses read by each window.
        transforms: ``(I, C, P, P)`` transformation matrices per child slot and parent type.
        child_activations: ``(N, L, I)``.
        geometry: The layer's routing geometry for this input size.
        vote_offsets: ``(I, P·P)`` constants added to the votes, or None.
    """

    windows: Tensor
    transforms: Tensor
    child_activations: Tensor
    geometry: RoutingGeometry
    vote_offsets: Tensor | None


class RoutedCapsules(nn.Module):
    """Base class of :class:`ConvCaps` and :class:`ClassCaps`.

    Holds the transformation matrices (shape given by the subclass), one ``β_a`` and one
    ``β_v`` per output capsule type (as in the IBM implementation), the routing
    configuration, and a cache of :class:`RoutingGeometry` per input size and device.
    Subclasses say how their input is read (:meth:`routing_inputs`) and how the routed
    parents are shaped (:meth:`output_shape`).

    Args:
        transform_shape: Shape of the transformation-matrix parameter ``weight``.
        out_types: ``C``, output capsule types.
        routing: EM-routing hyper-parameters.
        pose_size: ``P``; poses are ``P×P`` matrices.
    """

    def __init__(
        self, transform_shape: tuple[int, ...], out_types: int, routing: EMRoutingConfig, pose_size: int
    ) -> None:
        super().__init__()
        self.out_types = out_types
        self.routing = routing
        self.pose_size = pose_size
        self.weight = nn.Parameter(init_transforms_(torch.empty(transform_shape)))
        self.beta_a = nn.Parameter(init_beta_a_(torch.empty(out_types)))
        self.beta_v = nn.Parameter(init_beta_v_(torch.empty(out_types)))
        self._geometries: dict[tuple[int, int, torch.device], RoutingGeometry] = {}

    def make_geometry(self, height: int, width: int) -> RoutingGeometry:
        """The routing geometry for a ``height × width`` child map."""
        raise NotImplementedError

    def routing_inputs(self, poses: Tensor, activations: Tensor) -> RoutingInputs:
        """Windows, transforms, child activations and offsets for ``(N, H, W, B, P, P)`` poses."""
        raise NotImplementedError

    def output_shape(self, batch: int, geometry: RoutingGeometry) -> tuple[int, ...]:
        """Shape of the output activations; the poses add ``(P, P)``."""
        raise NotImplementedError

    def geometry(self, height: int, width: int, device: torch.device) -> RoutingGeometry:
        """Cached :meth:`make_geometry` on ``device``."""
        key = (height, width, device)
        if key not in self._geometries:
            # Cached across calls, so never an inference tensor (those cannot be saved for backward).
            with torch.inference_mode(False):
                self._geometries[key] = self.make_geometry(height, width).to(device)
        return self._geometries[key]

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        inputs = self.routing_inputs(poses, activations)
        out_poses, out_activations = route_capsules(
            inputs.windows, inputs.transforms, inputs.child_activations,
            self.beta_v, self.beta_a, inputs.geometry, self.routing, inputs.vote_offsets,
        )  # fmt: skip
        shape = self.output_shape(activations.shape[0], inputs.geometry)
        return out_poses.reshape(*shape, self.pose_size, self.pose_size), out_activations.reshape(shape)

    def trace(self, poses: Tensor, activations: Tensor) -> list[RoutingTrace]:
        """Every EM iteration's routing weights, means, variances and activations for this input.

        Uses the straightforward implementation (see :func:`matcaps.routing.trace_em_routing`);
        tensors are laid out per window: ``routing`` is ``(N, L, C, I)`` with ``L = OH·OW``
        parent positions and ``I = S·B`` children per window ordered (slot, type).
        """
        inputs = self.routing_inputs(poses, activations)
        votes = compute_votes(inputs.windows, inputs.transforms, inputs.vote_offsets)
        return trace_em_routing(
            votes, inputs.child_activations, self.beta_v, self.beta_a, inputs.geometry, self.routing
        )
