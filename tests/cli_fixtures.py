"""Fixtures of the command-line tests: a tiny prepared smallNORB, a fast configuration, a finished run.

Registered in ``conftest.py`` (``pytest_plugins``); module-scoped, so each test module gets its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import write_tiny_smallnorb
from train_support import TINY_MODEL_OPTIONS

from matcaps.cli import main
from matcaps.data import prepare
from matcaps.train.config import to_toml

#: Fast options: 80 training images in the fixture once instance 4 is held out → 10 steps per epoch.
FAST = {"batch_size": 8, "epochs": 2, "workers": 0, "progress": False, "log_every": 3, "checkpoint_every": 5,
        "device": "cpu", "model_options": TINY_MODEL_OPTIONS}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A tiny smallNORB in NYU's format, prepared (without checksums: it is not the official data)."""
    root = tmp_path_factory.mktemp("data")
    write_tiny_smallnorb(root)
    prepare("smallnorb", root, download=False, progress=False, verify=False)
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, data_root) -> Path:
    path = tmp_path_factory.mktemp("config") / "fast.toml"
    path.write_text(to_toml({**FAST, "data_root": str(data_root)}))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, config_file) -> Path:
    """A finished 2-epoch run (20 steps); tests that change it work on a copy."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test fixture
    try:
        assert main(["train", "--config", str(config_file), "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run
