"""Shared machinery of the layers that route with EM: transforms, ``β`` parameters, geometry cache."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matcaps.layers.init import init_beta_a_, init_beta_v_, init_transforms_
from matcaps.routing import EMRoutingConfig, RoutingGeometry, route_capsules


class RoutedCapsules(nn.Module):
    """Base class of :class:`ConvCaps` and :class:`ClassCaps`.

    Holds the transformation matrices (shape given by the subclass), one ``β_a`` and one
    ``β_v`` per output capsule type (as in the IBM implementation), the routing
    configuration, and a cache of :class:`RoutingGeometry` per input size and device.

    Args:
        transform_shape: Shape of the transformation-matrix parameter ``weight``.
        out_types: ``C``, output capsule types.
        routing: EM-routing hyper-parameters.
    """

    def __init__(self, transform_shape: tuple[int, ...], out_types: int, routing: EMRoutingConfig) -> None:
        super().__init__()
        self.out_types = out_types
        self.routing = routing
        self.weight = nn.Parameter(init_transforms_(torch.empty(transform_shape)))
        self.beta_a = nn.Parameter(init_beta_a_(torch.empty(out_types)))
        self.beta_v = nn.Parameter(init_beta_v_(torch.empty(out_types)))
        self._geometries: dict[tuple[int, int, torch.device], RoutingGeometry] = {}

    def make_geometry(self, height: int, width: int) -> RoutingGeometry:
        """The routing geometry for a ``height × width`` child map (implemented by subclasses)."""
        raise NotImplementedError

    def geometry(self, height: int, width: int, device: torch.device) -> RoutingGeometry:
        """Cached :meth:`make_geometry` on ``device``."""
        key = (height, width, device)
        if key not in self._geometries:
            self._geometries[key] = self.make_geometry(height, width).to(device)
        return self._geometries[key]

    def route(
        self,
        windows: Tensor,
        transforms: Tensor,
        child_activations: Tensor,
        geometry: RoutingGeometry,
        vote_offsets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:func:`matcaps.routing.route_capsules` with this layer's ``β`` and configuration.

        Args:
            windows: ``(N, L, I, P, P)`` child poses per window.
            transforms: ``(I, C, P, P)``.
            child_activations: ``(N, L, I)``.
            vote_offsets: Optional ``(I, P·P)`` added to the votes.

        Returns:
            ``(N, L, C, P·P)`` poses and ``(N, L, C)`` activations.
        """
        return route_capsules(
            windows, transforms, child_activations, self.beta_v, self.beta_a, geometry, self.routing, vote_offsets
        )
