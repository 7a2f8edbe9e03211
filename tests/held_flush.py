"""A receiver's flush to disk held at will (a slow disk), for the tests of what happens meanwhile."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class HeldFlush:
    """Stands for filexfer.receiver's syncfs: sets `flushing`, then waits for `release`."""

    flushing: threading.Event
    release: threading.Event

    def syncfs(self, fd: int) -> None:
        self.flushing.set()
        self.release.wait(10)
