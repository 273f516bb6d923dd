"""Networks: the matrix-capsule :class:`CapsNet` with its :class:`CapsNetConfig` and presets, the
:class:`CNNBaseline` it is compared with, and the pretrained networks (:func:`pretrained`)."""

from matcaps.models.capsnet import CapsNet, CapsNetOutput, build_model, count_parameters
from matcaps.models.cnn import CNN_BASELINE, ClassifierOutput, CNNBaseline, CNNBaselineConfig
from matcaps.models.config import (
    MODEL_NAMES,
    PRESETS,
    ROUTED_LAYERS,
    CapsNetConfig,
    ModelConfig,
    model_config_from_dict,
    preset,
)
from matcaps.models.weights import PretrainedWeights, pretrained, pretrained_names, pretrained_weights

__all__ = [
    "CNN_BASELINE", "MODEL_NAMES", "PRESETS", "ROUTED_LAYERS", "CNNBaseline", "CNNBaselineConfig", "CapsNet",
    "CapsNetConfig", "CapsNetOutput", "ClassifierOutput", "ModelConfig", "PretrainedWeights", "build_model",
    "count_parameters", "model_config_from_dict", "preset", "pretrained", "pretrained_names", "pretrained_weights",
]  # fmt: skip
