"""Where real dataset files are at hand, for the tests that use them (skipped elsewhere; no tests here).

The raw files are looked for in ``$MATCAPS_REAL_DATA/<dataset>/`` or, failing that, in
``../shared/datasets/<dataset>/`` next to the repository (offline copies some machines have);
the project never depends on them.  ``$MATCAPS_REAL_DATA/<dataset>/prepared`` may instead hold a
prepared cache (``matcaps data <dataset> --root $MATCAPS_REAL_DATA``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from matcaps.data import is_valid_cache, prepare
from matcaps.data.sources import source_files

#: Environment variable naming a directory with ``<dataset>/`` folders of real raw files.
REAL_DATA_ENV = "MATCAPS_REAL_DATA"


def real_data_base() -> Path:
    """``$MATCAPS_REAL_DATA``, else ``../shared/datasets`` beside the repository."""
    configured = os.environ.get(REAL_DATA_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def real_data_dir(name: str) -> Path:
    """The folder holding the real raw files of ``name``, or skip the test."""
    folder = real_data_base() / name
    missing = [s.filename for s in source_files(name) if not (folder / s.filename).is_file()]
    if missing:
        pytest.skip(f"real {name} files not available: {missing[0]} is not in {folder} (see ${REAL_DATA_ENV})")
    return folder


def real_data_root(name: str, scratch: Path) -> Path:
    """A data root with a verified cache of the real ``name``: the prepared one at hand, or one
    prepared into ``scratch`` from the real raw files (links, no copies); else skip the test."""
    base = real_data_base()
    if is_valid_cache(name, base, verified=True):
        return base
    folder = real_data_dir(name)
    raw = scratch / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for source in source_files(name):
        link = raw / source.filename
        if not link.exists():
            link.symlink_to(folder / source.filename)
    prepare(name, scratch, download=False, progress=False, verify=True)
    return scratch
