"""Tests for protocol.channel: HostChannel and GuestChannel driven against each other.

A null transport carries each message through encode/decode (as a ring would)
and records it, so each test can assert the exact exchange, the host's states
and the events on both sides.  Time is passed in explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel import (
    CAP_COPY_FROM,
    CAP_FILES_TO,
    CAP_PASTE_TO,
    CopyCompleted,
    CopyFailed,
    CopyRequested,
    Dropped,
    FailReason,
    GuestChannel,
    GuestState,
    HostChannel,
    HostState,
    PasteCompleted,
    PasteFailed,
    PasteReceived,
    capabilities_label,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import (
    MAX_TRANSFER_SIZE,
    Cancel,
    CopyRequest,
    DataBegin,
    DataChunk,
    DataEnd,
    Message,
    Status,
    StatusCode,
    decode,
    encode,
)

TID = 0x1234_5678_9ABC_DEF0
OTHER = 0x0BAD


def carry(message: Message) -> Message:
    """What a ring does to a message: encode, copy out, decode."""
    kind, parts = encode(message)
    return decode(kind, b"".join(bytes(p) for p in parts))


def short(message: Message) -> tuple[Any, ...]:
    """A readable summary for asserting exchanges."""
    match message:
        case DataChunk(tid, offset, data):
            return ("chunk", tid, offset, bytes(data))
    name = type(message).__name__
    return (name, *(getattr(message, f.name) for f in dataclasses.fields(message)))


@dataclass
class Link:
    """A host and a guest joined by a null transport; the guest answers like the driver does."""

    host: HostChannel
    guest: GuestChannel
    clipboard: bytes | None = None
    auto: bool = True
    now: float = 0.0
    to_guest: list[Message] = field(default_factory=list)
    to_host: list[Message] = field(default_factory=list)
    host_events: list[Any] = field(default_factory=list)
    guest_events: list[Any] = field(default_factory=list)
    host_states: list[HostState] = field(default_factory=list)
    pasted: list[bytes] = field(default_factory=list)

    def _note_state(self) -> None:
        if not self.host_states or self.host_states[-1] is not self.host.state:
            self.host_states.append(self.host.state)

    def host_step(self) -> bool:
        """Move one message host -> guest."""
        message = self.host.next_output()
        if message is None:
            return False
        self.host.output_done(self.now)
        self._note_state()
        carried = carry(message)
        self.to_guest.append(carried)
        for event in self.guest.receive(carried):
            self.guest_events.append(event)
            if self.auto:
                self._answer(event)
        return True

    def _answer(self, event: Any) -> None:
        match event:
            case CopyRequested(tid, _):
                self.guest.answer_copy(tid, self.clipboard)
            case PasteReceived(tid, data):
                self.pasted.append(bytes(data))
                self.guest.confirm_paste(tid)

    def guest_step(self) -> bool:
        """Move one message guest -> host."""
        message = self.guest.next_output()
        if message is None:
            return False
        self.guest.output_done()
        carried = carry(message)
        self.to_host.append(carried)
        self.host_events += self.host.receive(carried, self.now)
        self._note_state()
        return True

    def run(self) -> None:
        """Alternate one host message with everything the guest has to say, until quiet."""
        self._note_state()
        while True:
            moved = self.host_step()
            while self.guest_step():
                moved = True
            if not moved:
                return


def link(*, host_chunk: int = 4, guest_chunk: int = 4, guest_limit: int = 1000,
         clipboard: bytes | None = None, timeout_s: float = 5.0) -> Link:
    return Link(
        HostChannel(chunk_size=host_chunk, timeout_s=timeout_s),
        GuestChannel(chunk_size=guest_chunk, limit=guest_limit),
        clipboard=clipboard,
    )


# Copy --------------------------------------------------------------------------
def test_copy_happy_path_multi_chunk():
    data = b"0123456789"
    ln = link(guest_chunk=4, clipboard=data)
    ln.host.start_copy(TID, 100, ln.now)
    assert ln.host.state is HostState.AWAIT_COPY and ln.host.capabilities == CAP_COPY_FROM
    ln.run()
    assert [short(m) for m in ln.to_guest] == [("CopyRequest", TID, 100)]
    assert [short(m) for m in ln.to_host] == [
        ("DataBegin", TID, 10),
        ("chunk", TID, 0, b"0123"),
        ("chunk", TID, 4, b"4567"),
        ("chunk", TID, 8, b"89"),
        ("DataEnd", TID),
    ]
    assert ln.host_states == [HostState.AWAIT_COPY, HostState.RECEIVING_COPY, HostState.IDLE]
    assert ln.guest_events == [CopyRequested(TID, 100)]
    assert ln.host_events == [CopyCompleted(TID, bytearray(data))]
    assert ln.host.capabilities == 0
    assert ln.host.next_output() is None and ln.guest.next_output() is None


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 12, 13])
def test_copy_exact_bytes_at_chunk_boundaries(size):
    data = bytes(range(size))
    ln = link(guest_chunk=4, clipboard=data)
    ln.host.start_copy(TID, size, 0.0)
    ln.run()
    assert ln.host_events == [CopyCompleted(TID, bytearray(data))]
    chunks = [m for m in ln.to_host if isinstance(m, DataChunk)]
    assert len(chunks) == -(-size // 4)
    assert all(len(c.data) <= 4 for c in chunks)


def test_copied_data_belongs_to_the_caller():
    ln = link(clipboard=b"keep me")
    ln.host.start_copy(TID, 100, 0.0)
    ln.run()
    (event,) = ln.host_events
    ln.host.abort(FailReason.DETACHED)
    ln.host.start_copy(TID + 1, 100, 1.0)
    ln.host.abort(FailReason.DETACHED)
    assert event.data == b"keep me"  # handed over, never wiped by later failures


@pytest.mark.parametrize("clipboard", [None, b""])
def test_copy_of_an_empty_clipboard(clipboard):
    ln = link(clipboard=clipboard)
    ln.host.start_copy(TID, 100, 0.0)
    ln.run()
    assert [short(m) for m in ln.to_host] == [("Status", TID, StatusCode.EMPTY, 0)]
    assert ln.host_events == [CopyFailed(TID, FailReason.EMPTY, 0)]
    assert ln.host.state is HostState.IDLE


@pytest.mark.parametrize(("host_limit", "guest_limit"), [(5, 1000), (1000, 5), (5, 5)])
def test_copy_too_large_is_refused_by_the_guest(host_limit, guest_limit):
    ln = link(guest_limit=guest_limit, clipboard=b"x" * 10)
    ln.host.start_copy(TID, host_limit, 0.0)
    ln.run()
    assert ln.guest_events == [CopyRequested(TID, 5)]  # the lower of both limits
    assert [short(m) for m in ln.to_host] == [("Status", TID, StatusCode.TOO_LARGE, 10)]
    assert ln.host_events == [CopyFailed(TID, FailReason.TOO_LARGE, 10)]


def test_copy_exactly_at_the_limit_is_sent():
    ln = link(guest_limit=10, clipboard=b"x" * 10)
    ln.host.start_copy(TID, 10, 0.0)
    ln.run()
    assert ln.host_events == [CopyCompleted(TID, bytearray(b"x" * 10))]


@pytest.mark.parametrize(
    ("code", "reason"),
    [(StatusCode.BUSY, FailReason.BUSY), (StatusCode.REFUSED, FailReason.REFUSED)],
)
def test_copy_answered_with_other_statuses(code, reason):
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 100, 0.0)
    assert host.receive(Status(TID, code, 3), 0.1) == [CopyFailed(TID, reason, 3)]
    assert host.state is HostState.IDLE


def test_guest_cancel_of_a_copy():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 100, 0.0)
    assert host.receive(Cancel(OTHER), 0.1) == [Dropped(Cancel(OTHER))]
    assert host.receive(Cancel(TID), 0.1) == [CopyFailed(TID, FailReason.CANCELLED)]
    assert host.state is HostState.IDLE


def test_guest_stops_answering_a_cancelled_copy():
    guest = GuestChannel(chunk_size=4, limit=100)
    guest.receive(CopyRequest(TID, 100))
    guest.answer_copy(TID, b"0123456789")
    assert isinstance(guest.next_output(), DataBegin)
    guest.output_done()
    assert guest.receive(Cancel(TID)) == []
    assert guest.next_output() is None


# Paste -------------------------------------------------------------------------
def test_paste_happy_path_with_ack():
    data = b"hello world"
    ln = link(host_chunk=4)
    ln.host.start_paste(TID, data, 0.0)
    assert ln.host.state is HostState.SENDING_PASTE and ln.host.capabilities == CAP_PASTE_TO
    ln.run()
    assert [short(m) for m in ln.to_guest] == [
        ("DataBegin", TID, 11),
        ("chunk", TID, 0, b"hell"),
        ("chunk", TID, 4, b"o wo"),
        ("chunk", TID, 8, b"rld"),
        ("DataEnd", TID),
    ]
    assert ln.guest_events == [PasteReceived(TID, bytearray(data))]
    assert ln.pasted == [data]
    assert [short(m) for m in ln.to_host] == [("Status", TID, StatusCode.OK, 0)]
    assert ln.host_events == [PasteCompleted(TID, 11)]
    assert ln.host_states == [HostState.SENDING_PASTE, HostState.IDLE]
    assert ln.host.capabilities == 0 and ln.guest.state is GuestState.IDLE


def test_paste_of_nothing():
    ln = link()
    ln.host.start_paste(TID, b"", 0.0)
    ln.run()
    assert [short(m) for m in ln.to_guest] == [("DataBegin", TID, 0), ("DataEnd", TID)]
    assert ln.pasted == [b""] and ln.host_events == [PasteCompleted(TID, 0)]


def test_paste_refused_by_the_guest_limit_stops_the_stream():
    ln = link(host_chunk=4, guest_limit=5)
    ln.host.start_paste(TID, b"0123456789", 0.0)
    ln.run()
    assert [short(m) for m in ln.to_guest] == [("DataBegin", TID, 10)]  # nothing more is sent
    assert [short(m) for m in ln.to_host] == [("Status", TID, StatusCode.TOO_LARGE, 10)]
    assert ln.host_events == [PasteFailed(TID, FailReason.TOO_LARGE, 10)]
    assert ln.guest_events == [] and ln.pasted == []
    assert ln.host.state is HostState.IDLE and ln.host.next_output() is None
    # The guest accepts the next paste within its limit.
    ln.host.start_paste(TID + 1, b"ok", 1.0)
    ln.run()
    assert ln.pasted == [b"ok"] and ln.host_events[-1] == PasteCompleted(TID + 1, 2)
    assert ln.guest.state is GuestState.IDLE


def test_guest_discards_a_refused_paste_already_in_flight():
    ln = link(host_chunk=4, guest_limit=5)
    ln.host.start_paste(TID, b"0123456789", 0.0)
    while ln.host_step():  # the whole stream is in the ring before the guest answers
        pass
    assert ln.guest.state is GuestState.IDLE  # it saw DataEnd of the discarded paste
    assert ln.guest_events == []  # discarded silently, not reported as Dropped
    assert ln.guest_step()
    assert ln.host_events == [PasteFailed(TID, FailReason.TOO_LARGE, 10)]


def test_guest_in_discard_state_reports_nothing_until_data_end():
    guest = GuestChannel(chunk_size=4, limit=5)
    guest.receive(DataBegin(TID, 10))
    assert guest.state is GuestState.DISCARDING_PASTE
    assert guest.receive(DataChunk(TID, 0, b"0123")) == []
    assert guest.receive(DataChunk(OTHER, 0, b"0123")) == [Dropped(DataChunk(OTHER, 0, b"0123"))]
    assert guest.receive(DataEnd(TID)) == []
    assert guest.state is GuestState.IDLE


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (StatusCode.TOO_LARGE, FailReason.TOO_LARGE),
        (StatusCode.BUSY, FailReason.BUSY),
        (StatusCode.REFUSED, FailReason.REFUSED),
        (StatusCode.EMPTY, FailReason.REFUSED),
    ],
)
def test_paste_refused_by_the_guest(code, reason):
    ln = link(host_chunk=4)
    ln.auto = False
    ln.host.start_paste(TID, b"abcdefgh", 0.0)
    ln.run()
    assert ln.guest_events == [PasteReceived(TID, bytearray(b"abcdefgh"))]
    ln.guest.confirm_paste(TID, code)
    ln.run()
    assert ln.host_events == [PasteFailed(TID, reason, 8)]
    assert ln.host.state is HostState.IDLE


def test_guest_cancel_of_a_paste():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_paste(TID, b"abcdef", 0.0)
    assert host.receive(Cancel(TID), 0.1) == [PasteFailed(TID, FailReason.CANCELLED, 6)]
    assert host.next_output() is None


# Timeouts -------------------------------------------------------------------------
def test_copy_times_out_without_an_answer():
    host = HostChannel(chunk_size=4, timeout_s=5.0)
    host.start_copy(TID, 100, 10.0)
    assert host.tick(14.99) == []
    assert host.tick(15.0) == [CopyFailed(TID, FailReason.TIMEOUT)]
    assert host.state is HostState.IDLE and host.capabilities == 0
    assert host.tick(100.0) == []


def test_progress_pushes_the_deadline_back():
    host = HostChannel(chunk_size=4, timeout_s=5.0)
    host.start_copy(TID, 100, 0.0)
    host.next_output()
    host.output_done(2.0)  # the request reached the ring at 2: 5 s from then
    assert host.tick(6.9) == []
    assert host.receive(DataBegin(TID, 8), 6.0) == []
    assert host.tick(10.9) == []
    assert host.receive(DataChunk(TID, 0, b"abcd"), 10.0) == []
    assert host.tick(14.9) == []
    assert host.tick(15.0) == [CopyFailed(TID, FailReason.TIMEOUT)]


def test_dropped_messages_do_not_push_the_deadline_back():
    host = HostChannel(chunk_size=4, timeout_s=5.0)
    host.start_copy(TID, 100, 0.0)
    assert host.receive(Status(OTHER, StatusCode.EMPTY), 4.0) == [
        Dropped(Status(OTHER, StatusCode.EMPTY))
    ]
    assert host.tick(5.0) == [CopyFailed(TID, FailReason.TIMEOUT)]


def test_a_trickling_transfer_hits_the_hard_deadline():
    host = HostChannel(chunk_size=4, timeout_s=5.0, max_transfer_s=10.0)
    host.start_copy(TID, 1000, 0.0)
    host.receive(DataBegin(TID, 1000), 1.0)
    for second in range(2, 10):
        host.receive(DataChunk(TID, (second - 2) * 4, b"abcd"), float(second))
        assert host.tick(second + 0.5) == []
    assert host.tick(10.0) == [CopyFailed(TID, FailReason.TIMEOUT)]


def test_paste_times_out_without_an_ack():
    ln = link()
    ln.auto = False
    ln.host.start_paste(TID, b"abc", 0.0)
    ln.now = 1.0
    ln.run()
    assert ln.host.tick(5.99) == []
    assert ln.host.tick(6.0) == [PasteFailed(TID, FailReason.TIMEOUT, 3)]
    assert ln.host.state is HostState.IDLE


# Unsolicited and stale messages -------------------------------------------------------
@pytest.mark.parametrize(
    "message",
    [DataBegin(TID, 1), DataChunk(TID, 0, b"x"), DataEnd(TID), Status(TID, StatusCode.OK),
     Cancel(TID)],
    ids=lambda m: type(m).__name__,
)
def test_idle_host_drops_everything(message):
    host = HostChannel(chunk_size=4, timeout_s=5)
    assert host.receive(message, 0.0) == [Dropped(message)]
    assert host.state is HostState.IDLE


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("copy", DataChunk(TID, 0, b"x")),  # data before DataBegin
        ("copy", DataEnd(TID)),
        ("paste", DataBegin(TID, 3)),  # a guest sending content during a paste
        ("paste", DataChunk(TID, 0, b"x")),
        ("paste", DataEnd(TID)),
        ("receiving", Status(TID, StatusCode.EMPTY)),
        ("receiving", DataBegin(TID, 3)),
    ],
)
def test_messages_the_state_does_not_expect_are_dropped(start, message):
    host = HostChannel(chunk_size=4, timeout_s=5)
    if start == "paste":
        host.start_paste(TID, b"abc", 0.0)
    else:
        host.start_copy(TID, 100, 0.0)
        if start == "receiving":
            host.receive(DataBegin(TID, 4), 0.0)
    state = host.state
    assert host.receive(message, 0.1) == [Dropped(message)]
    assert host.state is state


def test_stale_transfer_ids_are_dropped_during_a_copy():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 100, 0.0)
    for message in (Status(OTHER, StatusCode.EMPTY), DataBegin(OTHER, 4)):
        assert host.receive(message, 0.1) == [Dropped(message)]
    assert host.state is HostState.AWAIT_COPY
    host.receive(DataBegin(TID, 4), 0.2)
    for message in (DataChunk(OTHER, 0, b"evil"), DataEnd(OTHER), Cancel(OTHER)):
        assert host.receive(message, 0.3) == [Dropped(message)]
    host.receive(DataChunk(TID, 0, b"good"), 0.4)
    assert host.receive(DataEnd(TID), 0.5) == [CopyCompleted(TID, bytearray(b"good"))]


def test_stale_transfer_ids_are_dropped_during_a_paste():
    ln = link()
    ln.auto = False
    ln.host.start_paste(TID, b"abc", 0.0)
    ln.run()
    assert ln.host.receive(Status(OTHER, StatusCode.OK), 1.0) == [
        Dropped(Status(OTHER, StatusCode.OK))
    ]
    assert ln.host.state is HostState.SENDING_PASTE
    assert ln.host.receive(Status(TID, StatusCode.OK), 1.0) == [PasteCompleted(TID, 3)]


def test_a_late_answer_to_a_timed_out_copy_is_dropped():
    ln = link(clipboard=b"late")
    ln.host.start_copy(TID, 100, 0.0)
    ln.host_step()
    assert ln.host.tick(100.0) == [CopyFailed(TID, FailReason.TIMEOUT)]
    ln.host.start_copy(TID + 1, 100, 100.0)  # the next gesture, before the old answer arrives
    while ln.guest_step():
        pass
    assert ln.host_events and all(isinstance(e, Dropped) for e in ln.host_events)
    assert ln.host.state is HostState.AWAIT_COPY and ln.host.transfer_id == TID + 1


def test_guest_drops_what_it_did_not_ask_for():
    guest = GuestChannel(chunk_size=4, limit=100)
    for message in (DataChunk(TID, 0, b"x"), DataEnd(TID), Status(TID, StatusCode.OK)):
        assert guest.receive(message) == [Dropped(message)]
    guest.receive(DataBegin(TID, 4))
    assert guest.receive(DataChunk(OTHER, 0, b"evil")) == [Dropped(DataChunk(OTHER, 0, b"evil"))]
    assert guest.receive(DataEnd(OTHER)) == [Dropped(DataEnd(OTHER))]
    assert guest.receive(Cancel(OTHER)) == []
    assert guest.state is GuestState.RECEIVING_PASTE


# Protocol violations ------------------------------------------------------------------
def receiving_host(total: int = 8, limit: int = 100) -> HostChannel:
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, limit, 0.0)
    host.receive(DataBegin(TID, total), 0.0)
    assert host.state is HostState.RECEIVING_COPY
    return host


@pytest.mark.parametrize("state", ["idle", "await", "receiving", "paste"])
def test_copy_request_from_a_guest_is_a_protocol_error(state):
    host = HostChannel(chunk_size=4, timeout_s=5)
    if state == "await":
        host.start_copy(TID, 100, 0.0)
    elif state == "receiving":
        host = receiving_host()
    elif state == "paste":
        host.start_paste(TID, b"x", 0.0)
    with pytest.raises(RemoteProtocolError):
        host.receive(CopyRequest(TID, 1), 0.0)
    with pytest.raises(RemoteProtocolError):
        host.receive(CopyRequest(OTHER, 1), 0.0)


@pytest.mark.parametrize(
    "chunks",
    [
        [DataChunk(TID, 4, b"abcd")],  # a gap
        [DataChunk(TID, 0, b"abcd"), DataChunk(TID, 2, b"cdef")],  # an overlap
        [DataChunk(TID, 0, b"abcd"), DataChunk(TID, 0, b"abcd")],  # a replay
        [DataChunk(TID, 0, b"abcdefghi")],  # beyond the total
        [DataChunk(TID, 0, b"abcdef"), DataChunk(TID, 6, b"ghi")],  # beyond, in the second
        [DataChunk(TID, 8, b"")],  # an empty chunk at the wrong offset
    ],
    ids=["gap", "overlap", "replay", "beyond", "beyond-later", "empty-misplaced"],
)
def test_bad_chunks_are_protocol_errors(chunks):
    host = receiving_host(total=8)
    with pytest.raises(RemoteProtocolError):
        for chunk in chunks:
            host.receive(chunk, 0.1)


@pytest.mark.parametrize("received", [b"", b"abc", b"abcdefg"])
def test_data_end_before_all_bytes_is_a_protocol_error(received):
    host = receiving_host(total=8)
    if received:
        host.receive(DataChunk(TID, 0, received), 0.1)
    with pytest.raises(RemoteProtocolError):
        host.receive(DataEnd(TID), 0.2)


def test_data_begin_over_the_limit_is_a_protocol_error():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 10, 0.0)
    with pytest.raises(RemoteProtocolError):
        host.receive(DataBegin(TID, 11), 0.1)
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 10, 0.0)
    assert host.receive(DataBegin(TID, 10), 0.1) == []  # at the limit is fine


def test_ok_status_to_a_copy_is_a_protocol_error():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_copy(TID, 10, 0.0)
    with pytest.raises(RemoteProtocolError):
        host.receive(Status(TID, StatusCode.OK), 0.1)


def test_ok_status_before_the_paste_was_sent_is_a_protocol_error():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_paste(TID, b"0123456789", 0.0)
    with pytest.raises(RemoteProtocolError):
        host.receive(Status(TID, StatusCode.OK), 0.1)  # nothing sent yet
    sent = 0
    while (message := host.next_output()) is not None:
        if isinstance(message, DataEnd):
            # DataEnd handed out but not yet in the ring: still too early.
            with pytest.raises(RemoteProtocolError):
                host.receive(Status(TID, StatusCode.OK), 0.2)
        host.output_done(0.2)
        sent += 1
    assert sent == 5
    assert host.receive(Status(TID, StatusCode.OK), 0.3) == [PasteCompleted(TID, 10)]


def test_a_refusal_may_come_before_the_paste_was_sent():
    host = HostChannel(chunk_size=4, timeout_s=5)
    host.start_paste(TID, b"0123456789", 0.0)
    assert host.receive(Status(TID, StatusCode.TOO_LARGE, 10), 0.1) == [
        PasteFailed(TID, FailReason.TOO_LARGE, 10)
    ]


def test_guest_refuses_bad_chunks_and_short_transfers():
    guest = GuestChannel(chunk_size=4, limit=100)
    guest.receive(DataBegin(TID, 8))
    with pytest.raises(RemoteProtocolError):
        guest.receive(DataChunk(TID, 4, b"abcd"))
    guest = GuestChannel(chunk_size=4, limit=100)
    guest.receive(DataBegin(TID, 8))
    with pytest.raises(RemoteProtocolError):
        guest.receive(DataChunk(TID, 0, b"abcdefghi"))
    guest = GuestChannel(chunk_size=4, limit=100)
    guest.receive(DataBegin(TID, 8))
    guest.receive(DataChunk(TID, 0, b"abcd"))
    with pytest.raises(RemoteProtocolError):
        guest.receive(DataEnd(TID))


# Local errors, abort, capabilities --------------------------------------------------
@pytest.mark.parametrize("first", ["copy", "paste"])
def test_busy_channel_refuses_a_second_gesture(first):
    host = HostChannel(chunk_size=4, timeout_s=5)
    if first == "copy":
        host.start_copy(TID, 10, 0.0)
    else:
        host.start_paste(TID, b"abc", 0.0)
    state, output = host.state, host.next_output()
    with pytest.raises(LocalProtocolError, match="busy"):
        host.start_copy(OTHER, 10, 0.0)
    with pytest.raises(LocalProtocolError, match="busy"):
        host.start_paste(OTHER, b"x", 0.0)
    assert host.state is state and host.transfer_id == TID
    assert host.next_output() == output  # the transfer in flight is untouched
    host.abort(FailReason.CANCELLED)
    host.start_copy(OTHER, 10, 0.0)  # free again


def test_local_and_remote_errors_are_distinct():
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_a_rejected_gesture_leaves_the_channel_idle():
    host = HostChannel(chunk_size=4, timeout_s=5)
    with pytest.raises(ValueError):
        host.start_copy(TID, MAX_TRANSFER_SIZE + 1, 0.0)
    assert host.state is HostState.IDLE and host.capabilities == 0


def test_abort_in_each_state():
    host = HostChannel(chunk_size=4, timeout_s=5)
    assert host.abort(FailReason.DETACHED) == []
    host.start_copy(TID, 10, 0.0)
    assert host.abort(FailReason.DETACHED) == [CopyFailed(TID, FailReason.DETACHED)]
    assert host.state is HostState.IDLE and host.next_output() is None
    host = receiving_host()
    assert host.abort(FailReason.CANCELLED) == [CopyFailed(TID, FailReason.CANCELLED)]
    host.start_paste(OTHER, b"abcdefgh", 0.0)
    host.next_output()  # a message handed to the transport, not yet done
    assert host.abort(FailReason.DETACHED) == [PasteFailed(OTHER, FailReason.DETACHED, 8)]
    assert host.state is HostState.IDLE and host.next_output() is None


def test_abort_while_the_transport_holds_a_chunk():
    host = HostChannel(chunk_size=4, timeout_s=5)
    data = bytearray(b"abcdefgh")
    host.start_paste(TID, data, 0.0)
    host.next_output()
    host.output_done(0.0)
    chunk = host.next_output()  # handed out, still being written by the transport
    assert isinstance(chunk, DataChunk)
    held = memoryview(chunk.data)
    assert host.abort(FailReason.DETACHED) == [PasteFailed(TID, FailReason.DETACHED, 8)]
    assert bytes(held) == b"abcd"
    held.release()
    data[:] = bytes(8)  # the broker wipes its clipboard in place afterwards


def test_capabilities_per_state():
    host = HostChannel(chunk_size=4, timeout_s=5)
    seen = [host.capabilities]
    host.start_copy(TID, 10, 0.0)
    seen.append(host.capabilities)
    host.receive(DataBegin(TID, 1), 0.0)
    seen.append(host.capabilities)
    host.receive(DataChunk(TID, 0, b"x"), 0.0)
    host.receive(DataEnd(TID), 0.0)
    seen.append(host.capabilities)
    host.start_paste(TID, b"x", 0.0)
    seen.append(host.capabilities)
    host.tick(99.0)
    seen.append(host.capabilities)
    assert seen == [0, CAP_COPY_FROM, CAP_COPY_FROM, 0, CAP_PASTE_TO, 0]
    assert CAP_COPY_FROM & CAP_PASTE_TO == 0


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        HostChannel(chunk_size=0, timeout_s=5)
    with pytest.raises(ValueError):
        GuestChannel(chunk_size=-1, limit=5)


# Wiping -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["abort", "timeout", "cancel"])
def test_host_inbox_is_wiped_when_a_copy_fails(how):
    host = receiving_host(total=8)
    host.receive(DataChunk(TID, 0, b"secr"), 0.1)
    inbox = host._inbox
    assert inbox is not None
    buffer = inbox.buffer
    assert buffer[:4] == b"secr"
    if how == "abort":
        host.abort(FailReason.DETACHED)
    elif how == "timeout":
        assert host.tick(60.0)
    else:
        host.receive(Cancel(TID), 0.2)
    assert buffer == bytes(8)  # zeroed in place, not merely dropped
    assert host._inbox is None


def test_guest_inbox_is_wiped_on_cancel_and_on_a_new_paste():
    guest = GuestChannel(chunk_size=4, limit=100)
    guest.receive(DataBegin(TID, 8))
    guest.receive(DataChunk(TID, 0, b"secr"))
    buffer = guest._inbox.buffer  # type: ignore[union-attr]
    guest.receive(Cancel(TID))
    assert buffer == bytes(8) and guest.state is GuestState.IDLE
    guest.receive(DataBegin(TID, 8))
    guest.receive(DataChunk(TID, 0, b"more"))
    buffer = guest._inbox.buffer  # type: ignore[union-attr]
    guest.receive(DataBegin(OTHER, 2))  # a new paste replaces the unfinished one
    assert buffer == bytes(8)
    guest.receive(DataChunk(OTHER, 0, b"ok"))
    assert guest.receive(DataEnd(OTHER)) == [PasteReceived(OTHER, bytearray(b"ok"))]


# Property: any content, any chunking, both directions --------------------------------
@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=200),
    chunk=st.integers(1, 64),
    limit=st.integers(0, 250),
    direction=st.sampled_from(["copy", "paste"]),
)
def test_any_transfer_round_trips_or_is_refused_cleanly(data, chunk, limit, direction):
    ln = link(host_chunk=chunk, guest_chunk=chunk, guest_limit=limit, clipboard=data)
    if direction == "copy":
        ln.host.start_copy(TID, 1000, 0.0)
    else:
        ln.host.start_paste(TID, data, 0.0)
    ln.run()
    assert ln.host.state is HostState.IDLE
    (event,) = ln.host_events
    if direction == "copy":
        if not data:
            assert event == CopyFailed(TID, FailReason.EMPTY, 0)
        elif len(data) > limit:
            assert event == CopyFailed(TID, FailReason.TOO_LARGE, len(data))
        else:
            assert event == CopyCompleted(TID, bytearray(data))
    elif len(data) > limit:
        assert event == PasteFailed(TID, FailReason.TOO_LARGE, len(data))
        assert ln.pasted == []
    else:
        assert event == PasteCompleted(TID, len(data))
        assert ln.pasted == [data]
    chunks = [m for m in ln.to_host + ln.to_guest if isinstance(m, DataChunk)]
    assert all(0 < len(c.data) <= chunk for c in chunks)


def test_capabilities_read_as_letters() -> None:
    assert capabilities_label(0) == "----"
    assert capabilities_label(CAP_COPY_FROM) == "C---"
    assert capabilities_label(CAP_PASTE_TO | CAP_FILES_TO) == "-P-T"
