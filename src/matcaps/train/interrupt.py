"""Stopping a training cleanly on SIGINT (Ctrl-C) or SIGTERM (a batch system's time limit, ``kill``).

``matcaps train`` runs inside :class:`StopSignals`: the first of these signals is only recorded,
the trainer sees it after the step it interrupted, writes ``last.pt`` as at a time limit and
stops, so ``--resume`` continues from that very step.  A second signal stops at once (Python's
``KeyboardInterrupt``), for a user who will not wait for the step.  Data-loader workers ignore
both signals (:func:`ignore_stop_signals`): Ctrl-C reaches every process of the terminal's
process group, and a worker dying of it would fail the main process's next fetch.  Workers are
forked with both signals held (:func:`stop_signals_held`), so one that arrives before a worker
has set them aside waits, and is then ignored, instead of meeting PyTorch's worker handler,
which dies of a SIGTERM that its parent did not send.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

#: The signals that ask a training to stop with a checkpoint.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
#: Shells report a process ended by signal N with exit status 128 + N; ``matcaps train`` does the
#: same after a clean stop (130 for SIGINT, 143 for SIGTERM), so scripts can tell it from an end.
SIGNAL_EXIT_BASE = 128


class StopSignals:
    """Context manager that records the first SIGINT/SIGTERM instead of letting it end the process.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing and
    :attr:`received` stays None.  The previous handlers are restored on exit.

    Attributes:
        received: The first stop signal received, or None.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for stop_signal in STOP_SIGNALS:
                self._previous[stop_signal] = signal.signal(stop_signal, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._restore()

    def requested(self) -> str | None:
        """The name of the signal received (``"SIGINT"``, ``"SIGTERM"``), or None."""
        return self.received.name if self.received is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        print(f"received {self.received.name}: stopping after this step with a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)  # fmt: skip

    def _restore(self) -> None:
        for stop_signal, handler in self._previous.items():
            signal.signal(stop_signal, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training data loader: its workers leave the stop signals to the trainer.

    Ignores them, then releases them if they were held (a signal held meanwhile is dropped).
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold (block) the stop signals in this thread, e.g. while data-loader workers are forked.

    Forked processes (one thread: this one) inherit the held signals until
    :func:`ignore_stop_signals` releases them.  In this process a signal that arrives meanwhile is
    delivered on exit, or at once through another thread that does not hold it (PyTorch's own
    threads); :class:`StopSignals` only records it, so either is fine.  Nothing is held outside the
    main thread or where the platform cannot hold signals.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
