"""Tests for protocol.pump: drain and flush batching, and how their errors propagate."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from protocol.channel import HostChannel
from protocol.errors import RemoteProtocolError
from protocol.messages import Cancel, DataChunk, DataEnd, Message, Status, StatusCode, encode
from protocol.pump import drain, flush
from shm.errors import RingCorruptError
from shm.layout import HEADER_SIZE, RingGeometry
from shm.memory import SharedBuffer
from shm.ring import RingConsumer, RingProducer


@dataclass(frozen=True)
class FakeRecord:
    kind: int
    payload: bytes


def record(message: Message) -> FakeRecord:
    kind, parts = encode(message)
    return FakeRecord(kind, b"".join(bytes(p) for p in parts))


@dataclass
class FakeSource:
    records: deque[FakeRecord | Exception] = field(default_factory=deque)
    calls: list[str] = field(default_factory=list)

    def poll(self, *, release: bool = True) -> FakeRecord | None:
        self.calls.append(f"poll(release={release})")
        if not self.records:
            return None
        item = self.records.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def release(self) -> None:
        self.calls.append("release")


@dataclass
class FakeSink:
    room: int
    fail_after: int | None = None
    pushed: list[tuple[int, bytes, bool]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def try_push(
        self, kind: int, parts: Sequence[bytes | bytearray | memoryview], *, publish: bool = True
    ) -> bool:
        self.calls.append(f"push(publish={publish})")
        if self.fail_after is not None and len(self.pushed) >= self.fail_after:
            raise RingCorruptError("consumer index went backwards")
        if len(self.pushed) >= self.room:
            return False
        self.pushed.append((kind, b"".join(bytes(p) for p in parts), publish))
        return True

    def publish(self) -> None:
        self.calls.append("publish")


@dataclass
class FakeChannel:
    outbox: deque[Message]
    done_count: int = 0

    def next_output(self) -> Message | None:
        return self.outbox[0] if self.outbox else None

    def done(self) -> None:
        self.outbox.popleft()
        self.done_count += 1


MESSAGES = [Cancel(1), DataEnd(2), Status(3, StatusCode.BUSY, 7), DataChunk(4, 0, b"abc")]


# drain -------------------------------------------------------------------------
def test_drain_delivers_in_order_and_releases_once():
    source = FakeSource(deque(record(m) for m in MESSAGES))
    delivered: list[Message] = []
    assert drain(source, delivered.append, max_records=10) == 4
    assert delivered == MESSAGES
    assert source.calls == ["poll(release=False)"] * 5 + ["release"]


def test_drain_of_an_empty_source():
    source = FakeSource()
    assert drain(source, lambda m: pytest.fail("nothing to deliver"), max_records=10) == 0
    assert source.calls == ["poll(release=False)", "release"]


def test_drain_stops_at_max_records():
    source = FakeSource(deque(record(Cancel(i)) for i in range(10)))
    delivered: list[Message] = []
    assert drain(source, delivered.append, max_records=3) == 3
    assert delivered == [Cancel(0), Cancel(1), Cancel(2)]
    assert len(source.records) == 7
    assert source.calls.count("release") == 1
    assert drain(source, delivered.append, max_records=100) == 7


def test_drain_with_zero_max_records_touches_nothing():
    source = FakeSource(deque([record(Cancel(1))]))
    assert drain(source, lambda m: None, max_records=0) == 0
    assert len(source.records) == 1 and "poll(release=False)" not in source.calls


def test_drain_propagates_a_record_that_does_not_decode():
    source = FakeSource(deque([record(Cancel(1)), FakeRecord(99, b""), record(Cancel(2))]))
    delivered: list[Message] = []
    with pytest.raises(RemoteProtocolError):
        drain(source, delivered.append, max_records=10)
    assert delivered == [Cancel(1)]
    assert source.calls[-1] == "release" and source.calls.count("release") == 1
    assert len(source.records) == 1  # stopped at the bad record


def test_drain_propagates_a_rejection_by_the_receiver():
    source = FakeSource(deque([record(Cancel(1)), record(Cancel(2))]))

    def deliver(message: Message) -> None:
        raise RemoteProtocolError("not now")

    with pytest.raises(RemoteProtocolError, match="not now"):
        drain(source, deliver, max_records=10)
    assert source.calls == ["poll(release=False)", "release"]


def test_drain_propagates_ring_corruption_and_still_releases():
    source = FakeSource(deque([record(Cancel(1)), RingCorruptError("bad tail")]))
    delivered: list[Message] = []
    with pytest.raises(RingCorruptError):
        drain(source, delivered.append, max_records=10)
    assert delivered == [Cancel(1)]
    assert source.calls[-1] == "release"


# flush -------------------------------------------------------------------------
def test_flush_pushes_unpublished_and_publishes_once():
    channel = FakeChannel(deque(MESSAGES))
    sink = FakeSink(room=10)
    assert flush(sink, channel, channel.done, max_records=10) == 4
    assert [(k, p) for k, p, _ in sink.pushed] == [
        (record(m).kind, record(m).payload) for m in MESSAGES
    ]
    assert all(not published for _, _, published in sink.pushed)
    assert sink.calls == ["push(publish=False)"] * 4 + ["publish"]
    assert channel.done_count == 4


def test_flush_stops_when_the_ring_is_full_and_keeps_the_message():
    channel = FakeChannel(deque(MESSAGES))
    sink = FakeSink(room=2)
    assert flush(sink, channel, channel.done, max_records=10) == 2
    assert channel.done_count == 2
    assert channel.next_output() == MESSAGES[2]  # refused, not lost
    assert sink.calls[-1] == "publish" and sink.calls.count("publish") == 1
    sink.room = 10
    assert flush(sink, channel, channel.done, max_records=10) == 2
    assert [p for _, p, _ in sink.pushed][2:] == [record(m).payload for m in MESSAGES[2:]]


def test_flush_stops_at_max_records():
    channel = FakeChannel(deque(Cancel(i) for i in range(10)))
    sink = FakeSink(room=100)
    assert flush(sink, channel, channel.done, max_records=4) == 4
    assert len(channel.outbox) == 6
    assert sink.calls.count("publish") == 1


def test_flush_with_nothing_to_send_still_publishes():
    sink = FakeSink(room=10)
    assert flush(sink, FakeChannel(deque()), lambda: None, max_records=10) == 0
    assert sink.calls == ["publish"]


def test_flush_propagates_ring_corruption_and_publishes_what_it_pushed():
    channel = FakeChannel(deque(MESSAGES))
    sink = FakeSink(room=10, fail_after=1)
    with pytest.raises(RingCorruptError):
        flush(sink, channel, channel.done, max_records=10)
    assert channel.done_count == 1  # the failed message was not reported done
    assert sink.calls[-1] == "publish"


# Through real rings ----------------------------------------------------------------
CAP = 4096
GEOMETRY = RingGeometry(HEADER_SIZE, CAP, 512, 640)


def test_flush_and_drain_move_a_paste_through_a_small_ring():
    """A paste bigger than the ring goes through in several rounds, each batched."""
    mem = SharedBuffer(bytearray(HEADER_SIZE + CAP))
    producer = RingProducer(mem, GEOMETRY, 1024)
    consumer = RingConsumer(mem, GEOMETRY, 1024)
    host = HostChannel(chunk_size=1000, timeout_s=5)
    data = bytes(range(256)) * 40  # 10 KiB: more than twice the ring
    host.start_paste(7, data, 0.0)
    received = bytearray()
    rounds = 0
    ended = False
    while not ended:
        rounds += 1
        assert rounds < 20
        pushed = flush(producer, host, lambda: host.output_done(0.0), max_records=100)
        assert pushed > 0
        assert mem.load_u64(512) == producer.tail  # published at the end of the round
        messages: list[Message] = []
        drain(consumer, messages.append, max_records=100)
        assert mem.load_u64(640) == consumer.head  # released at the end of the round
        for message in messages:
            if isinstance(message, DataChunk):
                assert message.offset == len(received)
                received += message.data
            ended |= isinstance(message, DataEnd)
    assert bytes(received) == data
    assert rounds >= 3
