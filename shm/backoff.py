"""Adaptive polling backoff for loops that watch shared memory without interrupts.

After work, the next few waits are zero (spin); then they grow geometrically
from `min_sleep_s` to `max_sleep_s`.  The caller sleeps for :meth:`next_wait`
in its selector (so a control socket still wakes it at once).  The bound on
the sleep is the bound on how late an idle loop notices new records.
"""

from __future__ import annotations


class Backoff:
    def __init__(
        self, *, spins: int = 64, min_sleep_s: float = 50e-6, max_sleep_s: float = 0.02
    ) -> None:
        if not 0 < min_sleep_s <= max_sleep_s:
            raise ValueError("need 0 < min_sleep_s <= max_sleep_s")
        self.spins = spins
        self.min_sleep_s = min_sleep_s
        self.max_sleep_s = max_sleep_s
        self._idle_rounds = 0
        self._sleep = 0.0

    def reset(self) -> None:
        """Work was done: spin again."""
        self._idle_rounds = 0
        self._sleep = 0.0

    def next_wait(self, cap_s: float | None = None) -> float:
        """How long to wait before polling again (0 while spinning)."""
        self._idle_rounds += 1
        if self._idle_rounds <= self.spins:
            return 0.0
        self._sleep = min(self.max_sleep_s, max(self.min_sleep_s, self._sleep * 2))
        return self._sleep if cap_s is None else min(self._sleep, cap_s)
