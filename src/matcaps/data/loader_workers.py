"""Data-loader workers that leave SIGINT / SIGTERM to the process that forked them.

Ctrl-C in a terminal reaches every process of the job's process group, and so does a batch system's
SIGTERM.  ``matcaps train`` stops cleanly on either (:mod:`matcaps.train.interrupt`), but a
data-loader worker that died of the signal would fail the main process's next fetch with
"DataLoader worker ... is killed by signal".  Every loader that ``matcaps`` iterates during a
training (its batches and its validation) therefore

* forks its workers with both signals held (:func:`iterate_with_workers_forked_quietly`): a signal
  that arrives before a worker has set them aside waits instead of meeting PyTorch's own worker
  handler, which dies of a SIGTERM that its parent did not send; and
* gives them :func:`ignore_stop_signals` as ``worker_init_fn`` (:func:`quiet_worker_init`), which
  ignores both signals and only then releases them.

Workers still end when their parent does (PyTorch's workers watch it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

#: The signals that ask a training to stop with a checkpoint, and that workers leave to their parent.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

Batch = TypeVar("Batch")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a data loader: its workers leave the stop signals to the main process.

    Ignores them, then releases them if they were held (a signal held meanwhile is dropped).
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def quiet_worker_init(workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` to give a ``DataLoader`` with ``workers`` workers (None without workers)."""
    return ignore_stop_signals if workers > 0 else None


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold (block) the stop signals in this thread, e.g. while data-loader workers are forked.

    Forked processes (one thread: this one) inherit the held signals until
    :func:`ignore_stop_signals` releases them.  In this process a signal that arrives meanwhile is
    delivered on exit, or at once through another thread that does not hold it (PyTorch's own
    threads); a handler that only records it (:class:`matcaps.train.interrupt.StopSignals`) is
    fine with either.  Nothing is held outside the main thread or where the platform cannot hold
    signals.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def iterate_with_workers_forked_quietly(loader: Iterable[Batch]) -> Iterator[Batch]:
    """``iter(loader)`` with the stop signals held: a ``DataLoader`` forks its workers right here.

    Call it on the loader itself, not on a progress bar around it (a tqdm bar only starts the
    loader at its first batch, after the signals are released again).
    """
    with stop_signals_held():
        return iter(loader)
