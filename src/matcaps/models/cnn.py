"""The CNN baseline of Hinton et al. (2018, §5): the network capsules are compared with.

``input → batch norm (no affine) → conv 5×5 (32) → ReLU → max-pool 2×2 → conv 5×5 (64) →
ReLU → max-pool 2×2 → fully connected (1024) → ReLU → dropout → fully connected (classes)``,
trained with softmax cross-entropy.  The convolutions keep the map size ("same" padding), so
a 32×32 input gives 8×8×64 = 4,096 features and the network has 4.2 M parameters (5 classes);
at 28×28 it is 7×7×64 and 3.3 M.  The paper's exact baseline (two hidden layers of 32 and 64
channels, a 1,024-unit layer) is only described in words; this follows that description and
the usual TensorFlow MNIST tutorial network it matches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from matcaps.errors import ConfigError, InvalidInputError
from matcaps.layers import InputNorm
from matcaps.models.fields import reject_unknown

#: Name under which this architecture is chosen (``--model cnn-baseline``) and saved.
CNN_BASELINE = "cnn-baseline"


@dataclass(frozen=True)
class CNNBaselineConfig:
    """Architecture of the CNN baseline.

    Attributes:
        num_classes: Output classes.
        in_channels: Channels of the input images.
        image_size: Side of the (square) input images; must be divisible by 4 (two 2×2 poolings).
        conv1_channels, conv2_channels: Channels of the two 5×5 convolutions (32 and 64).
        kernel_size: Their kernel (5).
        hidden_units: Width of the fully connected hidden layer (1,024).
        dropout: Drop probability before the output layer (0.5).
        input_norm: Batch-normalise the input without learned scale and shift, as the capsule
            network does (the same preprocessing for both).
        architecture: Always ``"cnn-baseline"``; stored so a saved configuration says what it is.
    """

    num_classes: int = 5
    in_channels: int = 1
    image_size: int = 32
    conv1_channels: int = 32
    conv2_channels: int = 64
    kernel_size: int = 5
    hidden_units: int = 1024
    dropout: float = 0.5
    input_norm: bool = True
    architecture: str = CNN_BASELINE

    def __post_init__(self) -> None:
        for name in ("num_classes", "in_channels", "image_size", "conv1_channels", "conv2_channels",
                     "kernel_size", "hidden_units"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model option {name} must be a positive integer, got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model option kernel_size must be odd (same padding), got {self.kernel_size}")
        if self.image_size % 4:
            raise ConfigError(f"the CNN baseline needs an image size divisible by 4, got {self.image_size}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model option dropout must be in [0, 1), got {self.dropout!r}")
        if self.architecture != CNN_BASELINE:
            raise ConfigError(f"a CNNBaselineConfig has architecture {CNN_BASELINE!r}, got {self.architecture!r}")

    @property
    def feature_size(self) -> int:
        """Inputs of the hidden layer: ``conv2_channels · (image_size / 4)²``."""
        return self.conv2_channels * (self.image_size // 4) ** 2

    def replace(self, **changes: Any) -> "CNNBaselineConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CNNBaselineConfig":
        reject_unknown(cls, values, "option(s) of the CNN baseline")
        return cls(**values)


class ClassifierOutput(NamedTuple):
    """What :class:`CNNBaseline` returns.

    Attributes:
        logits: ``(N, num_classes)`` unnormalised class scores (softmax cross-entropy).
    """

    logits: Tensor

    @property
    def scores(self) -> Tensor:
        """``(N, num_classes)``: the scores whose argmax is the prediction (the logits)."""
        return self.logits


class CNNBaseline(nn.Module):
    """The baseline CNN (see the module docstring).

    Shapes:
        * input: ``(N, in_channels, S, S)`` images (standardised), ``S = config.image_size``
          (divisible by 4; the fully connected layer is sized for it);
        * output: :class:`ClassifierOutput` with ``(N, num_classes)`` logits.
    """

    #: Loss this network is trained with (see :func:`matcaps.losses.classification_loss`).
    loss_kind = "cross_entropy"

    def __init__(self, config: CNNBaselineConfig = CNNBaselineConfig()) -> None:
        super().__init__()
        self.config = c = config
        self.input_norm = InputNorm(c.in_channels) if c.input_norm else nn.Identity()
        padding = c.kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(c.in_channels, c.conv1_channels, c.kernel_size, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c.conv1_channels, c.conv2_channels, c.kernel_size, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c.feature_size, c.hidden_units),
            nn.ReLU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.hidden_units, c.num_classes),
        )

    def forward(self, images: Tensor) -> ClassifierOutput:
        """``(N, in_channels, S, S)`` images → ``(N, num_classes)`` logits."""
        size = self.config.image_size
        if isinstance(images, Tensor) and images.dim() == 4 and tuple(images.shape[2:]) != (size, size):
            raise InvalidInputError(f"{type(self).__name__} was built for {size}×{size} images (its fully connected "
                                    f"layer depends on the size), got {tuple(images.shape)}")
        return ClassifierOutput(logits=self.classifier(self.features(self.input_norm(images))))


def build_cnn_baseline(config: CNNBaselineConfig) -> CNNBaseline:
    """A :class:`CNNBaseline` (PyTorch's default initialisation)."""
    return CNNBaseline(config)


__all__ = ["CNN_BASELINE", "CNNBaseline", "CNNBaselineConfig", "ClassifierOutput", "build_cnn_baseline"]
