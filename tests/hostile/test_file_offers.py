"""A hostile guest's file offers, records and cancels: what they may cost the broker and the user.

Mallory writes its own ring through broker.hostile's Adversary (well-formed records, so
that the broker's channel, not its ring checks, decides); bob is an honest in-process driver.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from held_flush import HeldFlush
from inproc import FakeConnection, InProcessLab, final_reply, socket_request

from broker.files import (
    LOGGED_NAMES,
    MAX_SKIPPED_RECORDS,
    SHOWN_DETAIL_CHARS,
    SHOWN_NAME_CHARS,
    STATUS_NAMES,
    outcome_text,
)
from broker.hostile import Adversary
from broker.policy import parse_policy
from control.framing import Frame
from control.server import Connection
from protocol.channel import OFFER_BURST
from protocol.messages import (
    FLAG_MOVE,
    Cancel,
    EntryType,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileOffer,
    FileResult,
    FileStart,
    StreamEnd,
    decode,
)
from shm import layout


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[InProcessLab]:
    lab = InProcessLab(tmp_path, ["mallory", "bob"], ["bob"], incoming=True)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def mallory(lab: InProcessLab) -> Adversary:
    link = lab.broker.vms["mallory"]
    adversary = Adversary(link.region.mem, random.Random(1), concurrent=False)
    assert adversary.sync()
    lab.attach_all()
    lab.pump()
    return adversary


def offer(offer_id: int, names: tuple[bytes, ...] = (b"report.pdf",)) -> FileOffer:
    return FileOffer(offer_id, len(names), len(names), 10, 0, len(names), names)


def request(lab: InProcessLab, header: dict[str, Any]) -> dict[str, Any]:
    """The broker's immediate reply to a request (a refusal, a status)."""
    conn = FakeConnection()
    lab.broker._on_request(cast(Connection, conn), Frame(header))
    assert conn.replies, f"no reply to {header}"
    return conn.replies[0]


def approve(lab: InProcessLab, header: dict[str, Any]) -> socket.socket:
    """Approve an offer that the broker takes on; returns the client's end of the request
    (its reply comes when the transfer ends; closing it would cancel the transfer)."""
    conn, client = socket_request(header)
    lab.broker._on_request(conn, conn.request)  # type: ignore[arg-type]
    assert lab.broker.files.transfers, "the approval was refused"
    return client


