"""Configuration objects of the capsule networks and the named presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from matcaps.errors import ConfigError
from matcaps.layers.init import BETA_A_INIT_MEAN, BETA_A_INIT_STD, TRANSFORM_INIT_STD
from matcaps.models.cnn import CNN_BASELINE, CNNBaselineConfig
from matcaps.models.fields import reject_unknown
from matcaps.routing import PAPER_POSE_SIZE, EMRoutingConfig

#: The routed layers of :class:`~matcaps.models.CapsNet`, in order; the keys of
#: :attr:`CapsNetConfig.layer_routing`.
ROUTED_LAYERS: tuple[str, ...] = ("conv_caps1", "conv_caps2", "class_caps")

#: Kernel of the extra "same" convolutions of :attr:`CapsNetConfig.stem_convs` (ours; VGG-style 3×3).
STEM_KERNEL = 3

#: Integer model options that may be 0 (every other integer option must be positive).
ZERO_ALLOWED_INTS: frozenset[str] = frozenset({"stem_convs"})

#: Routing fields a layer may not set for itself: one implementation computes the whole network
#: (``--routing-impl``, changed on resume when the device changes).
SHARED_ROUTING_FIELDS: frozenset[str] = frozenset({"implementation"})


@dataclass(frozen=True)
class CapsNetConfig:
    """Architecture of a matrix-capsule network (Hinton et al. 2018, Figure 1).

    ``input → batch norm (no affine) → ReLU conv K1/s1 with A channels [→ stem_convs × ReLU
    conv 3×3/1 with A channels] (each conv batch-normalised with conv_norm) → PrimaryCaps (B) → ConvCaps K2/s2 (C) → ConvCaps K3/s3 (D)
    → ClassCaps (classes)``.

    The defaults are the IBM smallNORB network (A=64, B=8, C=D=16): 32×32 input, capsule
    maps of 16×16, 7×7 and 5×5, 67,154 trainable parameters.

    Attributes:
        num_classes: Number of class capsules.
        in_channels: Channels of the input images.
        image_size: Side of the (square) input images; used to report shapes.
        conv1_channels: ``A``, channels of the first (ordinary) convolution.
        conv1_kernel, conv1_stride: Its kernel and stride; it is padded by
            ``conv1_kernel // 2`` ("same" padding), so 32×32 becomes 16×16.
        stem_convs: Further ReLU convolutions of A channels (:data:`STEM_KERNEL` × STEM_KERNEL,
            stride 1, "same" padding) between the first convolution and the primary capsules;
            0 (default) is the paper's network.  Not in the paper: a deeper feature extractor, as
            the CNN baseline has (two convolutions before its classifier); each adds 9·A² + A
            parameters and leaves every capsule map's size as it is.
        conv_norm: Batch-normalise (learned scale and shift, :class:`~matcaps.layers.FeatureNorm`)
            the output of the first convolution and of every ``stem_convs`` convolution before its
            ReLU; those convolutions then have no bias (the norm's shift replaces it), so each adds
            A parameters.  Not in the paper (False): the usual companion of a convolutional
            feature extractor, for faster fitting.
        primary_types: ``B``, primary capsule types.
        conv_caps1_types, conv_caps1_kernel, conv_caps1_stride: ``C`` and the window of ConvCaps1.
        conv_caps2_types, conv_caps2_kernel, conv_caps2_stride: ``D`` and the window of ConvCaps2.
        pose_size: ``P``; poses are ``P×P`` matrices.
        coordinate_addition: Add scaled coordinates to the class-capsule votes.
        input_norm: Batch-normalise the input without learned scale and shift, as IBM does.
        transform_init_std: Std of the truncated normal that initialises the transformation
            matrices of the routed layers (IBM: 1.0).
        beta_a_init_mean, beta_a_init_std: Truncated normal of the initial ``β_a`` of the routed
            layers (IBM: mean −1000, std 500, so that ``λ·β_a`` starts near −0.5 with λ ≈ 1e-3).
        routing: EM-routing hyper-parameters of the three routed layers.
        layer_routing: Changes to ``routing`` for single layers, keyed by layer name
            (:data:`ROUTED_LAYERS`), e.g. ``{"class_caps": {"iterations": 3}}``; a layer not named
            uses ``routing`` unchanged.  Not in the paper, whose layers share one routing: an option
            of this project for asking which layer a third iteration or a softened E-step helps.
            Every field but ``implementation`` may be changed.
    """

    num_classes: int = 5
    in_channels: int = 1
    image_size: int = 32
    conv1_channels: int = 64
    conv1_kernel: int = 5
    conv1_stride: int = 2
    stem_convs: int = 0
    conv_norm: bool = False
    primary_types: int = 8
    conv_caps1_types: int = 16
    conv_caps1_kernel: int = 3
    conv_caps1_stride: int = 2
    conv_caps2_types: int = 16
    conv_caps2_kernel: int = 3
    conv_caps2_stride: int = 1
    pose_size: int = PAPER_POSE_SIZE
    coordinate_addition: bool = True
    input_norm: bool = True
    transform_init_std: float = TRANSFORM_INIT_STD
    beta_a_init_mean: float = BETA_A_INIT_MEAN
    beta_a_init_std: float = BETA_A_INIT_STD
    routing: EMRoutingConfig = field(default_factory=EMRoutingConfig)
    layer_routing: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and f.name in ZERO_ALLOWED_INTS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"model option {f.name} must be a non-negative integer, got {value!r}")
            elif f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"model option {f.name} must be a positive integer, got {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"model option {f.name} must be true or false, got {value!r}")
        for name in ("transform_init_std", "beta_a_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"model option {name} must be a positive number, got {value!r}")
        if isinstance(self.beta_a_init_mean, bool) or not isinstance(self.beta_a_init_mean, (int, float)) \
                or not math.isfinite(self.beta_a_init_mean):
            raise ConfigError(f"model option beta_a_init_mean must be a finite number, got {self.beta_a_init_mean!r}")
        if isinstance(self.routing, dict):  # built from a saved configuration
            object.__setattr__(self, "routing", EMRoutingConfig(**self.routing))
        self._check_layer_routing()

    def _check_layer_routing(self) -> None:
        """Refuse, in one line, an unknown layer, an unknown or shared field, or a bad value."""
        if not isinstance(self.layer_routing, Mapping):
            raise ConfigError(f"model option layer_routing must be a table of layers, got {self.layer_routing!r}")
        unknown = sorted(set(self.layer_routing) - set(ROUTED_LAYERS))
        if unknown:
            raise ConfigError(
                f"model option layer_routing names unknown layer(s) {', '.join(map(str, unknown))}; "
                f"the routed layers are {', '.join(ROUTED_LAYERS)}"
            )
        for layer, changes in self.layer_routing.items():
            if not isinstance(changes, Mapping):
                raise ConfigError(
                    f"model option layer_routing.{layer} must be a table of routing options, got {changes!r}"
                )
            reject_unknown(EMRoutingConfig, changes, f"routing option(s) in layer_routing.{layer}")
            shared = sorted(SHARED_ROUTING_FIELDS & set(changes))
            if shared:
                raise ConfigError(
                    f"layer_routing.{layer} cannot set {', '.join(shared)}: one implementation routes every layer "
                    f"(set it with --routing-impl or routing.implementation)"
                )
        object.__setattr__(self, "layer_routing", {k: dict(v) for k, v in self.layer_routing.items()})
        for layer, changes in self.layer_routing.items():
            routing = self.routing_of(layer)  # building it validates the values
            changes.update({name: getattr(routing, name) for name in changes})  # normalised, e.g. lists → tuples

    def routing_of(self, layer: str) -> EMRoutingConfig:
        """The routing of one routed layer: ``routing`` with that layer's ``layer_routing`` changes."""
        if layer not in ROUTED_LAYERS:
            raise ConfigError(f"{layer!r} is not a routed layer; choose one of {', '.join(ROUTED_LAYERS)}")
        changes = self.layer_routing.get(layer)
        if not changes:
            return self.routing
        try:
            return dataclasses.replace(self.routing, **changes)
        except ConfigError as error:
            raise ConfigError(f"layer_routing.{layer}: {error}") from None

    def replace(self, **changes: Any) -> "CapsNetConfig":
        """A copy with some fields changed (``routing`` may be given as a dict of changes)."""
        routing = changes.pop("routing", None)
        if isinstance(routing, dict):
            changes["routing"] = dataclasses.replace(self.routing, **routing)
        elif routing is not None:
            changes["routing"] = routing
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/TOML-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CapsNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        reject_unknown(cls, values, "model option(s)")
        values = dict(values)
        if isinstance(values.get("routing"), dict):
            reject_unknown(EMRoutingConfig, values["routing"], "routing option(s)")
            values["routing"] = EMRoutingConfig(**values["routing"])
        return cls(**values)


#: Named architectures.  ``smallnorb`` is the IBM network for which Hinton et al. report
#: 2.2 % test error (97.8 % accuracy) with 3 iterations; ``hinton-large`` is the paper's
#: A=B=C=D=32 network; ``mnist`` takes 28×28 images and 10 classes (MNIST, Fashion-MNIST);
#: ``cifar10`` takes 32×32 colour images and widens the first convolution to A=256 (Hinton et al.
#: report 11.9 % CIFAR-10 test error with a wider first layer; the rest of their CIFAR-10 setting
#: is not reproduced here).
PRESETS: dict[str, CapsNetConfig] = {
    "smallnorb": CapsNetConfig(),
    "hinton-large": CapsNetConfig(conv1_channels=32, primary_types=32, conv_caps1_types=32, conv_caps2_types=32),
    "mnist": CapsNetConfig(num_classes=10, image_size=28),
    "cifar10": CapsNetConfig(num_classes=10, in_channels=3, image_size=32, conv1_channels=256),
}


#: Every model name ``--model`` accepts: the capsule presets and the CNN baseline.
MODEL_NAMES: tuple[str, ...] = (*PRESETS, CNN_BASELINE)

#: A network's configuration: a capsule network or the CNN baseline.
ModelConfig = Union[CapsNetConfig, CNNBaselineConfig]


def preset(name: str, **changes: Any) -> ModelConfig:
    """The named model (a capsule preset or ``cnn-baseline``), optionally with some fields changed."""
    if name == CNN_BASELINE:
        return CNNBaselineConfig(**changes)
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config.to_dict()`` for either kind of network (told apart by ``architecture``)."""
    if values.get("architecture") == CNN_BASELINE:
        return CNNBaselineConfig.from_dict(values)
    return CapsNetConfig.from_dict(values)
