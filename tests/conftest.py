"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on a loaded 2-core machine, 2 threads per process are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def blocked_routing_kernel_built() -> None:
    """Build (or load) the blocked routing's kernel once, before any test.

    The first build takes about a minute; done here, it never happens inside a test that
    times its subprocess or kills it (a build killed half-way would leave PyTorch's build
    lock behind).  Where it cannot be built, the tests run with the fused fallback.
    """
    from matcaps.routing.cpu_kernel import load_kernel

    load_kernel()
