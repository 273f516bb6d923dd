"""matcaps supports Python 3.10 (``requires-python``): no source file may need a newer Python.

CI runs one Python (3.11 here), so what only 3.10 would reject is checked statically: the syntax of
every file, and that ``tomllib`` (new in 3.11) is imported only through :mod:`matcaps.tomlread`, whose
fallback to ``tomli`` is exercised with the standard module hidden.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import types
from pathlib import Path

import pytest

import matcaps.tomlread

#: The repository root (tests/ is one level below it).
ROOT = Path(__file__).resolve().parent.parent
#: The oldest Python that ``pyproject.toml`` admits.
OLDEST_PYTHON = (3, 10)
#: Folders holding the project's Python files.
SOURCE_FOLDERS = ("src", "scripts", "tests")
#: The one module allowed to import ``tomllib`` (it falls back to ``tomli``).
TOML_SHIM = ROOT / "src" / "matcaps" / "tomlread.py"


def python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of the modules that ``tree`` imports (``a`` for ``import a.b`` and ``from a.b import c``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_oldest_python_is_the_one_the_package_declares():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', text)
    assert declared is not None and tuple(map(int, declared.groups())) == OLDEST_PYTHON
    assert re.search(r""""tomli>=[\d.]+; python_version < '3\.11'",""", text), "tomli must be a dependency on 3.10"


def test_every_file_parses_as_the_oldest_python():
    files = python_files()
    assert len(files) > 100
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=OLDEST_PYTHON)


def test_tomllib_is_imported_only_through_the_shim():
    offenders = [str(path.relative_to(ROOT)) for path in python_files()
                 if path != TOML_SHIM and "tomllib" in imported_modules(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == [], f"import tomllib through matcaps.tomlread in: {', '.join(offenders)}"


def test_the_import_scan_sees_a_direct_tomllib_import():
    assert imported_modules(ast.parse("import tomllib as t\nfrom json import loads")) == {"tomllib", "json"}
    assert "tomllib" in imported_modules(ast.parse("def f():\n    from tomllib import loads"))


@pytest.fixture
def restore_shim():
    yield
    importlib.reload(matcaps.tomlread)


def test_the_shim_falls_back_to_tomli_without_tomllib(monkeypatch, restore_shim):
    standard = matcaps.tomlread.tomllib
    fake_tomli = types.ModuleType("tomli")
    fake_tomli.loads = lambda text: {"parsed_by": "tomli"}
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python 3.10 has: no such module
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    importlib.reload(matcaps.tomlread)
    assert matcaps.tomlread.tomllib is fake_tomli
    assert matcaps.tomlread.tomllib.loads("a = 1") == {"parsed_by": "tomli"}
    monkeypatch.undo()
    importlib.reload(matcaps.tomlread)
    assert matcaps.tomlread.tomllib is standard
    assert matcaps.tomlread.tomllib.loads("a = 1") == {"a": 1}
