"""TOML parsing on every Python that matcaps supports: the standard ``tomllib`` from Python 3.11, the
``tomli`` package (the same parser, a dependency on Python 3.10 only) before.

Import it from here (``from matcaps.tomlread import tomllib``), never ``tomllib`` directly: a direct
import fails on Python 3.10 (``tests/test_python_versions.py`` checks this for every module).
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["tomllib"]
