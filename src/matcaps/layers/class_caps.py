"""Class capsules: every capsule of the last map votes for every class, with coordinate addition."""

from __future__ import annotations

import torch
from torch import Tensor

from matcaps.layers.routed import RoutedCapsules, RoutingInputs, _routing_config
from matcaps.routing import PAPER_POSE_SIZE, EMRoutingConfig, RoutingGeometry

#: Coordinates are the centres of the receptive fields, scaled to [0, 1]:
#: ``(k + CELL_CENTRE) / size`` for cell ``k`` (0.1, 0.3, …, 0.9 on a 5×5 map).
CELL_CENTRE = 0.5


class ClassCaps(RoutedCapsules):
    """Class capsule layer (Hinton et al. 2018, §3, "Class capsules" and §2.1 "coordinate addition").

    Transformation matrices are shared over positions (one per child type and class).
    Coordinate addition adds the scaled column and row coordinate of each child's position
    to the first two entries of the right-hand column of its vote, the entries that hold a
    translation (``V[0, P−1] += x``, ``V[1, P−1] += y``).  All ``H·W·D`` children then route
    to the classes in one window.

    Args:
        in_types: ``D``, child capsule types.
        num_classes: Number of class capsules.
        routing: EM-routing hyper-parameters (default :class:`EMRoutingConfig`).
        coordinate_addition: Add scaled coordinates to the votes.
        pose_size: ``P``; poses are ``P×P`` matrices.
        iterations: Shortcut for the number of routing iterations (replaces ``routing``'s).

    Shapes:
        * input: ``(poses, activations)`` of shapes ``(N, H, W, D, P, P)`` and ``(N, H, W, D)``
          (channels last);
        * output: :class:`~matcaps.routing.Capsules` ``(poses, activations)`` of shapes
          ``(N, num_classes, P, P)`` and ``(N, num_classes)``.

    Raises:
        InvalidInputError: (when called) the input does not have these shapes.
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        routing: EMRoutingConfig | None = None,
        coordinate_addition: bool = True,
        pose_size: int = PAPER_POSE_SIZE,
        *,
        iterations: int | None = None,
    ) -> None:
        super().__init__(
            (in_types, num_classes, pose_size, pose_size), in_types, num_classes, _routing_config(routing, iterations),
            pose_size,
        )  # fmt: skip
        self.coordinate_addition = coordinate_addition

    def make_geometry(self, height: int, width: int) -> RoutingGeometry:
        return RoutingGeometry.fully_connected(height, width)

    def coordinate_offsets(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(H·W, P·P)``: what coordinate addition adds to the votes of each child position."""
        rows = (torch.arange(height, device=device, dtype=dtype) + CELL_CENTRE) / height
        cols = (torch.arange(width, device=device, dtype=dtype) + CELL_CENTRE) / width
        offsets = torch.zeros(height, width, self.pose_size, self.pose_size, device=device, dtype=dtype)
        offsets[:, :, 0, -1] = cols.view(1, -1)
        offsets[:, :, 1, -1] = rows.view(-1, 1)
        return offsets.view(height * width, -1)

    def routing_inputs(self, poses: Tensor, activations: Tensor) -> RoutingInputs:
        """``(N, H, W, D, P, P)`` poses, ``(N, H, W, D)`` activations → one window of all H·W·D children."""
        n, height, width, child_types = activations.shape
        geometry = self.geometry(height, width, activations.device)
        windows = poses.reshape(n, 1, height * width * child_types, self.pose_size, self.pose_size)
        # Shared over positions: the same D matrices at every position; children ordered (position, type).
        transforms = self.weight.expand(height * width, *self.weight.shape).reshape(-1, *self.weight.shape[1:])
        offsets = None
        if self.coordinate_addition:
            # In the routing's precision: under autocast the poses may be bf16, the coordinates must not be.
            dtype = torch.promote_types(poses.dtype, torch.float32)
            offsets = self.coordinate_offsets(height, width, poses.device, dtype)
            offsets = offsets.repeat_interleave(child_types, dim=0)  # (H·W·D, P·P)
        return RoutingInputs(windows, transforms, activations.reshape(n, 1, -1), geometry, offsets)

    def output_shape(self, batch: int, geometry: RoutingGeometry) -> tuple[int, ...]:
        return (batch, self.out_types)

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, num_classes={self.out_types}, "
            f"coordinate_addition={self.coordinate_addition}, iterations={self.routing.iterations}"
        )
