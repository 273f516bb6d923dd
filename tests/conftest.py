"""Fixtures shared by several test modules.

The ``triton`` routing runs on CPU tensors only under Triton's interpreter, which Triton
enables for the kernels it defines while ``TRITON_INTERPRET=1``; it is set here, before any
test module imports torch (which imports Triton) or the kernel, unless the caller chose:
``TRITON_INTERPRET=0 pytest tests/test_routing_triton.py`` runs the compiled kernel's CUDA
tests on a GPU machine instead.  Tests parametrised with ``implementation="triton"`` are
skipped, with the reason, where the kernel cannot run on CPU (Triton missing, or the
interpreter switched off).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: Fixtures of the command-line tests (a tiny prepared smallNORB and a finished run), defined once.
pytest_plugins = ["cli_fixtures"]


@pytest.fixture(scope="session")
def routing_probe() -> ModuleType:
    """``scripts/routing_probe.py`` imported as a module (``scripts/`` is not a package)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "routing_probe.py"
    spec = importlib.util.spec_from_file_location("routing_probe", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on a loaded 2-core machine, 2 threads per process are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def triton_cpu_skip_reason() -> str | None:
    """Why the ``triton`` routing cannot run on CPU tensors in this process, or None if it can."""
    from matcaps.routing.triton_routing import interpreter_active, triton_import_error

    problem = triton_import_error()
    if problem is not None:
        return f"triton is not importable ({problem}); install matcaps[triton]"
    if not interpreter_active():
        return "Triton's interpreter is off (TRITON_INTERPRET=0): the triton routing needs CUDA tensors"
    return None


@pytest.fixture(autouse=True)
def _skip_triton_on_cpu_without_interpreter(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("implementation") == "triton":
        reason = triton_cpu_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_mnist_run(tmp_path_factory: pytest.TempPathFactory):
    """A tiny capsule network trained for four epochs on a tiny prepared MNIST (50 + 10 training,
    20 test images): ``(run directory, data root)``."""
    from data_fixtures import write_tiny_mnist
    from train_support import TINY_MODEL_OPTIONS

    from matcaps.cli import main
    from matcaps.data import prepare

    root = tmp_path_factory.mktemp("tiny-mnist")
    write_tiny_mnist(root, n_train=60, n_test=20)
    prepare("mnist", root, download=False, progress=False, verify=False)
    run = tmp_path_factory.mktemp("tiny-mnist-run") / "run"
    options = ["--dataset", "mnist", "--data-root", str(root), "--run-dir", str(run), "--epochs", "4",
               "--batch-size", "10", "--val-size", "10", "--workers", "0", "--no-progress", "--device", "cpu",
               "--histogram-every", "0"]  # fmt: skip
    for key, value in TINY_MODEL_OPTIONS.items():
        options += ["--model-option", f"{key}={value}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *options]) == 0
    finally:
        torch.set_num_threads(threads)
    return run, root


@pytest.fixture(scope="session", autouse=True)
def blocked_routing_kernel_built() -> None:
    """Build (or load) the blocked routing's kernel once, before any test.

    The first build takes about a minute; done here, it never happens inside a test that
    times its subprocess or kills it (a build killed half-way would leave PyTorch's build
    lock behind).  Where it cannot be built, the tests run with the fused fallback.
    """
    from matcaps.routing.cpu_kernel import load_kernel

    load_kernel()
