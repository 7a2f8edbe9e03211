"""Tests for shm.backoff: spin first, then sleep longer and longer up to a cap."""

from __future__ import annotations

import pytest

from shm.backoff import Backoff


def test_spins_then_grows_geometrically_to_the_cap():
    backoff = Backoff(spins=3, min_sleep_s=0.001, max_sleep_s=0.01)
    waits = [backoff.next_wait() for _ in range(10)]
    assert waits == [0.0, 0.0, 0.0, 0.001, 0.002, 0.004, 0.008, 0.01, 0.01, 0.01]


def test_defaults_spin_64_times_then_stay_within_bounds():
    backoff = Backoff()
    assert [backoff.next_wait() for _ in range(64)] == [0.0] * 64
    waits = [backoff.next_wait() for _ in range(100)]
    assert waits[0] == pytest.approx(50e-6)
    assert waits == sorted(waits) and waits[-1] == pytest.approx(0.02)


def test_reset_spins_again_and_restarts_from_the_minimum():
    backoff = Backoff(spins=2, min_sleep_s=0.001, max_sleep_s=0.01)
    for _ in range(20):
        backoff.next_wait()
    backoff.reset()
    assert [backoff.next_wait() for _ in range(4)] == [0.0, 0.0, 0.001, 0.002]


def test_cap_limits_one_wait_without_slowing_the_growth():
    backoff = Backoff(spins=0, min_sleep_s=0.001, max_sleep_s=0.1)
    assert [backoff.next_wait(cap_s=0.003) for _ in range(4)] == [0.001, 0.002, 0.003, 0.003]
    assert backoff.next_wait() == 0.016  # growth went on under the cap
    assert Backoff(spins=1).next_wait(cap_s=0.0) == 0.0


def test_no_spins():
    assert Backoff(spins=0, min_sleep_s=0.5, max_sleep_s=0.5).next_wait() == 0.5


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-1.0, 1.0), (0.2, 0.1)])
def test_refuses_bad_bounds(low, high):
    with pytest.raises(ValueError):
        Backoff(min_sleep_s=low, max_sleep_s=high)


def test_yields_come_after_the_spins_and_give_the_cpu_away(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr("shm.backoff.os.sched_yield", lambda: calls.append(len(calls)))
    backoff = Backoff(spins=2, yields=3, min_sleep_s=0.001, max_sleep_s=0.01)
    waits, sleeping, yielded = [], [], []
    for _ in range(7):
        before = len(calls)
        waits.append(backoff.next_wait())
        yielded.append(len(calls) > before)
        sleeping.append(backoff.sleeping)
    assert waits == [0.0, 0.0, 0.0, 0.0, 0.0, 0.001, 0.002]
    assert yielded == [False, False, True, True, True, False, False]
    assert sleeping == [False, False, False, False, False, True, True]
    backoff.reset()
    assert not backoff.sleeping


@pytest.mark.parametrize(("spins", "yields"), [(-1, 0), (0, -1)])
def test_refuses_negative_phases(spins, yields):
    with pytest.raises(ValueError):
        Backoff(spins=spins, yields=yields)
