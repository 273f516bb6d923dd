"""Exceptions that the library raises for bad input.

Every error a user can cause (a corrupt file, an impossible configuration, a missing
checkpoint) is raised as a subclass of :class:`MatcapsError` with a message that names
the offending file or value.  The command-line interface catches exactly these and
prints the message as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MatcapsError(Exception):
    """Base class of every user-facing error raised by matcaps."""


class ConfigError(MatcapsError, ValueError):
    """An option or configuration value is invalid."""


class DataFormatError(MatcapsError, ValueError):
    """A data file is truncated, corrupted or not in the expected format."""


class DownloadError(MatcapsError, OSError):
    """A dataset file could not be downloaded."""


class DatasetNotFoundError(MatcapsError, FileNotFoundError):
    """A prepared dataset or its source files are missing."""


class CheckpointError(MatcapsError, OSError):
    """A checkpoint or run directory is missing or unreadable."""


class InvalidInputError(MatcapsError, ValueError):
    """A tensor given to a layer or routing function has the wrong shape, dtype or device."""


class UnsupportedOperationError(MatcapsError, RuntimeError):
    """An operation the chosen implementation does not support (the message names the alternative)."""


def describe_tensor(value: object) -> str:
    """``(2, 3) float32`` for a tensor (anything with a shape and a dtype), the type's name for anything
    else: how error messages name what they were given."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
    return type(value).__name__
