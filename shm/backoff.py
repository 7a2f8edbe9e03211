"""Adaptive polling backoff for loops that watch shared memory without interrupts.

After work, the next `spins` waits are zero (spin: poll again at once); the
`yields` waits after them (none unless asked for) are zero too, but each
first gives the CPU away (``sched_yield``) to whoever else is runnable, which
keeps a short pause cheap for a busy neighbour; then the waits grow
geometrically from `min_sleep_s` to `max_sleep_s`.  The caller sleeps for
:meth:`next_wait` in its selector (so a control socket still wakes it at
once).  The bound on the sleep is the bound on how late an idle loop notices
new records; ``python -m bench`` reports both what an idle loop costs and the
wake-up latency it pays for that.
"""

from __future__ import annotations

import os


class Backoff:
    def __init__(
        self,
        *,
        spins: int = 64,
        yields: int = 0,
        min_sleep_s: float = 50e-6,
        max_sleep_s: float = 0.02,
    ) -> None:
        """Raises ValueError unless 0 < min_sleep_s <= max_sleep_s and spins, yields >= 0."""
        if not 0 < min_sleep_s <= max_sleep_s:
            raise ValueError("need 0 < min_sleep_s <= max_sleep_s")
        if spins < 0 or yields < 0:
            raise ValueError("need spins >= 0 and yields >= 0")
        self.spins = spins
        self.yields = yields
        self.min_sleep_s = min_sleep_s
        self.max_sleep_s = max_sleep_s
        self._idle_rounds = 0
        self._sleep = 0.0

    def reset(self) -> None:
        """Work was done: spin again."""
        self._idle_rounds = 0
        self._sleep = 0.0

    @property
    def sleeping(self) -> bool:
        """True once the loop has reached the sleeping phase."""
        return self._idle_rounds > self.spins + self.yields

    def next_wait(self, cap_s: float | None = None) -> float:
        """How long to wait before polling again (0 while spinning or yielding).

        In the yielding phase this call itself yields the CPU before returning 0.
        """
        self._idle_rounds += 1
        if self._idle_rounds <= self.spins:
            return 0.0
        if self._idle_rounds <= self.spins + self.yields:
            os.sched_yield()
            return 0.0
        self._sleep = min(self.max_sleep_s, max(self.min_sleep_s, self._sleep * 2))
        return self._sleep if cap_s is None else min(self._sleep, cap_s)
