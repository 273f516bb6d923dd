"""Capsule layers: :class:`PrimaryCaps`, :class:`ConvCaps` and :class:`ClassCaps`; and the batch norms
:class:`InputNorm` and :class:`FeatureNorm`.

Every capsule layer takes and returns capsule maps channels last, as
:class:`~matcaps.routing.Capsules` ``(poses, activations)`` of shapes
``(N, H, W, types, P, P)`` and ``(N, H, W, types)``.  :func:`share_workspace` gives the
routed layers of a model one scratch workspace; ``trace()`` and ``trace_on_map()`` of a
routed layer record every EM iteration (:class:`MapTrace`).
"""

from matcaps.layers.class_caps import ClassCaps
from matcaps.layers.conv_caps import ConvCaps
from matcaps.layers.input_norm import FeatureNorm, InputNorm
from matcaps.layers.primary import PrimaryCaps
from matcaps.layers.routed import MapTrace, RoutedCapsules, RoutingInputs, share_workspace  # noqa: F401

# RoutedCapsules (the base class of the routed layers) and RoutingInputs are internal:
# importable for tools and subclasses, not part of the public API.
__all__ = ["ClassCaps", "ConvCaps", "FeatureNorm", "InputNorm", "MapTrace", "PrimaryCaps", "share_workspace"]
