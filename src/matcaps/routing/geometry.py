"""The spatial routing map: which child capsule positions each parent position reads.

A routed capsule layer reads, for each of its ``L`` parent positions, a *window* of ``S``
child positions (``S = K·K`` for a convolutional capsule layer, ``S = H·W`` for the class
capsules).  A child position can fall in several windows (overlapping kernels) or in none
(positions dropped by a stride that does not divide the map).  Gritzman's first fix makes
every child distribute one unit of routing weight over **all** parents it reaches, at every
position and of every type, so the E-step needs, for each child, a sum over the windows it
belongs to.  :class:`RoutingGeometry` provides that sum (and a max, for a stable
log-sum-exp) as a scatter over a precomputed ``(L, S)`` index map, so memory stays linear
in the spatial size instead of the ``parents × children`` dense tensor of the TensorFlow
implementation.

Index conventions used throughout the package:
    * child positions are flattened row-major, ``p = y·W + x`` with ``0 ≤ p < P = H·W``;
    * window slots are flattened row-major over the kernel, ``s = ky·K + kx``;
    * the children of one window are ordered ``(slot, child type)``, ``i = s·B + b``;
    * slots that fall in zero padding point at an extra, always-empty position ``P``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from matcaps.errors import ConfigError, InvalidInputError


@dataclass(frozen=True)
class RoutingGeometry:
    """Mapping from window slots to child positions for one routed layer.

    Attributes:
        in_height, in_width: Size ``(H, W)`` of the child capsule map.
        out_height, out_width: Size ``(OH, OW)`` of the parent capsule map (``L = OH·OW``).
        slot_child_index: ``(L, S)`` int64; the flattened child position read by each
            window slot, or ``P = H·W`` for a slot in the zero padding.
    """

    in_height: int
    in_width: int
    out_height: int
    out_width: int
    slot_child_index: Tensor
    _flat_index: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expected = (self.out_height * self.out_width,)
        if self.slot_child_index.dim() != 2 or self.slot_child_index.shape[:1] != expected:
            raise InvalidInputError(
                f"slot_child_index must have shape (L={expected[0]}, S), got {tuple(self.slot_child_index.shape)}"
            )
        object.__setattr__(self, "_flat_index", self.slot_child_index.reshape(-1))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def conv(cls, in_height: int, in_width: int, kernel_size: int, stride: int = 1, padding: int = 0) -> "RoutingGeometry":
        """Windows of a ``K×K`` convolution with the given stride and zero padding.

        The parent map has ``OH = ⌊(H + 2·padding − K)/stride⌋ + 1`` rows (likewise
        columns), as for ``torch.nn.Conv2d``.
        """
        if kernel_size < 1 or stride < 1 or padding < 0:
            raise ConfigError(
                f"invalid capsule convolution: kernel {kernel_size}, stride {stride}, padding {padding}"
            )
        out_height = (in_height + 2 * padding - kernel_size) // stride + 1
        out_width = (in_width + 2 * padding - kernel_size) // stride + 1
        if out_height < 1 or out_width < 1:
            raise ConfigError(
                f"a {kernel_size}x{kernel_size} capsule kernel with stride {stride} and padding {padding} "
                f"does not fit a {in_height}x{in_width} capsule map"
            )
        rows = torch.arange(out_height).view(-1, 1, 1, 1) * stride - padding + torch.arange(kernel_size).view(1, 1, -1, 1)
        cols = torch.arange(out_width).view(1, -1, 1, 1) * stride - padding + torch.arange(kernel_size).view(1, 1, 1, -1)
        rows, cols = torch.broadcast_tensors(rows, cols)  # (OH, OW, K, K)
        inside = (rows >= 0) & (rows < in_height) & (cols >= 0) & (cols < in_width)
        padding_position = in_height * in_width
        index = torch.where(inside, rows * in_width + cols, torch.full_like(rows, padding_position))
        return cls(in_height, in_width, out_height, out_width, index.reshape(out_height * out_width, -1))

    @classmethod
    def fully_connected(cls, in_height: int, in_width: int) -> "RoutingGeometry":
        """One window holding every child position (the class-capsule layer)."""
        index = torch.arange(in_height * in_width).view(1, -1)
        return cls(in_height, in_width, 1, 1, index)

    # ------------------------------------------------------------------ sizes
    @property
    def num_child_positions(self) -> int:
        """``P = H·W``."""
        return self.in_height * self.in_width

    @property
    def num_windows(self) -> int:
        """``L = OH·OW``, the number of parent positions."""
        return self.slot_child_index.shape[0]

    @property
    def window_size(self) -> int:
        """``S``, child positions per window (``K·K`` or ``H·W``)."""
        return self.slot_child_index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.slot_child_index.device

    def to(self, device: torch.device | str) -> "RoutingGeometry":
        """The same geometry with its index on ``device``."""
        device = torch.device(device)
        if self.slot_child_index.device == device:
            return self
        return type(self)(self.in_height, self.in_width, self.out_height, self.out_width, self.slot_child_index.to(device))

    # ------------------------------------------------------------------ static maps
    def slot_is_child(self) -> Tensor:
        """``(L, S)`` bool: the slot reads a real child (not zero padding)."""
        return self.slot_child_index < self.num_child_positions

    def parents_per_child(self) -> Tensor:
        """``(P,)`` int64: number of windows (parent positions) containing each child position.

        Zero for a child position that no parent reads.
        """
        counts = torch.zeros(self.num_child_positions + 1, dtype=torch.int64, device=self.device)
        counts.index_add_(0, self._flat_index, torch.ones_like(self._flat_index))
        return counts[:-1]

    def initial_assignment(self, child_types: int, parent_types: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Routing weights before the first M-step, ``r_ij = 1 / (|P(x)| · C_out)``.

        ``|P(x)|`` is the number of parent positions whose window contains the child's
        position ``x``, so each child's weights sum to one over every parent it reaches.
        Slots in the zero padding get weight 0.

        Returns:
            ``(L, 1, S·B)`` tensor, to broadcast against routing weights ``(N, L, C, S·B)``.
        """
        padding_count = torch.zeros(1, dtype=torch.int64, device=self.device)
        counts = torch.cat([self.parents_per_child(), padding_count])
        per_slot = counts[self.slot_child_index].to(dtype)  # (L, S); padding slots read 0
        prior = torch.where(per_slot > 0, 1.0 / (per_slot.clamp(min=1) * parent_types), torch.zeros_like(per_slot))
        return prior.repeat_interleave(child_types, dim=1).unsqueeze(1)

    # ------------------------------------------------------------------ gather / scatter
    def gather(self, children: Tensor) -> Tensor:
        """Read every window from a child map.

        Args:
            children: ``(N, P, *F)``, one entry per child position.

        Returns:
            ``(N, L, S, *F)``; slots in the zero padding read zeros.
        """
        n, p, *features = children.shape
        if p != self.num_child_positions:
            raise InvalidInputError(f"expected {self.num_child_positions} child positions, got {p}")
        padded = torch.cat([children, children.new_zeros(n, 1, *features)], dim=1)
        return self.gather_extended(padded)

    def gather_extended(self, extended: Tensor) -> Tensor:
        """Like :meth:`gather` from a ``(N, P + 1, *F)`` map whose last row is the padding."""
        n, _, *features = extended.shape
        return extended.index_select(1, self._flat_index).view(n, self.num_windows, self.window_size, *features)

    def scatter_sum(self, windows: Tensor) -> Tensor:
        """Sum window entries onto the child positions they read.

        Args:
            windows: ``(N, L, S, *F)``.

        Returns:
            ``(N, P + 1, *F)``; row ``P`` collects the padding slots, rows of children that
            no window reads are zero.
        """
        n, _, _, *features = windows.shape
        flat = windows.reshape(n, -1, *features)
        out = flat.new_zeros(n, self.num_child_positions + 1, *features)
        return out.index_add(1, self._flat_index, flat)

    def scatter_max(self, windows: Tensor) -> Tensor:
        """Maximum over the window entries of each child position (no gradient).

        Args:
            windows: ``(N, L, S, *F)``.

        Returns:
            ``(N, P + 1, *F)``; ``-inf`` rows for children that no window reads.
        """
        n, _, _, *features = windows.shape
        flat = windows.detach().reshape(n, -1, *features)
        index = self._flat_index.view(1, -1, *([1] * len(features))).expand_as(flat)
        out = flat.new_full((n, self.num_child_positions + 1, *features), float("-inf"))
        return out.scatter_reduce(1, index, flat, reduce="amax", include_self=True)

    def windows_to_map(self, values: Tensor, child_types: int) -> Tensor:
        """Place per-window values of children at the child positions they read.

        Args:
            values: ``(N, L, C, S·B)``, one value per parent (window and type) and child of
                its window, children ordered (slot, type) like the routing weights.
            child_types: ``B``.

        Returns:
            ``(N, L, C, H·W, B)``; entry ``[n, l, c, p, b]`` is the value of child ``(p, b)``
            in window ``l``, 0 where the window does not read position ``p`` (padding slots
            are dropped).
        """
        n, num_windows, parent_types, _ = values.shape
        per_slot = values.reshape(n, num_windows, parent_types, self.window_size, child_types)
        index = self.slot_child_index.view(1, num_windows, 1, self.window_size, 1).expand_as(per_slot)
        out = values.new_zeros(n, num_windows, parent_types, self.num_child_positions + 1, child_types)
        return out.scatter_add(3, index, per_slot)[:, :, :, : self.num_child_positions]
