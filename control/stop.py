"""Stopping a selector-driven loop cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket


class StopSignal:
    """A stop flag that SIGINT and SIGTERM set, and that wakes the loop's selector at once.

    The signal handler only sets the flag; Python's wakeup fd writes a byte to a
    socketpair registered on the selector, so a loop sleeping in `select` sees
    the stop without waiting out its timeout.
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.stopping = False
        self._selector = selector
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        selector.register(self._read, selectors.EVENT_READ, self._drain)

    def install(self) -> None:
        """Route SIGINT and SIGTERM here (main thread only)."""
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def stop(self) -> None:
        self.stopping = True

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._read.recv(4096):
                pass

    def close(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._read)
        self._read.close()
        self._write.close()
