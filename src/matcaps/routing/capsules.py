"""The one layout of capsules that every public function and layer returns: ``(poses, activations)``."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

#: Side of the pose matrices in the paper: every capsule has a 4×4 pose (Hinton et al. 2018, §2).
PAPER_POSE_SIZE = 4


class Capsules(NamedTuple):
    """Capsules as a named pair, poses first (the order of every matcaps function and layer).

    Attributes:
        poses: ``(..., P, P)`` pose matrices (``(..., P·P)`` flattened where a routing
            function says so).
        activations: ``(...)`` activations in ``[0, 1]``, one per pose.
    """

    poses: Tensor
    activations: Tensor
