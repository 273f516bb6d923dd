"""Seeding and deterministic algorithms: what makes two runs of the same configuration equal."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

#: cuBLAS workspace setting that makes its results reproducible (PyTorch's reproducibility notes).
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python ``random`` (model initialisation draws from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def use_deterministic_algorithms() -> None:
    """Make every operation reproducible, CUDA included (``--deterministic``).

    ``index_add``/``index_select`` backward (the routing's cross-position normaliser) use
    atomics on CUDA unless deterministic algorithms are requested; cuBLAS needs a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts, so set it before the
    first CUDA matrix product).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
