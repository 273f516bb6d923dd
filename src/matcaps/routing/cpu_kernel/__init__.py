"""The compiled CPU kernel of the blocked routing (``routing_cpu.cpp``), built on first use.

:func:`load_kernel` compiles the C++ source with ``torch.utils.cpp_extension.load`` (g++ and
ninja, OpenMP, ``-O3 -march=native``) into PyTorch's extension cache: ``$TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``.  The first build takes about a minute; later processes
load the cached library in well under a second.  The extension's name carries a digest of
the CPU's instruction-set flags, so a cache shared by different machines never hands one
a library built for another's instructions (the source and the flags are hashed by PyTorch).

A build killed half-way (Ctrl-C, a timeout) leaves PyTorch's build lock behind, on which every later
process would wait for ever; :func:`wait_for_build_lock` waits for another process's build for at
most :data:`STALE_BUILD_LOCK_SECONDS`, then removes the lock as stale (one warning line).

Where the kernel cannot be built (no compiler, no ninja, a failed build), one warning line
is logged (logger ``matcaps.routing``; printed to stderr when logging is not configured),
once per process, and :func:`load_kernel` returns None: the caller then uses the ``fused``
routing, which gives the same numbers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

#: The C++ source of the kernel, shipped as package data.
SOURCE = Path(__file__).with_name("routing_cpu.cpp")
#: Prefix of the extension's name in PyTorch's cache.
EXTENSION_PREFIX = "matcaps_blocked_routing"
#: Compiler flags: optimised, vectorised for this CPU, OpenMP (``at::parallel_for`` is inlined
#: from PyTorch's headers and needs it to run on several threads).
COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp")
LINK_FLAGS: tuple[str, ...] = ("-fopenmp",)
#: The file PyTorch's builder holds while it builds (``torch.utils.file_baton.FileBaton``).
BUILD_LOCK_NAME = "lock"
#: A build takes about a minute (several on a loaded machine); a lock older than this was left by a
#: build that was killed, and is removed.
STALE_BUILD_LOCK_SECONDS = 15 * 60
#: How often a waiting process looks at the lock again, seconds.
BUILD_LOCK_POLL_SECONDS = 1.0

logger = logging.getLogger("matcaps.routing")


def cpu_tag() -> str:
    """A short digest of this CPU's model and instruction-set flags (part of the extension's name)."""
    description = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features", "model name")):
                    description += line
    except OSError:
        description += platform.processor()
    return hashlib.sha256(description.encode()).hexdigest()[:12]


def missing_build_tool(cpp_extension: ModuleType) -> str | None:
    """Why the kernel cannot be built here (no C++ compiler, no ninja), or None.

    Checked before calling PyTorch's builder, which would otherwise print its own
    multi-line complaints before failing.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found (install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def wait_for_build_lock(
    build_directory: Path,
    stale_after: float = STALE_BUILD_LOCK_SECONDS,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Wait while another process builds in ``build_directory``; remove its lock once it is stale.

    Returns True if a stale lock (last touched ``stale_after`` seconds ago or more) was removed.
    """
    lock = build_directory / BUILD_LOCK_NAME
    while True:
        try:
            age = clock() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after:
            lock.unlink(missing_ok=True)
            logger.warning("matcaps: removed %s, a build lock %.0f minutes old left by an interrupted build", lock,
                           age / 60)  # fmt: skip
            return True
        sleep(BUILD_LOCK_POLL_SECONDS)


def build_directory_of(cpp_extension: ModuleType, name: str) -> Path | None:
    """Where PyTorch builds and caches the extension ``name`` (None if this PyTorch does not say)."""
    locate = getattr(cpp_extension, "_get_build_directory", None)
    return Path(locate(name, False)) if callable(locate) else None


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled kernel module (``forward``, ``backward``), or None where it cannot be built.

    Builds on the first call of a process if the cache holds no library for this source,
    these flags and this CPU.  On failure, logs one warning line (once: the result is cached).
    """
    try:
        from torch.utils import cpp_extension

        missing = missing_build_tool(cpp_extension)
        if missing:
            raise RuntimeError(missing)
        name = f"{EXTENSION_PREFIX}_{cpu_tag()}"
        build_directory = build_directory_of(cpp_extension, name)
        if build_directory is not None:
            wait_for_build_lock(build_directory)
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(COMPILE_FLAGS),
            extra_ldflags=list(LINK_FLAGS),
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means: use the fused routing
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        logger.warning(
            "matcaps: the blocked routing's C++ kernel could not be built (%s); using the fused routing", reason
        )
        return None
