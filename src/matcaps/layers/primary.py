"""Primary capsules: a 1×1 convolution that turns feature maps into pose matrices and activations."""

from __future__ import annotations

from torch import Tensor, nn

from matcaps.errors import InvalidInputError
from matcaps.layers.init import init_conv_
from matcaps.routing import PAPER_POSE_SIZE, Capsules


class PrimaryCaps(nn.Module):
    """Primary capsule layer (Hinton et al. 2018, §3, "PrimaryCaps").

    At each position, ``B`` capsule types each get a pose (a linear 1×1 convolution of the
    features, reshaped to ``P×P``) and an activation (a sigmoid 1×1 convolution).  No
    routing happens here.

    Args:
        in_channels: ``A``, channels of the input feature map.
        capsule_types: ``B``, capsule types per position.
        pose_size: ``P``; poses are ``P×P`` matrices (4 in the paper).

    Shapes:
        * input: ``(N, A, H, W)`` features;
        * output: :class:`~matcaps.routing.Capsules` ``(poses, activations)`` of shapes
          ``(N, H, W, B, P, P)`` and ``(N, H, W, B)`` (channels last).

    Raises:
        InvalidInputError: (when called) the features are not ``(N, A, H, W)``.
    """

    def __init__(self, in_channels: int, capsule_types: int, pose_size: int = PAPER_POSE_SIZE) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.capsule_types = capsule_types
        self.pose_size = pose_size
        self.pose = init_conv_(nn.Conv2d(in_channels, capsule_types * pose_size * pose_size, kernel_size=1))
        self.activation = init_conv_(nn.Conv2d(in_channels, capsule_types, kernel_size=1))

    def forward(self, features: Tensor) -> Capsules:
        """``(N, A, H, W)`` features → ``(N, H, W, B, P, P)`` poses and ``(N, H, W, B)`` activations."""
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.in_channels:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise InvalidInputError(
                f"PrimaryCaps(in_channels={self.in_channels}) expects features (N, {self.in_channels}, H, W), got {got}"
            )
        n, _, height, width = features.shape
        poses = self.pose(features).permute(0, 2, 3, 1)  # (N, H, W, B·P·P), pose entries fastest
        poses = poses.reshape(n, height, width, self.capsule_types, self.pose_size, self.pose_size)
        activations = self.activation(features).sigmoid().permute(0, 2, 3, 1)  # (N, H, W, B)
        return Capsules(poses, activations)

    def extra_repr(self) -> str:
        return f"capsule_types={self.capsule_types}, pose_size={self.pose_size}"
