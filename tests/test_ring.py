"""Tests for shm.ring: SPSC record rings, their batching, and validation of a hostile peer.

Most tests use a small ring (4 KiB, so wrap-arounds are frequent) in a
bytearray-backed SharedBuffer; one test moves records between two processes
through a real POSIX shared-memory region.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import struct
import time
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shm import layout
from shm.errors import RingCorruptError
from shm.layout import HEADER_SIZE, RingGeometry
from shm.memory import SharedBuffer
from shm.region import Region, initialise, read_identity
from shm.ring import PAD_KIND, RingConsumer, RingProducer, record_span, ring_wrap

CAP = 4096
MAX_RECORD = CAP // 4
TAIL = layout.G2H_TAIL_OFF
HEAD = layout.G2H_HEAD_OFF
GEOMETRY = RingGeometry(HEADER_SIZE, CAP, TAIL, HEAD)
GUARD = 4096  # bytes after the ring that no consumer may read
HDR = struct.Struct("<II")
BLOCK = random.Random(1).randbytes(MAX_RECORD + 256)
U64 = (1 << 64) - 1


class TracingBuffer(SharedBuffer):
    """A SharedBuffer that records every read and store, to check where a ring end looks."""

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        self.reads: list[tuple[int, int]] = []
        self.stores: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read(offset, length)

    def load_u64(self, offset: int) -> int:
        self.reads.append((offset, 8))
        return super().load_u64(offset)

    def store_u64(self, offset: int, value: int) -> None:
        self.stores.append((offset, value))
        super().store_u64(offset, value)


@dataclass
class Ring:
    buf: bytearray
    mem: TracingBuffer
    producer: RingProducer
    consumer: RingConsumer

    def poll_all(self) -> list[tuple[int, bytes]]:
        out = []
        while (record := self.consumer.poll()) is not None:
            out.append((record.kind, record.payload))
        return out


def make_ring(start: int = 0, *, max_record: int = MAX_RECORD) -> Ring:
    buf = bytearray(HEADER_SIZE + CAP + GUARD)
    mem = TracingBuffer(buf)
    mem.store_u64(TAIL, start)
    mem.store_u64(HEAD, start)
    producer = RingProducer(mem, GEOMETRY, max_record, start_index=start)
    consumer = RingConsumer(mem, GEOMETRY, max_record, start_index=start)
    mem.stores.clear()
    return Ring(buf, mem, producer, consumer)


def payload(length: int, salt: int = 0) -> bytes:
    start = salt % 256
    return BLOCK[start : start + length]


# Basics ----------------------------------------------------------------------
def test_record_span():
    assert [record_span(n) for n in (0, 1, 7, 8, 9, 16, 17)] == [8, 16, 16, 16, 24, 24, 32]


def test_empty_ring():
    ring = make_ring()
    assert ring.consumer.available() == 0
    assert ring.consumer.poll() is None
    assert ring.consumer.peek() is None
    assert ring.producer.free_space() == CAP
    with pytest.raises(RuntimeError):
        ring.consumer.consume()


def test_records_round_trip_in_order():
    ring = make_ring()
    records = [(1, b""), (7, b"a"), (0xFFFFFFFF, payload(1000)), (2, payload(MAX_RECORD, 3))]
    for kind, data in records:
        assert ring.producer.try_push(kind, [data])
    assert ring.poll_all() == records
    assert ring.consumer.head == ring.producer.tail


def test_payload_parts_are_concatenated():
    ring = make_ring()
    assert ring.producer.try_push(3, [b"ab", bytearray(b"cd"), memoryview(b"ef"), b""])
    assert ring.poll_all() == [(3, b"abcdef")]


def test_record_bytes_in_memory():
    ring = make_ring()
    assert ring.producer.try_push(5, [b"abc"])
    assert ring.buf[HEADER_SIZE : HEADER_SIZE + 11] == HDR.pack(3, 5) + b"abc"
    assert ring.producer.tail == 16
    assert ring.mem.load_u64(TAIL) == 16


def test_try_push_refuses_bad_arguments():
    ring = make_ring()
    for kind in (PAD_KIND, -1, 1 << 32):
        with pytest.raises(ValueError):
            ring.producer.try_push(kind, [b"x"])
    with pytest.raises(ValueError):
        ring.producer.try_push(1, [payload(MAX_RECORD), b"x"])
    assert ring.producer.tail == 0 and ring.mem.load_u64(TAIL) == 0


@pytest.mark.parametrize(
    ("geometry", "max_record", "start"),
    [
        (RingGeometry(HEADER_SIZE, CAP + 8, TAIL, HEAD), 64, 0),  # not whole pages
        (RingGeometry(HEADER_SIZE + GUARD, 2 * CAP, TAIL, HEAD), 64, 0),  # past the buffer
        (GEOMETRY, 0, 0),
        (GEOMETRY, CAP // 4 + 1, 0),
        (GEOMETRY, 64, 4),  # misaligned start
    ],
)
def test_ring_ends_refuse_bad_geometry(geometry, max_record, start):
    mem = SharedBuffer(bytearray(HEADER_SIZE + CAP + GUARD))
    for end in (RingProducer, RingConsumer):
        with pytest.raises(ValueError):
            end(mem, geometry, max_record, start_index=start)


# Full and wrap-around -----------------------------------------------------------
def test_full_ring_refuses_and_writes_nothing():
    ring = make_ring()
    count = 0
    while ring.producer.try_push(1, [payload(100, count)]):
        count += 1
    assert count == CAP // record_span(100)  # 36 records, 64 bytes left before the end
    assert ring.producer.try_push(2, [payload(56)])  # exactly fills the last 64 bytes
    assert ring.producer.free_space() == 0
    before, tail = bytes(ring.buf), ring.producer.tail
    assert not ring.producer.try_push(1, [b""])
    assert not ring.producer.try_push(1, [payload(MAX_RECORD)])
    assert bytes(ring.buf) == before and ring.producer.tail == tail
    assert ring.consumer.poll() is not None  # frees 112 bytes at the front
    assert ring.producer.try_push(3, [payload(100)])


def test_wrap_that_does_not_fit_writes_no_padding():
    ring = make_ring()
    for i in range(36):
        assert ring.producer.try_push(1, [payload(100, i)])
    assert ring.producer.tail == 4032  # 64 bytes before the end
    assert ring.consumer.poll() is not None  # 112 free at the front: 176 in all
    before = bytes(ring.buf)
    # 64 of padding + 120 of record = 184 > 176: refused, and the padding not written.
    assert not ring.producer.try_push(1, [payload(112)])
    assert bytes(ring.buf) == before and ring.producer.tail == 4032


def test_wrap_writes_a_padding_record():
    ring = make_ring()
    for i in range(36):
        assert ring.producer.try_push(1, [payload(100, i)])
    assert ring.consumer.poll() is not None
    assert ring.producer.try_push(9, [payload(100, 99)])  # needs 64 + 112 = 176: fits
    assert ring.buf[HEADER_SIZE + 4032 : HEADER_SIZE + 4040] == HDR.pack(56, PAD_KIND)
    assert ring.buf[HEADER_SIZE : HEADER_SIZE + 8] == HDR.pack(100, 9)
    assert ring.producer.tail == 4032 + 64 + 112
    records = ring.poll_all()
    assert len(records) == 36 and records[-1] == (9, payload(100, 99))
    assert ring.consumer.head == ring.producer.tail == ring.mem.load_u64(HEAD)


@pytest.mark.parametrize("to_end", [8, 16, 24, 64, 512, 1032, CAP])
def test_every_length_across_the_end(to_end):
    """A record of each length 0..max_record, pushed with `to_end` bytes before the end."""
    for length in range(MAX_RECORD + 1):
        start = 5 * CAP - to_end  # free-running: well past the first lap
        ring = make_ring(start)
        data = payload(length, length)
        assert ring.producer.try_push(length % 5 + 1, [data])
        span = record_span(length)
        pos = CAP - to_end
        if span <= to_end:
            assert HDR.unpack_from(ring.buf, HEADER_SIZE + pos) == (length, length % 5 + 1)
            assert ring.producer.tail == start + span
        else:
            assert HDR.unpack_from(ring.buf, HEADER_SIZE + pos) == (to_end - 8, PAD_KIND)
            assert HDR.unpack_from(ring.buf, HEADER_SIZE) == (length, length % 5 + 1)
            assert ring.producer.tail == start + to_end + span
        record = ring.consumer.poll()
        assert record is not None and record.payload == data, length
        assert ring.consumer.poll() is None
        assert ring.consumer.head == ring.producer.tail == ring.mem.load_u64(HEAD)


def test_indices_run_free_over_many_laps():
    ring = make_ring()
    rng = random.Random(7)
    for i in range(2000):
        data = payload(rng.randrange(0, 300), i)
        assert ring.producer.try_push(1 + i % 3, [data])
        record = ring.consumer.poll()
        assert record is not None and record == type(record)(1 + i % 3, data)
    assert ring.producer.tail > 50 * CAP
    assert ring.mem.load_u64(TAIL) == ring.producer.tail == ring.consumer.head
    assert ring.mem.load_u64(HEAD) == ring.consumer.head


# Batching ----------------------------------------------------------------------
def test_consumer_sees_nothing_until_publish():
    ring = make_ring()
    for i in range(3):
        assert ring.producer.try_push(1, [bytes([i])], publish=False)
    assert ring.mem.load_u64(TAIL) == 0 and ring.mem.stores == []
    assert ring.consumer.poll() is None
    ring.producer.publish()
    assert ring.mem.stores == [(TAIL, 48)]  # one release store for three records
    ring.producer.publish()  # nothing new: no store
    assert ring.mem.stores == [(TAIL, 48)]
    assert ring.poll_all() == [(1, b"\0"), (1, b"\1"), (1, b"\2")]


def test_unpublished_records_count_against_free_space():
    ring = make_ring()
    assert ring.producer.try_push(1, [payload(1000)], publish=False)
    assert ring.producer.free_space() == CAP - record_span(1000)


def test_release_batching_with_poll():
    ring = make_ring()
    for i in range(3):
        assert ring.producer.try_push(1, [bytes([i])])
    ring.mem.stores.clear()
    first = ring.consumer.poll(release=False)
    second = ring.consumer.poll(release=False)
    assert first is not None and second is not None
    assert (first.payload, second.payload) == (b"\0", b"\1")
    assert ring.mem.load_u64(HEAD) == 0 and ring.mem.stores == []
    assert ring.producer.free_space() == CAP - 48  # the producer still sees them as used
    ring.consumer.release()
    assert ring.mem.stores == [(HEAD, 32)]
    ring.consumer.release()
    assert ring.mem.stores == [(HEAD, 32)]
    assert ring.producer.free_space() == CAP - 16


def test_release_batching_with_peek_and_consume():
    ring = make_ring()
    assert ring.producer.try_push(4, [b"hello"])
    assert ring.producer.try_push(5, [b"world!"])
    found = ring.consumer.peek()
    assert found is not None
    kind, view = found
    assert (kind, bytes(view)) == (4, b"hello") and view.readonly
    view.release()
    ring.consumer.consume(release=False)
    assert ring.mem.load_u64(HEAD) == 0
    found = ring.consumer.peek()
    assert found is not None and bytes(found[1]) == b"world!"
    found[1].release()
    ring.consumer.consume()
    assert ring.mem.load_u64(HEAD) == 32
    with pytest.raises(RuntimeError):
        ring.consumer.consume()


def test_peeking_the_same_record_again_ends_the_earlier_views():
    """A reader waiting for room elsewhere peeks the same record every round: no pile-up."""
    ring = make_ring()
    assert ring.producer.try_push(4, [b"hello"])
    first = ring.consumer.peek()
    assert first is not None
    for _ in range(1000):
        again = ring.consumer.peek()
        assert again is not None and bytes(again[1]) == b"hello"
    with pytest.raises(ValueError):
        bytes(first[1])  # released by the next peek
    assert len(ring.consumer._unconsumed) == 1
    ring.consumer.consume()
    assert ring.consumer.peek() is None and not ring.consumer._unconsumed


def test_producer_waits_for_release_not_for_poll():
    ring = make_ring()
    while ring.producer.try_push(1, [payload(200)]):
        pass
    while ring.consumer.poll(release=False) is not None:
        pass
    assert not ring.producer.try_push(1, [payload(200)])
    ring.consumer.release()
    assert ring.producer.try_push(1, [payload(200)])


def test_each_side_trusts_only_its_private_index():
    ring = make_ring()
    assert ring.producer.try_push(1, [b"a"])
    assert ring.producer.try_push(1, [b"b"])
    record = ring.consumer.poll()
    assert record is not None and record.payload == b"a"
    # A peer scribbling over the indices it does not own changes nothing on our side:
    ring.mem.store_u64(TAIL, 12345)  # the consumer already validated tail = 32 ...
    record = ring.consumer.poll()
    assert record is not None and record.payload == b"b"  # ... and uses its private copy
    ring.mem.store_u64(TAIL, 999)
    assert ring.producer.try_push(1, [b"c"])  # republishes its own tail
    assert ring.mem.load_u64(TAIL) == ring.producer.tail == 48


# Model-based property test ------------------------------------------------------
SIZES = st.one_of(
    st.integers(0, 24),
    st.integers(0, MAX_RECORD),
    st.sampled_from([MAX_RECORD, MAX_RECORD - 1, MAX_RECORD - 8, CAP // 8]),
)


class RingMachine(RuleBasedStateMachine):
    """Producer and consumer against a deque model, in random interleavings."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = make_ring()
        self.serial = 0
        self.start = 0

    @initialize(lap=st.integers(0, 3), slot=st.integers(0, CAP // 8 - 1))
    def setup(self, lap: int, slot: int) -> None:
        self.start = lap * CAP + slot * 8
        self.ring = make_ring(self.start)
        self.tail = self.start  # producer's index in the model
        self.published_tail = self.start
        self.head = self.start  # consumer's index in the model
        self.released = self.start
        self.visible: deque[tuple[int, bytes, int]] = deque()  # kind, payload, bytes used
        self.unpublished: list[tuple[int, bytes, int]] = []

    @rule(length=SIZES, kind=st.integers(1, 0xFFFFFFFF), publish=st.booleans())
    def push(self, length: int, kind: int, publish: bool) -> None:
        self.serial += 1
        data = payload(length, self.serial)
        span = record_span(length)
        to_end = CAP - self.tail % CAP
        need = span if span <= to_end else to_end + span
        fits = need <= CAP - (self.tail - self.released)
        assert self.ring.producer.try_push(kind, [data], publish=publish) == fits
        if fits:
            self.tail += need
            self.unpublished.append((kind, data, need))
        if publish:  # even when full: what was written before becomes visible
            self._published()

    def _published(self) -> None:
        self.visible.extend(self.unpublished)
        self.unpublished.clear()
        self.published_tail = self.tail

    @rule()
    def publish(self) -> None:
        self.ring.producer.publish()
        self._published()

    @rule(release=st.booleans())
    def poll(self, release: bool) -> None:
        record = self.ring.consumer.poll(release=release)
        if not self.visible:
            assert record is None
        else:
            kind, data, used = self.visible.popleft()
            assert record is not None and (record.kind, record.payload) == (kind, data)
            self.head += used
        if release:
            self.released = self.head

    @rule(release=st.booleans())
    def peek_and_consume(self, release: bool) -> None:
        found = self.ring.consumer.peek()
        if not self.visible:
            assert found is None
            return
        kind, data, used = self.visible.popleft()
        assert found is not None
        assert (found[0], bytes(found[1])) == (kind, data)
        found[1].release()
        self.ring.consumer.consume(release=release)
        self.head += used
        if release:
            self.released = self.head

    @rule()
    def release(self) -> None:
        self.ring.consumer.release()
        self.released = self.head

    @invariant()
    def indices_agree(self) -> None:
        assert self.ring.producer.tail == self.tail & U64
        assert self.ring.consumer.head == self.head & U64
        assert self.ring.mem.load_u64(TAIL) == self.published_tail
        assert self.ring.mem.load_u64(HEAD) == self.released
        assert 0 <= self.tail - self.released <= CAP


RingMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ring_matches_model = RingMachine.TestCase


# A hostile producer: what the consumer must refuse ---------------------------------
START = 3 * CAP  # so that "behind" is a small positive index


def hostile(tail: int, writes: dict[int, bytes] | None = None) -> Ring:
    """A consumer at START facing a producer that published `tail` and wrote `writes`."""
    ring = make_ring(START)
    for pos, data in (writes or {}).items():
        ring.buf[HEADER_SIZE + pos : HEADER_SIZE + pos + len(data)] = data
    ring.mem.store_u64(TAIL, tail & U64)
    return ring


def drain_all(consumer: RingConsumer) -> tuple[list[tuple[int, bytes]], bool]:
    """Everything drain_into (the C path) returns, and whether it ended in RingCorruptError."""
    dst = bytearray(CAP)
    meta = array("I", bytes(8 * (CAP // 8 + 1)))
    records: list[tuple[int, bytes]] = []
    try:
        for _ in range(CAP):
            count, _ = consumer.drain_into(dst, meta)
            if count == 0:
                break
            at = 0
            for i in range(count):
                kind, length = meta[2 * i], meta[2 * i + 1]
                records.append((kind, bytes(dst[at : at + length])))
                at += length
    except RingCorruptError:
        return records, True
    return records, False


def poll_all_checked(consumer: RingConsumer) -> tuple[list[tuple[int, bytes]], bool]:
    records: list[tuple[int, bytes]] = []
    try:
        for _ in range(CAP):
            record = consumer.poll()
            if record is None:
                break
            records.append((record.kind, record.payload))
    except RingCorruptError:
        return records, True
    return records, False


@pytest.mark.parametrize(
    "tail",
    [START - 8, 0, U64 & ~7, START + CAP + 8, START + 2 * CAP, START + (1 << 63), START + 4,
     START + 12],
    ids=["behind", "zero", "u64-max", "cap+8", "two-caps", "half-range", "misaligned-4",
         "misaligned-12"],
)
def test_consumer_refuses_bad_tail(tail):
    ring = hostile(tail)
    with pytest.raises(RingCorruptError):
        ring.consumer.poll()
    with pytest.raises(RingCorruptError):
        ring.consumer.available()
    assert drain_all(hostile(tail).consumer) == ([], True)


def test_consumer_accepts_tail_exactly_capacity_ahead():
    writes = {pos: HDR.pack(8, 1) + bytes(8) for pos in range(0, CAP, 16)}
    ring = hostile(START + CAP, writes)
    assert ring.consumer.available() == CAP
    assert len(ring.poll_all()) == CAP // 16


@pytest.mark.parametrize(
    ("tail", "writes", "why"),
    [
        (START + CAP, {0: HDR.pack(MAX_RECORD + 1, 1)}, "over max_record"),
        (START + CAP, {0: HDR.pack(0xFFFFFFFF, 1)}, "u32 max length"),
        (START + 16, {0: HDR.pack(100, 1)}, "past the published span"),
        (START + 16, {0: HDR.pack(9, 1)}, "span rounds past the published span"),
        (START + CAP, {0: HDR.pack(8, PAD_KIND)}, "padding not ending the ring"),
        (START + CAP, {0: HDR.pack(CAP - 16, PAD_KIND)}, "padding one word short"),
        (START + CAP, {0: HDR.pack(CAP, PAD_KIND)}, "padding past the end"),
        (START + CAP, {0: HDR.pack(0, PAD_KIND)}, "zero padding"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_consumer_refuses_bad_record(tail, writes, why):
    ring = hostile(tail, writes)
    with pytest.raises(RingCorruptError):
        ring.consumer.poll()
    ring = hostile(tail, writes)
    with pytest.raises(RingCorruptError):
        ring.consumer.peek()
    assert drain_all(hostile(tail, writes).consumer) == ([], True)


def test_consumer_refuses_padding_beyond_the_published_span():
    # A consumer 16 bytes before the end sees a valid-looking pad record but only 8 published,
    # and a valid-looking record after it: skipping the pad would run the head past the tail.
    start = 4 * CAP - 16
    writes = {CAP - 16: HDR.pack(8, PAD_KIND), 0: HDR.pack(8, 1) + b"unpublsh"}
    ring = make_ring(start)
    for pos, data in writes.items():
        ring.buf[HEADER_SIZE + pos : HEADER_SIZE + pos + len(data)] = data
    ring.mem.store_u64(TAIL, start + 8)
    twin = make_ring(start)
    twin.buf[:] = ring.buf
    with pytest.raises(RingCorruptError):
        ring.consumer.poll()
    assert drain_all(twin.consumer) == ([], True)


def test_consumer_refuses_record_crossing_the_end():
    start = 4 * CAP - 16
    ring = make_ring(start)
    ring.buf[HEADER_SIZE + CAP - 16 : HEADER_SIZE + CAP - 8] = HDR.pack(64, 1)
    ring.mem.store_u64(TAIL, start + CAP)
    with pytest.raises(RingCorruptError):
        ring.consumer.poll()
    assert all(off + n <= HEADER_SIZE + CAP for off, n in ring.mem.reads)


def test_the_trace_sees_the_consumers_reads():
    """The next test relies on TracingBuffer seeing every read a consumer makes."""
    ring = make_ring()
    assert ring.producer.try_push(1, [b"traced!!"])
    ring.mem.reads.clear()
    assert ring.consumer.poll() is not None
    in_ring = [(o, n) for o, n in ring.mem.reads if HEADER_SIZE <= o < HEADER_SIZE + CAP]
    assert sum(n for _, n in in_ring) >= 16  # the header and the payload
    assert (TAIL, 8) in ring.mem.reads


@settings(max_examples=300, deadline=None)
@given(
    tail_delta=st.one_of(st.integers(0, CAP + 64), st.integers(0, U64)),
    start_slot=st.integers(0, CAP // 8 - 1),
    headers=st.lists(
        st.tuples(st.integers(0, CAP - 8), st.integers(0, 0xFFFFFFFF) | st.integers(0, 64),
                  st.integers(0, 3)),
        max_size=24,
    ),
    use_peek=st.booleans(),
)
def test_consumer_never_reads_outside_the_ring(tail_delta, start_slot, headers, use_peek):
    """Whatever the producer wrote, the consumer returns bounded records or raises RingCorruptError."""
    start = 2 * CAP + start_slot * 8
    ring, twin = make_ring(start), make_ring(start)
    for r in (ring, twin):
        r.buf[HEADER_SIZE + CAP :] = b"\xee" * GUARD
        for pos, length, kind in headers:
            r.buf[HEADER_SIZE + pos : HEADER_SIZE + pos + 8] = HDR.pack(length, kind)
        r.mem.store_u64(TAIL, (start + tail_delta) & U64)
    ring.mem.reads.clear()
    try:
        for _ in range(CAP // 8 + 1):
            if use_peek:
                found = ring.consumer.peek()
                if found is None:
                    break
                assert len(found[1]) <= MAX_RECORD and found[0] != PAD_KIND
                found[1].release()
                ring.consumer.consume()
            else:
                record = ring.consumer.poll()
                if record is None:
                    break
                assert len(record.payload) <= MAX_RECORD and record.kind != PAD_KIND
                assert b"\xee" not in record.payload
    except RingCorruptError:
        pass
    for offset, length in ring.mem.reads:
        inside_ring = offset >= HEADER_SIZE and offset + length <= HEADER_SIZE + CAP
        assert inside_ring or (offset, length) == (TAIL, 8), (offset, length)
    assert 0 <= (ring.consumer.head - start) & U64 <= CAP
    # The C path (drain_into) repeats the same checks: same records, same verdict.
    if not use_peek:
        control = make_ring(start)
        control.buf[:] = twin.buf
        assert drain_all(twin.consumer) == poll_all_checked(control.consumer)


# A hostile consumer: what the producer must refuse -------------------------------------
@pytest.mark.parametrize(
    "head",
    [START + 8, START + CAP, START - CAP - 8, 0, U64 & ~7, START - 2 * CAP],
    ids=["ahead", "cap-ahead", "cap+8-behind", "zero", "u64-max", "two-caps-behind"],
)
def test_producer_refuses_bad_head(head):
    ring = make_ring(START)
    ring.mem.store_u64(HEAD, head)
    before = bytes(ring.buf)
    with pytest.raises(RingCorruptError):
        ring.producer.try_push(1, [b"x"])
    with pytest.raises(RingCorruptError):
        ring.producer.free_space()
    with pytest.raises(RingCorruptError):
        ring.producer.push_batch(1, b"abc", [1, 2])  # the C path reads the head in Python
    assert bytes(ring.buf) == before  # nothing written, nothing published


def test_producer_accepts_head_exactly_capacity_behind():
    ring = make_ring(START)
    ring.mem.store_u64(HEAD, START - CAP)
    assert ring.producer.free_space() == 0
    assert not ring.producer.try_push(1, [b"x"])
    ring.mem.store_u64(HEAD, START)
    assert ring.producer.try_push(1, [b"x"])


def test_producer_rechecks_head_when_it_looks_full():
    """The producer caches the head it saw; a later bad head is caught when it looks again."""
    ring = make_ring()
    assert ring.producer.try_push(1, [payload(MAX_RECORD)])
    ring.mem.store_u64(HEAD, 8 * CAP)  # garbage, but not needed while space is known
    assert ring.producer.try_push(1, [payload(MAX_RECORD)])
    with pytest.raises(RingCorruptError):
        for _ in range(4):
            ring.producer.try_push(1, [payload(MAX_RECORD)])


# Free-running indices across 2**64 -----------------------------------------------------
def _fill_then_drain(mem: SharedBuffer, geometry: RingGeometry, max_record: int, start: int):
    mem.store_u64(geometry.producer_index_offset, start)
    mem.store_u64(geometry.consumer_index_offset, start)
    producer = RingProducer(mem, geometry, max_record, start_index=start)
    consumer = RingConsumer(mem, geometry, max_record, start_index=start)
    sent = []
    while producer.try_push(1, [data := len(sent).to_bytes(8, "little")]):
        sent.append(data)
    received = []
    while (record := consumer.poll()) is not None:
        received.append(record.payload)
    return sent, received


@pytest.mark.parametrize("capacity_of", ["power of two", "real geometry"])
def test_indices_wrap_at_the_ring_modulus_without_a_jump(capacity_of: str) -> None:
    """Indices run modulo the largest multiple of the capacity below 2**64 (ring_wrap):
    a capacity that does not divide 2**64 (every real geometry) keeps positions
    continuous across the wrap."""
    if capacity_of == "power of two":
        mem, geometry, max_record = SharedBuffer(bytearray(HEADER_SIZE + CAP)), GEOMETRY, MAX_RECORD
    else:
        real = layout.expected_geometry(1 << 20)
        assert (1 << 64) % real.guest_to_host.capacity != 0
        mem, geometry, max_record = SharedBuffer(bytearray(1 << 20)), real.guest_to_host, real.max_record
    wrap = ring_wrap(geometry.capacity)
    assert wrap % geometry.capacity == 0 and (1 << 64) - geometry.capacity <= wrap < 1 << 64
    sent, received = _fill_then_drain(mem, geometry, max_record, wrap - 64)
    assert len(sent) == geometry.capacity // 16 and received == sent
    assert mem.load_u64(geometry.producer_index_offset) < 64 + geometry.capacity  # it wrapped


def test_a_peer_index_at_or_past_the_modulus_is_corrupt() -> None:
    mem = SharedBuffer(bytearray(HEADER_SIZE + CAP))
    consumer = RingConsumer(mem, GEOMETRY, MAX_RECORD)
    mem.store_u64(GEOMETRY.producer_index_offset, ring_wrap(CAP))  # "0 ahead", but out of range
    with pytest.raises(RingCorruptError):
        consumer.poll()


# Two processes over a real region -----------------------------------------------------
N_RECORDS = 3000


def _records(seed: int, count: int, max_record: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        roll = rng.random()
        size = rng.randrange(0, 64) if roll < 0.6 else rng.randrange(0, 4096)
        if roll > 0.99:
            size = rng.randrange(max_record // 2, max_record + 1)
        out.append((rng.randrange(1, 1 << 32), rng.randbytes(size)))
    return out


def _digest(records: list[tuple[int, bytes]]) -> str:
    h = hashlib.sha256()
    for kind, data in records:
        h.update(struct.pack("<II", kind, len(data)))
        h.update(data)
    return h.hexdigest()


def _pump(
    producer: RingProducer, consumer: RingConsumer, outgoing: list[tuple[int, bytes]],
    expect: int, deadline: float, peer_gone: Any = lambda: False,
) -> list[tuple[int, bytes]]:
    """Send `outgoing` and receive `expect` records, interleaved, without blocking."""
    sent = 0
    received: list[tuple[int, bytes]] = []
    while sent < len(outgoing) or len(received) < expect:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sent {sent}/{len(outgoing)}, received {len(received)}/{expect}")
        progress = False
        batch = 0
        while sent < len(outgoing) and batch < 64:
            kind, data = outgoing[sent]
            if not producer.try_push(kind, [data], publish=False):
                break
            sent += 1
            batch += 1
            progress = True
        producer.publish()
        while (record := consumer.poll(release=False)) is not None:
            received.append((record.kind, record.payload))
            progress = True
        consumer.release()
        if not progress:
            if peer_gone():
                raise RuntimeError(f"the peer left: sent {sent}, received {len(received)}")
            time.sleep(0)
    return received


def _guest(path: str, conn: Any) -> None:
    region = None
    try:
        region = Region.attach(Path(path))
        geometry = read_identity(region.mem).geometry
        producer = RingProducer(region.mem, geometry.guest_to_host, geometry.max_record)
        consumer = RingConsumer(region.mem, geometry.host_to_guest, geometry.max_record)
        outgoing = _records(1, N_RECORDS, geometry.max_record)
        received = _pump(producer, consumer, outgoing, N_RECORDS, time.monotonic() + 60)
        conn.send(("ok", _digest(received), len(received)))
    except BaseException as exc:
        conn.send(("error", repr(exc), 0))
    finally:
        if region is not None:
            region.close()


def test_two_processes_move_records_both_ways(shm_name):
    region = Region.create(shm_name, 1 << 20)
    try:
        geometry = initialise(region.mem, b"s" * 16)
        parent_end, child_end = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=_guest, args=(str(region.path), child_end)
        )
        child.start()
        try:
            producer = RingProducer(region.mem, geometry.host_to_guest, geometry.max_record)
            consumer = RingConsumer(region.mem, geometry.guest_to_host, geometry.max_record)
            outgoing = _records(2, N_RECORDS, geometry.max_record)
            pump_error: Exception | None = None
            try:
                received = _pump(producer, consumer, outgoing, N_RECORDS,
                                 time.monotonic() + 60, peer_gone=lambda: not child.is_alive())
            except (RuntimeError, TimeoutError) as exc:
                pump_error, received = exc, []
            answer = parent_end.recv() if parent_end.poll(10) else ("no answer", "", 0)
            status, child_digest, child_count = answer
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        assert status == "ok", child_digest  # the child's error, if it failed
        assert pump_error is None
        assert child.exitcode == 0
        assert (child_count, child_digest) == (N_RECORDS, _digest(outgoing))
        expected = _records(1, N_RECORDS, geometry.max_record)
        assert _digest(received) == _digest(expected)
        assert received == expected
        # Both rings wrapped several times, through padding records.
        assert consumer.head > 2 * geometry.guest_to_host.capacity
        assert producer.tail > 2 * geometry.host_to_guest.capacity
    finally:
        region.close()
        region.unlink()