def test_withdrawing_and_reoffering_in_a_loop_costs_a_bounded_number_of_offers(
        lab: InProcessLab, mallory: Adversary, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    for offer_id in range(1, 101):
        assert mallory.send(offer(offer_id), Cancel(offer_id))
    lab.pump(5)
    offers = [r for r in caplog.records if "offers 1 file" in r.getMessage()]
    assert len(offers) == 1 + OFFER_BURST  # the first, then the burst; the rest dropped and counted
    assert lab.broker.vms["mallory"].counters.dropped >= 100 - len(offers)


def test_an_offer_made_soon_after_a_withdrawal_is_approved_only_by_its_number(
        lab: InProcessLab, mallory: Adversary) -> None:
    assert mallory.send(offer(1, (b"holiday.jpg",)), Cancel(1), offer(2, (b"payload.sh",)))
    lab.pump(2)
    [shown] = request(lab, {"op": "status"})["files"]["offers"]
    assert shown["names"] == ["payload.sh"]
    refused = request(lab, {"op": "approve", "vm": "mallory", "to": "bob"})
    number = shown["offer"]
    assert refused["ok"] is False
    assert refused["message"] == (
        f"mallory withdrew an offer and made this one (#{number}) soon after; check it with status "
        f"and approve it by number: approve mallory --to bob --offer {number}")
    assert lab.broker.vms["mallory"].channel.pending_offer is not None  # still there to approve
    with approve(lab, {"op": "approve", "vm": "mallory", "to": "bob", "offer": number}):
        assert lab.broker.files.transfers[0].source == "mallory"


def test_long_and_many_names_are_shortened_in_the_log_and_the_status(
        lab: InProcessLab, mallory: Adversary, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    names = tuple(b"\x1b" * 250 + bytes([65 + i]) for i in range(15))  # escapes grow 4x when shown
    assert mallory.send(offer(1, names))
    lab.pump(2)
    [line] = [r.getMessage() for r in caplog.records if "offers 15 files" in r.getMessage()]
    assert line.endswith(f" and {15 - LOGGED_NAMES} more); approve or reject it")
    assert len(line) < 200 + LOGGED_NAMES * (SHOWN_NAME_CHARS + 4)
    [shown] = request(lab, {"op": "status"})["files"]["offers"]
    assert len(shown["names"]) == min(15, STATUS_NAMES)
    assert all(len(n) == SHOWN_NAME_CHARS and n.endswith("...") for n in shown["names"])


def test_junk_records_during_an_approved_transfer_cost_a_bounded_amount_per_round(
        lab: InProcessLab, mallory: Adversary) -> None:
    assert mallory.send(offer(1))
    lab.pump(2)
    client = approve(lab, {"op": "approve", "vm": "mallory", "to": "bob"})
    link = lab.broker.vms["mallory"]
    sent = 0
    while mallory.send(FileChunk(12345, 0, b"junk")):  # a stream id that is not the transfer's
        sent += 1
    assert sent > 4 * MAX_SKIPPED_RECORDS
    dropped = link.counters.dropped
    rounds = 0
    while link.counters.dropped < dropped + sent:
        before = link.counters.dropped
        lab.broker.poll_once(time.monotonic())
        assert link.counters.dropped - before <= MAX_SKIPPED_RECORDS
        rounds += 1
        assert rounds <= sent, "the junk was never taken"
    assert rounds >= sent // MAX_SKIPPED_RECORDS
    assert lab.broker.files.transfers  # junk is dropped; the transfer goes on
    client.close()


@pytest.mark.parametrize("target", ["host", "bob"])
def test_a_move_cancelled_while_its_files_are_flushed_says_they_arrived(
        lab: InProcessLab, mallory: Adversary, tmp_path: Path, held_flush: HeldFlush, target: str) -> None:
    data = b"the only copy"
    assert mallory.send(FileOffer(1, 1, 1, len(data), FLAG_MOVE, 1, (b"f.txt",)))
    lab.pump(2)
    client = approve(lab, {"op": "approve", "vm": "mallory", "to": target})
    lab.pump(2)
    assert mallory.h2g is not None
    record = mallory.h2g.poll()
    assert record is not None
    start = decode(record.kind, record.payload)
    assert isinstance(start, FileStart) and start.offer_id == 1
    tid = start.transfer_id
    assert mallory.send(FileEntry(tid, EntryType.FILE, 0o644, 0, len(data), b"f.txt"),
                        FileChunk(tid, 0, data), FileEnd(tid, hashlib.sha256(data).digest()),
                        StreamEnd(tid, 1, len(data)))
    while not held_flush.flushing.is_set():
        lab.pump()
    assert mallory.send(Cancel(tid))  # mallory cancels: it is not told OK, so it keeps its copy
    started = time.monotonic()
    while lab.broker.files.transfers:
        lab.pump()
        assert time.monotonic() - started < 5, "the broker waited for the flush"
    reply = final_reply(client)
    incoming = tmp_path / f"in-{target}" / "mallory"
    kept = (f"the files had already arrived in {incoming} and stay there" if target == "host"
            else "bob may have kept the files (they had all reached it)")
    assert reply["ok"] is False
    assert reply["message"] == (f"mallory to {target} failed: mallory: the transfer was cancelled; {kept}, "
                                "and no source was deleted")
    lab.pump(3)
    assert (incoming / "f.txt").read_bytes() == data  # complete, in place: kept
    client.close()


def shown_offer(lab: InProcessLab) -> dict[str, Any]:
    [shown] = request(lab, {"op": "status"})["files"]["offers"]
    return cast(dict[str, Any], shown)


@pytest.mark.parametrize("how", ["driver restart", "fault"])
def test_an_offer_lost_with_its_driver_or_session_counts_as_withdrawn(
        lab: InProcessLab, mallory: Adversary, how: str) -> None:
    assert mallory.send(offer(1, (b"holiday.jpg",)))
    lab.pump(2)
    checked = shown_offer(lab)
    link = lab.broker.vms["mallory"]
    if how == "driver restart":  # a new epoch: the broker sees a new driver
        mallory.mem.store_u64(layout.GUEST_EPOCH_OFF, mallory.mem.load_u64(layout.GUEST_EPOCH_OFF) + 2)
    else:
        link.fault("a bad record", time.monotonic() - 5)  # re-initialised at the next round
    deadline = time.monotonic() + 5
    while link.channel.pending_offer is not None:  # the broker looks at the driver every 0.1 s
        assert time.monotonic() < deadline, "the broker never noticed"
        lab.pump()
    assert mallory.sync()
    assert mallory.send(offer(1, (b"payload.sh",)))  # the same offer id, other content
    lab.pump(2)
    swapped = shown_offer(lab)
    assert swapped["names"] == ["payload.sh"] and swapped["offer"] != checked["offer"]
    stale = request(lab, {"op": "approve", "vm": "mallory", "to": "bob", "offer": checked["offer"]})
    assert stale["ok"] is False and "check status again" in stale["message"]
    unnamed = request(lab, {"op": "approve", "vm": "mallory", "to": "bob"})
    assert unnamed["ok"] is False and "approve it by number" in unnamed["message"]
    assert not lab.broker.files.transfers


def test_a_stream_other_than_the_offer_is_refused_and_its_vm_faulted(
        lab: InProcessLab, mallory: Adversary) -> None:
    assert mallory.send(offer(1, (b"holiday.jpg",)))
    lab.pump(2)
    client = approve(lab, {"op": "approve", "vm": "mallory", "to": "host"})
    lab.pump(2)
    assert mallory.h2g is not None
    record = mallory.h2g.poll()
    assert record is not None
    start = decode(record.kind, record.payload)
    assert isinstance(start, FileStart)
    assert mallory.send(FileEntry(start.transfer_id, EntryType.FILE, 0o755, 0, 10, b"run-me.desktop"))
    while lab.broker.files.transfers:
        lab.pump()
    reply = final_reply(client)
    assert reply["ok"] is False and "where the offer named 'holiday.jpg'" in str(reply["message"])
    assert lab.broker.vms["mallory"].counters.faults == 1
    assert not any((lab.broker.files.incoming / "mallory").iterdir())
    client.close()


def test_a_guests_failure_name_and_detail_are_shortened_in_the_outcome() -> None:
    result = FileResult(1, FileCode.NAME_REFUSED, name=b"\x1b" * 4095, detail=b"\x07" * 512)
    text = outcome_text(result, "mallory")
    assert text.startswith("mallory: the receiver refuses this name: '\\x1b")
    assert len(text) < 100 + SHOWN_NAME_CHARS + SHOWN_DETAIL_CHARS
    assert text.count("...") == 2


def test_an_approval_the_policy_denies_says_what_and_keeps_the_offer(tmp_path: Path) -> None:
    policy = parse_policy('[[rule]]\nwhat = "file"\nsource = "*"\ntarget = "*"\ndecision = "deny"\n',
                          "policy.toml")
    lab = InProcessLab(tmp_path, ["mallory", "bob"], ["bob"], incoming=True, policy=policy)
    try:
        adversary = Adversary(lab.broker.vms["mallory"].region.mem, random.Random(1), concurrent=False)
        assert adversary.sync()
        lab.attach_all()
        assert adversary.send(offer(1))
        lab.pump(2)
        number = shown_offer(lab)["offer"]
        denied = request(lab, {"op": "approve", "vm": "mallory", "to": "bob"})
        assert denied["ok"] is False
        assert denied["message"].startswith(f"mallory's offer #{number} to bob DENIED, nothing sent: "
                                            "denied by policy (policy.toml")
        assert denied["message"].endswith("the offer stays pending (reject mallory to drop it)")
        assert lab.broker.vms["mallory"].channel.pending_offer is not None
    finally:
        lab.close()
