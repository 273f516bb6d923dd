"""Off-screen matplotlib figures written as PNGs: one place for the backend choice and the close.

matplotlib is imported on first use, so commands that draw nothing start without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matcaps.fsutil import save_png_atomic


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the off-screen Agg backend (no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_and_close(figure: Any, path: str | Path, dpi: int) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (see :func:`matcaps.fsutil.save_png_atomic`), then
    close it, also when writing fails, so that figures do not pile up in pyplot's registry."""
    try:
        return save_png_atomic(figure, path, dpi=dpi)
    finally:
        pyplot().close(figure)
