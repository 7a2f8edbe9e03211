"""control.stop: SIGTERM sets the flag and wakes a sleeping selector at once."""

from __future__ import annotations

import os
import selectors
import signal

from control.stop import StopSignal


def test_sigterm_stops_and_wakes_the_selector() -> None:
    selector = selectors.DefaultSelector()
    stop = StopSignal(selector)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(-1)
    try:
        stop.install()
        assert not stop.stopping
        os.kill(os.getpid(), signal.SIGTERM)
        ready = selector.select(timeout=30)  # returns at once, not after 30 s
        assert ready, "the selector was not woken"
        for key, _ in ready:
            key.data()
        assert stop.stopping
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()
        selector.close()


def test_stop_without_a_signal_and_close_twice() -> None:
    selector = selectors.DefaultSelector()
    stop = StopSignal(selector)
    stop.stop()
    assert stop.stopping
    stop.close()
    stop.close()
    selector.close()
