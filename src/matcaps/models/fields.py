"""Reading configuration dataclasses back from plain dicts: unknown keys are refused by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from matcaps.errors import ConfigError


def reject_unknown(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``values`` that is not a field of ``cls``.

    ``what`` completes the message: "unknown {what}: a, b".
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}")
