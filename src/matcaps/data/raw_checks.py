"""Sanity checks of raw dataset files against what their dataset must hold.

Run by :func:`~matcaps.data.prepare` on every header **before** any data are read, so a
damaged or hostile header (a count of 2³¹−1, dimensions 14×56 instead of 28×28) is
refused with one line instead of an allocation: the element type, the number of
dimensions and the item shape must be the dataset's (:class:`~matcaps.data.sources.RawLayout`,
the same for the training and the test file, so the two splits always agree), the count
between 1 and the official one, and header + data exactly the file's real (decompressed)
size.  After reading, label and info values must be valid codes and smallNORB's
instances those of the split.  Every failure raises
:class:`~matcaps.errors.DataFormatError` naming the file, the expected and the found value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from matcaps.data.sources import RawLayout
from matcaps.errors import DataFormatError


def check_header(
    path: Path, layout: RawLayout, dtype: np.dtype, shape: Sequence[int], header_bytes: int, content_bytes: int
) -> int:
    """Check a parsed header against ``layout`` and the file's real size; return the item count.

    Args:
        path: the file, for messages.
        layout: what the file must hold.
        dtype: element type announced by the header (any byte order).
        shape: dimensions announced by the header (the count first).
        header_bytes: size of the header as parsed.
        content_bytes: real size of the (decompressed) file.

    Raises:
        DataFormatError: wrong type, number of dimensions, item shape or count, or a size
            that differs from the file's.
    """
    shape = tuple(int(d) for d in shape)
    found = np.dtype(dtype).newbyteorder("=")
    if (
        found != np.dtype(layout.dtype)
        or len(shape) != layout.ndim
        or shape[1:] != layout.item_shape
        or not 1 <= shape[0] <= layout.max_count
    ):
        raise DataFormatError(
            f"{path}: expected {layout.describe()}, the header announces {found.name} of shape {list(shape)}"
        )
    total = header_bytes + math.prod(shape) * found.itemsize
    if total != content_bytes:
        problem, only = ("truncated", "only ") if content_bytes < total else ("size mismatch", "")
        raise DataFormatError(
            f"{path}: {problem}: the header announces {total} bytes in total (shape {list(shape)}), "
            f"the (decompressed) file has {only}{content_bytes}"
        )
    return shape[0]


def check_codes(path: Path, what: str, values: np.ndarray, allowed: frozenset[int]) -> None:
    """Every value of ``values`` must be in ``allowed``; the error lists (up to 5 of) the others."""
    bad = np.setdiff1d(np.unique(values), np.fromiter(allowed, dtype=np.int64))
    if bad.size:
        raise DataFormatError(
            f"{path}: invalid {what} values {bad[:5].tolist()}; expected values in {sorted(allowed)}"
        )


def check_instances(path: Path, split: str, instances: np.ndarray, allowed: frozenset[int]) -> None:
    """smallNORB: the ``-info`` instances of ``split`` must be among that split's ``allowed`` ones."""
    stray = sorted(set(np.unique(instances).tolist()) - allowed)
    if stray:
        raise DataFormatError(
            f"{path}: instances {stray[:5]} do not belong to the {split} split, which holds instances "
            f"{sorted(allowed)} (were the training and testing files swapped?)"
        )
