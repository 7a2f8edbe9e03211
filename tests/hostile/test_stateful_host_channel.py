"""Hypothesis: the broker's decoder and HostChannel against arbitrary record sequences.

The machine plays the broker (copy and paste gestures, time passing, output
drained into the ring) and a hostile guest (records of any kind and payload,
and well-formed messages with right or wrong transfer ids, offsets and
sizes).  The broker's rule is modelled as in broker.vm: decode the record,
feed it; a RemoteProtocolError from either marks the VM faulty (abort).

What must hold whatever the sequence: only RemoteProtocolError comes out;
a copy completes only for the copy gesture in flight, with exactly the bytes
the guest streamed for that transfer, never more than the limit given; the
buffer preallocated for a copy never exceeds that limit; a paste completes
only after all of it was handed out; the capability bits follow the state.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from inproc import FIGURES

from protocol.channel import (
    CAP_COPY_FROM,
    CAP_PASTE_TO,
    CopyCompleted,
    CopyFailed,
    Dropped,
    FailReason,
    HostChannel,
    HostEvent,
    HostState,
    PasteCompleted,
    PasteFailed,
)
from protocol.errors import RemoteProtocolError
from protocol.messages import (
    DataBegin,
    DataChunk,
    DataEnd,
    Kind,
    Message,
    Status,
    StatusCode,
    decode,
    encode,
)

STATS = {"sequences": 0, "records": 0, "faults": 0, "copies": 0, "pastes": 0, "dropped": 0}

kinds = st.one_of(st.sampled_from([*range(0, 8), 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


class HostChannelMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        STATS["sequences"] += 1
        self.ch = HostChannel(chunk_size=48, timeout_s=1.0, max_transfer_s=5.0)
        self.now = 0.0
        self.tid = 0
        self.limit = 0
        self.streamed = bytearray()  # chunk bytes accepted for the copy in flight
        self.paste: bytes = b""
        self.handed_out = bytearray()  # paste bytes the broker put into the ring
        self.answer, self.answer_at = b"", -1  # an honest guest's answer to the copy, and its progress

    # The broker ------------------------------------------------------------
    @precondition(lambda self: self.ch.state is HostState.IDLE)
    @rule(tid=st.integers(1, 2**64 - 1), limit=st.integers(0, 4096), answer=st.binary(max_size=200))
    def copy_gesture(self, tid: int, limit: int, answer: bytes) -> None:
        self.ch.start_copy(tid, limit, self.now)
        self.tid, self.limit, self.streamed = tid, limit, bytearray()
        self.answer, self.answer_at = answer[:limit], -1

    @precondition(lambda self: self.ch.state is HostState.IDLE)
    @rule(tid=st.integers(1, 2**64 - 1), data=st.binary(max_size=300))
    def paste_gesture(self, tid: int, data: bytes) -> None:
        self.ch.start_paste(tid, data, self.now)
        self.tid, self.paste, self.handed_out = tid, data, bytearray()

    @rule(seconds=st.sampled_from([0.0, 0.1, 0.6, 1.5, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.check(self.ch.tick(self.now))

    @rule(room=st.integers(0, 8))
    def broker_flushes(self, room: int) -> None:
        for _ in range(room):
            message = self.ch.next_output()
            if message is None:
                break
            assert message.transfer_id == self.tid, "the broker sent a message of another transfer"
            if isinstance(message, DataChunk):
                assert message.offset == len(self.handed_out)
                self.handed_out += bytes(message.data)
            self.ch.output_done(self.now)

    # The hostile guest -------------------------------------------------------
    @rule(kind=kinds, payload=st.binary(max_size=80))
    def any_record(self, kind: int, payload: bytes) -> None:
        self.feed(kind, payload)

    @rule(data=st.data())
    def a_message(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from([self.tid, self.tid ^ 1, 0, 2**64 - 1]))
        offset = data.draw(st.sampled_from([len(self.streamed), len(self.streamed) + 8, 0, 2**40]))
        total = data.draw(st.sampled_from([self.limit, self.limit + 1, 0, 64, 2**40, 2**40 + 1]))
        chunk = data.draw(st.binary(max_size=100))
        code = data.draw(st.sampled_from([*list(StatusCode), 99]))
        # Raw encodings: the message classes would refuse the out-of-range fields.
        kind, payload = data.draw(st.sampled_from([
            (Kind.DATA_BEGIN, struct.pack("<QQ", tid, total)),
            (Kind.DATA_CHUNK, struct.pack("<QQ", tid, offset) + chunk),
            (Kind.DATA_END, struct.pack("<Q", tid)),
            (Kind.STATUS, struct.pack("<QIIQ", tid, code, 0, len(chunk))),
            (Kind.CANCEL, struct.pack("<Q", tid)),
            (Kind.COPY_REQUEST, struct.pack("<QQ", tid, 10)),
        ]))
        self.feed(int(kind), payload)

    @precondition(lambda self: self.ch.state in (HostState.AWAIT_COPY, HostState.RECEIVING_COPY))
    @rule(cut=st.integers(1, 64))
    def honest_answer_step(self, cut: int) -> None:
        """The next piece of an honest answer to the copy in flight."""
        if self.answer_at < 0:
            self.send(DataBegin(self.tid, len(self.answer)))
            self.answer_at = 0
        elif self.answer_at < len(self.answer):
            piece = self.answer[self.answer_at : self.answer_at + cut]
            self.send(DataChunk(self.tid, self.answer_at, piece))
            self.answer_at += len(piece)
        else:
            self.send(DataEnd(self.tid))

    @precondition(lambda self: self.ch.state is HostState.SENDING_PASTE)
    @rule()
    def guest_confirms_paste(self) -> None:
        """OK: a protocol error unless all of the paste was handed out first."""
        self.send(Status(self.tid, StatusCode.OK))

    def send(self, message: Message) -> None:
        kind, parts = encode(message)
        self.feed(int(kind), b"".join(bytes(p) for p in parts))

    # The broker's rule for what it reads, as in broker.vm ----------------------
    def feed(self, kind: int, payload: bytes) -> None:
        STATS["records"] += 1
        state, tid = self.ch.state, self.tid
        try:
            message = decode(kind, payload)
            events = self.ch.receive(message, self.now)
        except RemoteProtocolError:
            STATS["faults"] += 1
            self.check(self.ch.abort(FailReason.CANCELLED))
            return
        if (state is HostState.RECEIVING_COPY and isinstance(message, DataChunk)
                and message.transfer_id == tid and not any(isinstance(e, Dropped) for e in events)):
            self.streamed += bytes(message.data)
        self.check(events)

    def check(self, events: list[HostEvent]) -> None:
        for event in events:
            if isinstance(event, Dropped):
                STATS["dropped"] += 1
                continue
            assert event.transfer_id == self.tid, f"{event} for a transfer not in flight"
            if isinstance(event, CopyCompleted):
                STATS["copies"] += 1
                assert bytes(event.data) == bytes(self.streamed), "copied bytes differ from those streamed"
                assert len(event.data) <= self.limit
            elif isinstance(event, PasteCompleted):
                STATS["pastes"] += 1
                assert bytes(self.handed_out) == self.paste, "paste confirmed before all of it was sent"
            else:
                assert isinstance(event, CopyFailed | PasteFailed)
        FIGURES["hypothesis stateful"] = (
            f"{STATS['sequences']} record sequences, {STATS['records']} records fed, "
            f"{STATS['faults']} protocol faults, {STATS['dropped']} dropped, "
            f"{STATS['copies']} copies and {STATS['pastes']} pastes completed and checked")

    @invariant()
    def bounded_and_consistent(self) -> None:
        inbox = self.ch._inbox
        assert inbox is None or len(inbox.buffer) <= self.limit
        state = self.ch.state
        expected: dict[HostState, int] = {
            HostState.IDLE: 0, HostState.AWAIT_COPY: CAP_COPY_FROM,
            HostState.RECEIVING_COPY: CAP_COPY_FROM, HostState.SENDING_PASTE: CAP_PASTE_TO,
        }
        assert self.ch.capabilities == expected[state]
        assert (inbox is not None) == (state is HostState.RECEIVING_COPY)


TestHostChannel = HostChannelMachine.TestCase
TestHostChannel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


payloads = st.one_of(st.binary(max_size=64), st.builds(
    lambda tid, rest: struct.pack("<Q", tid) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=24)))


@settings(max_examples=1000, deadline=None)
@given(kinds, payloads)
def test_the_decoder_raises_only_remote_protocol_errors_and_round_trips(kind: int, payload: bytes) -> None:
    try:
        message = decode(kind, payload)
    except RemoteProtocolError:
        return
    again_kind, parts = encode(message)  # whatever decodes re-encodes to the very same record
    assert (int(again_kind), b"".join(bytes(p) for p in parts)) == (kind, payload)
