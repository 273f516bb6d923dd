"""Stopping a training cleanly on SIGINT (Ctrl-C) or SIGTERM (a batch system's time limit, ``kill``).

``matcaps train`` runs inside :class:`StopSignals`: the first of these signals is only recorded,
the trainer sees it after the step it interrupted, writes ``last.pt`` as at a time limit and
stops, so ``--resume`` continues from that very step.  A second signal stops at once (Python's
``KeyboardInterrupt``), for a user who will not wait for the step.  Ctrl-C reaches every process
of the terminal's process group, data-loader workers included; how the training and validation
loaders keep theirs alive is in :mod:`matcaps.data.loader_workers`.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from matcaps.data.loader_workers import STOP_SIGNALS

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
