"""Capsule networks: :class:`CapsNet`, its :class:`CapsNetConfig` and named presets."""

from matcaps.models.capsnet import CapsNet, CapsNetOutput, build_model, count_parameters
from matcaps.models.config import PRESETS, CapsNetConfig, preset

__all__ = ["PRESETS", "CapsNet", "CapsNetConfig", "CapsNetOutput", "build_model", "count_parameters", "preset"]
