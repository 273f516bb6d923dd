"""Networks: the matrix-capsule :class:`CapsNet` with its :class:`CapsNetConfig` and presets, and the
:class:`CNNBaseline` it is compared with."""

from matcaps.models.capsnet import CapsNet, CapsNetOutput, build_model, count_parameters
from matcaps.models.cnn import CNN_BASELINE, ClassifierOutput, CNNBaseline, CNNBaselineConfig
from matcaps.models.config import MODEL_NAMES, PRESETS, CapsNetConfig, ModelConfig, model_config_from_dict, preset

__all__ = [
    "CNN_BASELINE", "MODEL_NAMES", "PRESETS", "CNNBaseline", "CNNBaselineConfig", "CapsNet", "CapsNetConfig",
    "CapsNetOutput", "ClassifierOutput", "ModelConfig", "build_model", "count_parameters", "model_config_from_dict",
    "preset",
]  # fmt: skip
