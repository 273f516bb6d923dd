"""Convolutional capsule layer with EM routing."""

from __future__ import annotations

from torch import Tensor

from matcaps.layers.routed import RoutedCapsules, RoutingInputs, _routing_config
from matcaps.routing import PAPER_POSE_SIZE, EMRoutingConfig, RoutingGeometry


class ConvCaps(RoutedCapsules):
    """Convolutional capsules (Hinton et al. 2018, §3, "ConvCaps1/ConvCaps2").

    Each parent position reads a ``K×K`` window of child capsules; every (kernel position,
    child type, parent type) has its own ``P×P`` transformation matrix, shared over parent
    positions.  Routing normalises each child over every parent position and type it
    reaches, so overlapping windows compete for children.

    Args:
        in_types: ``B``, child capsule types.
        out_types: ``C``, parent capsule types.
        kernel_size: ``K``.
        stride: Stride of the windows.
        padding: Zero padding of the child map (padded slots hold inactive children).
        routing: EM-routing hyper-parameters (default :class:`EMRoutingConfig`).
        pose_size: ``P``; poses are ``P×P`` matrices.
        iterations: Shortcut for the number of routing iterations (replaces ``routing``'s).

    Shapes:
        * input: ``(poses, activations)`` of shapes ``(N, H, W, B, P, P)`` and ``(N, H, W, B)``
          (channels last);
        * output: :class:`~matcaps.routing.Capsules` ``(poses, activations)`` of shapes
          ``(N, OH, OW, C, P, P)`` and ``(N, OH, OW, C)`` with
          ``OH = ⌊(H + 2·padding − K) / stride⌋ + 1`` (likewise ``OW``).

    Raises:
        InvalidInputError: (when called) the input does not have these shapes.
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        routing: EMRoutingConfig | None = None,
        pose_size: int = PAPER_POSE_SIZE,
        *,
        iterations: int | None = None,
    ) -> None:
        super().__init__(
            (kernel_size, kernel_size, in_types, out_types, pose_size, pose_size),
            in_types, out_types, _routing_config(routing, iterations), pose_size,
        )  # fmt: skip
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def make_geometry(self, height: int, width: int) -> RoutingGeometry:
        return RoutingGeometry.conv(height, width, self.kernel_size, self.stride, self.padding)

    def routing_inputs(self, poses: Tensor, activations: Tensor) -> RoutingInputs:
        """``(N, H, W, B, P, P)`` poses, ``(N, H, W, B)`` activations → one K×K window per output position."""
        n, height, width, child_types = activations.shape
        geometry = self.geometry(height, width, activations.device)
        windows = geometry.gather(poses.reshape(n, height * width, -1))  # (N, L, S, B·P·P)
        windows = windows.view(n, geometry.num_windows, -1, self.pose_size, self.pose_size)  # (N, L, S·B, P, P)
        child_activations = geometry.gather(activations.reshape(n, height * width, child_types))
        child_activations = child_activations.reshape(n, geometry.num_windows, -1)  # (N, L, S·B)
        transforms = self.weight.view(-1, self.out_types, self.pose_size, self.pose_size)  # (S·B, C, P, P)
        return RoutingInputs(windows, transforms, child_activations, geometry, None)

    def output_shape(self, batch: int, geometry: RoutingGeometry) -> tuple[int, ...]:
        return (batch, geometry.out_height, geometry.out_width, self.out_types)

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, out_types={self.out_types}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, iterations={self.routing.iterations}"
        )
