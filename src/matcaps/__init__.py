"""matcaps: Matrix Capsules with EM Routing (Hinton, Sabour & Frosst, ICLR 2018) in PyTorch.

The main names, importable from here:

* models: :class:`CapsNet` (returns :class:`CapsNetOutput`), :class:`CapsNetConfig`,
  :func:`build_model`, :func:`preset`;
* layers: :class:`PrimaryCaps`, :class:`ConvCaps`, :class:`ClassCaps`, :class:`InputNorm`
  (capsule maps channels last, returned as :class:`Capsules` ``(poses, activations)``);
* routing: :func:`em_routing`, :func:`route_capsules`, :class:`EMRoutingConfig`,
  :class:`RoutingGeometry`;
* loss: :class:`SpreadLoss`; errors: :class:`MatcapsError` (base of every error a user can cause).

They are imported on first use, so ``import matcaps`` alone does not import torch (the
benchmark sets the allocator before torch allocates anything).  The sub-packages hold the
rest: ``matcaps.routing``, ``matcaps.layers``, ``matcaps.models``, ``matcaps.losses``,
``matcaps.data``; ``matcaps.train``, ``matcaps.bench`` and ``matcaps.cli`` are the
application behind the ``matcaps`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Exported name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "CapsNet": "matcaps.models",
    "CapsNetConfig": "matcaps.models",
    "CapsNetOutput": "matcaps.models",
    "build_model": "matcaps.models",
    "preset": "matcaps.models",
    "ClassCaps": "matcaps.layers",
    "ConvCaps": "matcaps.layers",
    "InputNorm": "matcaps.layers",
    "PrimaryCaps": "matcaps.layers",
    "Capsules": "matcaps.routing",
    "EMRoutingConfig": "matcaps.routing",
    "RoutingGeometry": "matcaps.routing",
    "em_routing": "matcaps.routing",
    "route_capsules": "matcaps.routing",
    "SpreadLoss": "matcaps.losses",
    "MatcapsError": "matcaps.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from matcaps.errors import MatcapsError
    from matcaps.layers import ClassCaps, ConvCaps, InputNorm, PrimaryCaps
    from matcaps.losses import SpreadLoss
    from matcaps.models import CapsNet, CapsNetConfig, CapsNetOutput, build_model, preset
    from matcaps.routing import Capsules, EMRoutingConfig, RoutingGeometry, em_routing, route_capsules


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'matcaps' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
