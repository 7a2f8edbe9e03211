"""Tests for broker.vm: how one VM's link paces faults, restarts and dropped records."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import pytest

from broker.vm import (
    ATTACH_LOOK_S,
    DROP_LOG_INTERVAL_S,
    FAULT_MEMORY_S,
    MAX_REINIT_INTERVAL_S,
    REINIT_INTERVAL_S,
    Attachment,
    VmLink,
)
from shm import layout
from shm.region import Region

MIB = 1 << 20


@pytest.fixture
def link(shm_name: str) -> Iterator[VmLink]:
    region = Region.create(shm_name, MIB)
    vm = VmLink("mallory", region, timeout_s=5.0)
    yield vm
    vm.shutdown(unlink=True)


def faulty_for(vm: VmLink, since: float) -> float:
    """How long after `since` the VM stays faulty (serviced in 0.25 s steps)."""
    now = since
    while vm.attachment(now) is Attachment.FAULTY:
        now += 0.25
        vm.service(now)
        assert now - since <= 2 * MAX_REINIT_INTERVAL_S, "never re-initialised"
    return now - since


def test_faults_in_a_row_wait_longer_each_time_and_one_after_a_quiet_minute_does_not(
        link: VmLink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.vm")
    now = 100.0
    waits = []
    for _ in range(9):
        link.fault("a bad record", now)
        waited = faulty_for(link, now)
        waits.append(waited)
        now += waited + 0.5  # the guest breaks the protocol again at once
    assert waits[0] == pytest.approx(REINIT_INTERVAL_S, abs=0.25)
    for before, after in itertools.pairwise(waits):
        assert after == pytest.approx(min(2 * before, MAX_REINIT_INTERVAL_S), abs=0.5)
    assert waits[-1] == pytest.approx(MAX_REINIT_INTERVAL_S, abs=0.25)
    assert "again: its region is re-initialised in 60 s" in caplog.text
    assert link.counters.faults == 9

    link.fault("a bad record", now + FAULT_MEMORY_S + 1)  # long after the last re-initialisation
    assert faulty_for(link, now + FAULT_MEMORY_S + 1) == pytest.approx(REINIT_INTERVAL_S, abs=0.25)


def attach_driver(vm: VmLink, epoch: int) -> None:
    """Write what a driver writes when it attaches (only the fields the broker looks at)."""
    mem = vm.region.mem
    mem.write(layout.GUEST_SESSION_OFF, vm.session_id)
    mem.store_u64(layout.GUEST_EPOCH_OFF, epoch)
    mem.store_u64(layout.GUEST_HEARTBEAT_OFF, epoch)


@pytest.mark.parametrize("how", ["restarting", "stopping and starting"])
def test_a_driver_restarting_in_a_loop_is_counted_and_logged_once_a_period(
        link: VmLink, caplog: pytest.LogCaptureFixture, how: str) -> None:
    caplog.set_level(logging.INFO, logger="broker.vm")
    now = 10.0
    for epoch in range(1, 202):  # a change each time the broker looks
        attach_driver(link, epoch if how == "restarting" or epoch % 2 else 0)
        link.service(now)
        now += ATTACH_LOOK_S
    attaches = 201 if how == "restarting" else 101
    assert link.counters.attaches == attaches
    lines = [r.getMessage() for r in caplog.records if "mallory: driver" in r.getMessage()]
    assert 2 <= len(lines) <= 200 * ATTACH_LOOK_S / DROP_LOG_INTERVAL_S + 1
    assert lines[0] == "mallory: driver attached"
    assert lines[1].startswith("mallory: driver ") and lines[1].endswith(" more changes before)")
    assert link.attachment(now) is Attachment.ATTACHED


def test_a_driver_that_says_goodbye_is_stopped_at_once_until_one_attaches(link: VmLink) -> None:
    attach_driver(link, 7)
    link.service(1.0)
    assert link.attachment(1.0) is Attachment.ATTACHED
    link.region.mem.store_u64(layout.GUEST_EPOCH_OFF, 0)  # the driver's goodbye
    link.service(1.0 + 2 * ATTACH_LOOK_S)
    assert link.attachment(1.0 + 2 * ATTACH_LOOK_S) is Attachment.STOPPED  # not "attached" for 2 s more
    attach_driver(link, 8)
    link.service(1.0 + 4 * ATTACH_LOOK_S)
    assert link.attachment(1.0 + 4 * ATTACH_LOOK_S) is Attachment.ATTACHED
