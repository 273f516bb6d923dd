"""Capsule layers: :class:`PrimaryCaps`, :class:`ConvCaps` and :class:`ClassCaps`; and :class:`InputNorm`."""

from matcaps.layers.class_caps import ClassCaps
from matcaps.layers.conv_caps import ConvCaps
from matcaps.layers.input_norm import InputNorm
from matcaps.layers.primary import PrimaryCaps
from matcaps.layers.routed import RoutedCapsules, RoutingInputs

__all__ = ["ClassCaps", "ConvCaps", "InputNorm", "PrimaryCaps", "RoutedCapsules", "RoutingInputs"]
