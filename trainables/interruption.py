"""Interruptions of a running study (Ctrl+C, SIGTERM from ``ray job stop`` or a batch scheduler, or
the platform's own reasons such as a full disk) turned into Tune's graceful stop and remembered, so
the study reports itself interrupted and ``--resume`` continues."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Interruption:
    """Ctrl+C and SIGTERM during a study: the first asks Tune to stop gracefully (it saves the
    experiment state, so ``--resume`` continues) and is remembered; a second stops at once.
    :meth:`stop` does the same for the platform's own reasons (a full disk)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.message: str | None = None

    def stop(self, reason: str, message: str) -> None:
        """Stop the running study as Ctrl+C does, for ``reason`` (recorded as ``signal``)."""
        if self.signal is not None:
            return
        self.signal, self.message = reason, message
        print(f"\n{message}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {name}")
        self.signal = name
        print(f"\n{name}: stopping the study after saving its state (send it again to stop at once)",
              file=sys.stderr, flush=True)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt(name)  # Tune is not running yet: nothing to save
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interruption]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # Tune would take over SIGINT for itself and then swallow it; it also listens on SIGUSR1.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
