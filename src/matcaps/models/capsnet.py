"""The matrix-capsule network of Hinton et al. (2018), Figure 1."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from matcaps.layers import ClassCaps, ConvCaps, FeatureNorm, InputNorm, PrimaryCaps, share_workspace
from matcaps.layers.init import BETA_A_INIT_MEAN, BETA_A_INIT_STD, TRANSFORM_INIT_STD, init_conv_, truncated_normal_
from matcaps.models.config import STEM_KERNEL, CapsNetConfig

if TYPE_CHECKING:
    from matcaps.models.cnn import CNNBaseline
    from matcaps.models.config import ModelConfig


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns: the class capsules, poses first like every capsule layer.

    Attributes:
        poses: ``(N, num_classes, P, P)`` class-capsule pose matrices.
        activations: ``(N, num_classes)`` class-capsule activations in (0, 1); the
            prediction is their argmax and the spread loss is computed on them.
    """

    poses: Tensor
    activations: Tensor

    @property
    def scores(self) -> Tensor:
        """``(N, num_classes)`` class scores: the activations."""
        return self.activations


class CapsNet(nn.Module):
    """Matrix capsules with EM routing.

    Shapes:
        * input: ``(N, in_channels, S, S)`` images (standardised);
        * output: :class:`CapsNetOutput` with ``(N, classes, P, P)`` poses and
          ``(N, classes)`` activations (also ``scores``).

    With the default :class:`CapsNetConfig` (32×32 input) the capsule maps are 16×16
    (PrimaryCaps), 7×7 (ConvCaps1) and 5×5 (ConvCaps2).

    Its routed layers share one :class:`~matcaps.routing.RoutingWorkspace`, ``workspace``:
    the scratch memory of the fused routing on CPU, freed with the model or by
    ``model.workspace.release()``.
    """

    #: Loss this network is trained with (see :func:`matcaps.losses.classification_loss`).
    loss_kind = "spread"

    def __init__(self, config: CapsNetConfig = CapsNetConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input_norm = InputNorm(c.in_channels) if c.input_norm else nn.Identity()
        bias = not c.conv_norm  # a batch norm's shift replaces the bias
        self.conv1 = init_conv_(nn.Conv2d(
            c.in_channels, c.conv1_channels, c.conv1_kernel, stride=c.conv1_stride, padding=c.conv1_kernel // 2, bias=bias,
        ))  # fmt: skip
        self.stem = nn.ModuleList(
            init_conv_(nn.Conv2d(c.conv1_channels, c.conv1_channels, STEM_KERNEL, padding=STEM_KERNEL // 2, bias=bias))
            for _ in range(c.stem_convs)
        )  # empty for the paper's network: no parameters, no random draws, old checkpoints load as they are
        # conv_norm: one FeatureNorm per convolution above (conv1 first); empty without it, as the stem.
        self.conv_norms = nn.ModuleList(
            FeatureNorm(c.conv1_channels) for _ in range((1 + c.stem_convs) if c.conv_norm else 0)
        )
        self.primary_caps = PrimaryCaps(c.conv1_channels, c.primary_types, c.pose_size)
        self.conv_caps1 = ConvCaps(
            c.primary_types, c.conv_caps1_types, c.conv_caps1_kernel, c.conv_caps1_stride,
            routing=c.routing_of("conv_caps1"), pose_size=c.pose_size,
        )
        self.conv_caps2 = ConvCaps(
            c.conv_caps1_types, c.conv_caps2_types, c.conv_caps2_kernel, c.conv_caps2_stride,
            routing=c.routing_of("conv_caps2"), pose_size=c.pose_size,
        )
        self.class_caps = ClassCaps(
            c.conv_caps2_types, c.num_classes, routing=c.routing_of("class_caps"),
            coordinate_addition=c.coordinate_addition, pose_size=c.pose_size,
        )
        self._apply_initialisation(c)
        self.workspace = share_workspace(self)

    def _apply_initialisation(self, c: CapsNetConfig) -> None:
        """Redraw transforms and ``β_a`` where the configuration asks for other than IBM's initialisation.

        The layers draw IBM's values themselves; they are redrawn only when a setting differs, so a
        network with the default settings gets exactly the weights it always had for a given seed.
        """
        routed = (self.conv_caps1, self.conv_caps2, self.class_caps)
        with torch.no_grad():
            if c.transform_init_std != TRANSFORM_INIT_STD:
                for layer in routed:
                    truncated_normal_(layer.weight, 0.0, c.transform_init_std)
            if (c.beta_a_init_mean, c.beta_a_init_std) != (BETA_A_INIT_MEAN, BETA_A_INIT_STD):
                for layer in routed:
                    truncated_normal_(layer.beta_a, c.beta_a_init_mean, c.beta_a_init_std)

    def forward(self, images: Tensor) -> CapsNetOutput:
        """``(N, in_channels, S, S)`` images → ``(N, classes, P, P)`` class poses, ``(N, classes)`` activations."""
        features = self.input_norm(images)
        for index, conv in enumerate((self.conv1, *self.stem)):
            features = conv(features)
            if self.conv_norms:
                features = self.conv_norms[index](features)
            features = torch.relu(features)
        poses, activations = self.primary_caps(features)
        poses, activations = self.conv_caps1(poses, activations)
        poses, activations = self.conv_caps2(poses, activations)
        poses, activations = self.class_caps(poses, activations)
        return CapsNetOutput(poses=poses, activations=activations)

    def capsule_layers(self) -> dict[str, nn.Module]:
        """The capsule layers by name, e.g. to hook their activations for logging."""
        return {
            "primary_caps": self.primary_caps,
            "conv_caps1": self.conv_caps1,
            "conv_caps2": self.conv_caps2,
            "class_caps": self.class_caps,
        }

    def capsule_map_sizes(self) -> dict[str, tuple[int, int]]:
        """Spatial size ``(H, W)`` of each capsule map for a ``image_size`` input."""
        c = self.config
        size = (c.image_size + 2 * (c.conv1_kernel // 2) - c.conv1_kernel) // c.conv1_stride + 1
        sizes = {"primary_caps": (size, size)}
        for name, layer in (("conv_caps1", self.conv_caps1), ("conv_caps2", self.conv_caps2)):
            geometry = layer.make_geometry(size, size)
            size = geometry.out_height
            sizes[name] = (geometry.out_height, geometry.out_width)
        return sizes


def build_model(config: "ModelConfig | str" = "smallnorb") -> "CapsNet | CNNBaseline":
    """The network of a configuration or of a model name (a capsule preset or ``cnn-baseline``)."""
    from matcaps.models.cnn import CNNBaseline, CNNBaselineConfig
    from matcaps.models.config import preset

    config = preset(config) if isinstance(config, str) else config
    if isinstance(config, CNNBaselineConfig):
        return CNNBaseline(config)
    return CapsNet(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
