"""Shared machinery of the layers that route with EM: transforms, ``β`` parameters, geometry cache, workspace."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from matcaps.errors import InvalidInputError, describe_tensor
from matcaps.layers.init import init_beta_a_, init_beta_v_, init_transforms_
from matcaps.routing import (
    Capsules,
    EMRoutingConfig,
    RoutingGeometry,
    RoutingTrace,
    RoutingWorkspace,
    compute_votes,
    route_capsules,
    trace_em_routing,
)

#: Routing geometries a layer keeps, most recently used first (one per input size and device).
GEOMETRY_CACHE_SIZE = 8


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


class MapTrace(NamedTuple):
    """One EM iteration of a routed layer, laid out on the capsule maps.

    The parents are laid out like the layer's output, ``(N, OH, OW, C)`` for
    :class:`ConvCaps` and ``(N, classes)`` for :class:`ClassCaps`; below, ``…`` stands for
    that shape.

    Attributes:
        routing: ``(…, H, W, B)``: e.g. ``routing[n, oy, ox, c, y, x, b]`` is the weight
            ``r_ij`` from child ``(y, x, b)`` of the input map to parent ``(oy, ox, c)`` that
            the iteration's M-step used; 0 where the parent's window does not read the
            child.  (Dense over both maps: meant for the analysis of small inputs.)
        mean: ``(…, P, P)`` parent pose means ``μ_j``.
        variance: ``(…, P, P)`` parent variances ``σ²_j`` (floor included).
        activations: ``(…)`` parent activations ``a_j``.
    """

    routing: Tensor
    mean: Tensor
    variance: Tensor
    activations: Tensor


def _routing_config(routing: EMRoutingConfig | None, iterations: int | None) -> EMRoutingConfig:
    """``routing`` (default :class:`EMRoutingConfig`) with ``iterations`` replaced if given."""
    config = EMRoutingConfig() if routing is None else routing
    return config if iterations is None else dataclasses.replace(config, iterations=iterations)


class RoutedCapsules(nn.Module):
    """Base class of :class:`ConvCaps` and :class:`ClassCaps` (internal: subclass it for a new routed layer).

    Holds the transformation matrices (shape given by the subclass), one ``β_a`` and one
    ``β_v`` per output capsule type (as in the IBM implementation), the routing
    configuration, a small cache of :class:`RoutingGeometry` per input size and device,
    and the :class:`~matcaps.routing.RoutingWorkspace` its fused routing reuses on CPU
    (its own unless :func:`share_workspace` gave it a shared one).  Subclasses say how
    their input is read (:meth:`routing_inputs`) and how the routed parents are shaped
    (:meth:`output_shape`).

    Args:
        transform_shape: Shape of the transformation-matrix parameter ``weight``.
        in_types: ``B``, input capsule types.
        out_types: ``C``, output capsule types.
        routing: EM-routing hyper-parameters.
        pose_size: ``P``; poses are ``P×P`` matrices.
    """

    def __init__(
        self, transform_shape: tuple[int, ...], in_types: int, out_types: int, routing: EMRoutingConfig, pose_size: int
    ) -> None:
        super().__init__()
        self.in_types = in_types
        self.out_types = out_types
        self.routing = routing
        self.pose_size = pose_size
        self.weight = nn.Parameter(init_transforms_(torch.empty(transform_shape)))
        self.beta_a = nn.Parameter(init_beta_a_(torch.empty(out_types)))
        self.beta_v = nn.Parameter(init_beta_v_(torch.empty(out_types)))
        self.workspace = RoutingWorkspace()
        self._geometries: OrderedDict[tuple[int, int, torch.device], RoutingGeometry] = OrderedDict()

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
        """Cached :meth:`make_geometry` on ``device`` (the last :data:`GEOMETRY_CACHE_SIZE` sizes)."""
        key = (height, width, device)
        geometry = self._geometries.get(key)
        if geometry is None:
            # Cached across calls, so never an inference tensor (those cannot be saved for backward).
            with torch.inference_mode(False):
                geometry = self.make_geometry(height, width).to(device)
            self._geometries[key] = geometry
            while len(self._geometries) > GEOMETRY_CACHE_SIZE:
                self._geometries.popitem(last=False)
        else:
            self._geometries.move_to_end(key)
        return geometry

    def check_input(self, poses: Tensor, activations: Tensor) -> None:
        """Raise :class:`~matcaps.errors.InvalidInputError` unless the input is ``(N, H, W, B, P, P)`` and ``(N, H, W, B)``."""
        p, b = self.pose_size, self.in_types
        expected = f"poses (N, H, W, {b}, {p}, {p}) and activations (N, H, W, {b})"
        if not isinstance(poses, Tensor) or not isinstance(activations, Tensor):
            raise InvalidInputError(f"{type(self).__name__} expects tensors: {expected}")
        valid = (
            poses.dim() == 6
            and poses.shape[3:] == (b, p, p)
            and activations.shape == poses.shape[:4]
            and poses.is_floating_point()
            and activations.is_floating_point()
        )
        if not valid:
            raise InvalidInputError(
                f"{type(self).__name__}(in_types={b}, pose_size={p}) expects {expected} (channels last), got "
                f"poses {describe_tensor(poses)} and activations {describe_tensor(activations)}"
            )
        if poses.shape[0] == 0:
            raise InvalidInputError(f"{type(self).__name__} got an empty batch (N = 0): {expected}")

    def forward(self, poses: Tensor, activations: Tensor) -> Capsules:
        """Route the input capsules to this layer's parents (see the subclass for the shapes)."""
        self.check_input(poses, activations)
        inputs = self.routing_inputs(poses, activations)
        out_poses, out_activations = route_capsules(
            inputs.windows, inputs.transforms, inputs.child_activations,
            self.beta_v, self.beta_a, inputs.geometry, self.routing, inputs.vote_offsets, self.workspace,
        )  # fmt: skip
        shape = self.output_shape(activations.shape[0], inputs.geometry)
        return Capsules(out_poses.reshape(*shape, self.pose_size, self.pose_size), out_activations.reshape(shape))

    def trace(self, poses: Tensor, activations: Tensor) -> list[RoutingTrace]:
        """Every EM iteration's routing weights, means, variances and activations, per window.

        Uses the straightforward implementation (see :func:`matcaps.routing.trace_em_routing`);
        tensors are laid out per window: ``routing`` is ``(N, L, C, I)`` with ``L = OH·OW``
        parent positions (row-major) and ``I = S·B`` children per window ordered (slot,
        type); slot ``s`` of window ``l`` reads child position
        ``self.geometry(H, W, device).slot_child_index[l, s]`` (row-major, ``H·W`` for
        zero padding).  :meth:`trace_on_map` lays the same numbers out on the maps.
        """
        self.check_input(poses, activations)
        inputs = self.routing_inputs(poses, activations)
        votes = compute_votes(inputs.windows, inputs.transforms, inputs.vote_offsets)
        return trace_em_routing(
            votes, inputs.child_activations, self.beta_v, self.beta_a, inputs.geometry, self.routing
        )

    def trace_on_map(self, poses: Tensor, activations: Tensor) -> list[MapTrace]:
        """:meth:`trace` with every tensor laid out on the capsule maps (see :class:`MapTrace`)."""
        trace = self.trace(poses, activations)
        n, height, width, child_types = activations.shape
        geometry = self.geometry(height, width, activations.device)
        parents = self.output_shape(n, geometry)
        matrix = (self.pose_size, self.pose_size)
        return [
            MapTrace(
                routing=geometry.windows_to_map(state.routing, child_types).reshape(*parents, height, width, child_types),
                mean=state.mean.reshape(*parents, *matrix),
                variance=state.variance.reshape(*parents, *matrix),
                activations=state.activations.reshape(parents),
            )
            for state in trace
        ]


def share_workspace(module: nn.Module, workspace: RoutingWorkspace | None = None) -> RoutingWorkspace:
    """Give every routed layer inside ``module`` one shared :class:`~matcaps.routing.RoutingWorkspace`.

    The layers of a network run one after the other, so one set of scratch buffers (sized
    to the largest layer) serves them all; :class:`~matcaps.models.CapsNet` does this for
    its layers.  Returns the workspace (a new one unless given).
    """
    workspace = RoutingWorkspace() if workspace is None else workspace
    for layer in module.modules():
        if isinstance(layer, RoutedCapsules):
            layer.workspace = workspace
    return workspace
