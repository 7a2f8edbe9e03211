"""Zero-copy and batched ring paths, against a model and against the copying paths.

* A hypothesis state machine drives every producer path (try_push, loan/commit,
  push_batch, push_chunks) and every consumer path (poll, poll_into, peek/consume,
  drain_into) in random interleavings, with publish/release batching, and checks
  each record against a plain FIFO model.  Its invariant: a view handed out by
  peek() keeps its bytes until its space is released, and is unusable after.
* The C batch routines repeat the Python ring logic: the producer's must lay out
  the same bytes as try_push, the consumer's must return the same records and
  raise the same error as successive polls, on any bytes a hostile peer wrote.
"""

from __future__ import annotations

import random
import struct
from array import array
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shm.errors import RingCorruptError
from shm.layout import RingGeometry
from shm.memory import SharedBuffer
from shm.ring import Record, RingConsumer, RingProducer, record_span

CAP = 8192
MAXREC = 2048
TAIL_OFF, HEAD_OFF = 512, 640
GEOMETRY = RingGeometry(4096, CAP, TAIL_OFF, HEAD_OFF)
MASK = (1 << 64) - 1

kinds = st.integers(1, 0xFFFFFFFF)
lengths = st.one_of(st.integers(0, 40), st.integers(0, MAXREC))
# Start indices: anywhere in the first 2**40, plus just below 2**63 (free-running u64).
starts = st.one_of(st.integers(0, 1 << 37), st.integers((1 << 60) - CAP, 1 << 60)).map(
    lambda x: x * 8
)


def make(start: int = 0) -> tuple[SharedBuffer, RingProducer, RingConsumer]:
    mem = SharedBuffer(bytearray(4096 + CAP))
    mem.store_u64(TAIL_OFF, start)
    mem.store_u64(HEAD_OFF, start)
    return mem, RingProducer(mem, GEOMETRY, MAXREC, start), RingConsumer(mem, GEOMETRY, MAXREC, start)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fits(mem: SharedBuffer, tail: int, span: int) -> bool:
    """The producer's rule, from the head in shared memory: does a record of `span` fit at `tail`?"""
    used = (tail - mem.load_u64(HEAD_OFF)) & MASK
    to_end = CAP - tail % CAP
    need = span if span <= to_end else to_end + span
    return need <= CAP - used


def advance(tail: int, span: int) -> int:
    to_end = CAP - tail % CAP
    return tail + (span if span <= to_end else to_end + span)


def released(view: memoryview) -> bool:
    try:
        view.tobytes()
    except ValueError:
        return True
    return False


class RingModel(RuleBasedStateMachine):
    """Every path of both ends against a FIFO of (kind, payload)."""

    def __init__(self) -> None:
        super().__init__()
        self.mem, self.p, self.c = make()
        self.seed = 0
        self.pending: list[tuple[int, bytes]] = []
        self.published: deque[tuple[int, bytes]] = deque()
        self.peeked: list[tuple[memoryview, bytes]] = []  # views of the record at the head
        self.held: list[tuple[memoryview, bytes]] = []  # consumed, space not yet released

    def _next_payload(self, n: int) -> bytes:
        self.seed += 1
        return payload(self.seed, n)

    def _published(self, publish: bool) -> None:
        if publish:
            self.published.extend(self.pending)
            self.pending.clear()

    def _consumed(self, release: bool) -> tuple[int, bytes]:
        self.held.extend(self.peeked)
        self.peeked = []
        record = self.published.popleft()
        return record

    def _after_take(self, release: bool) -> None:
        if release:
            for view, _ in self.held:
                assert released(view)
            self.held = []

    @rule(kind=kinds, n=lengths, nparts=st.integers(1, 3), publish=st.booleans())
    def push_copy(self, kind: int, n: int, nparts: int, publish: bool) -> None:
        data = self._next_payload(n)
        cuts = sorted(random.Random(self.seed).randint(0, n) for _ in range(nparts - 1))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        expect = fits(self.mem, self.p.tail, record_span(n))
        assert self.p.try_push(kind, parts, publish=publish) is expect
        if expect:
            self.pending.append((kind, data))
        self._published(publish)

    @rule(kind=kinds, n=lengths, keep=st.floats(0, 1), publish=st.booleans())
    def push_loan(self, kind: int, n: int, keep: float, publish: bool) -> None:
        expect = fits(self.mem, self.p.tail, record_span(n))
        view = self.p.loan(n)
        assert (view is not None) is expect
        if view is None:
            self._published(True)  # a full ring publishes what was committed before
            return
        data = self._next_payload(n)
        view[:] = data
        m = int(n * keep)
        self.p.commit(kind, m, publish=publish)
        assert released(view)  # the loan ends at commit
        self.pending.append((kind, data[:m]))
        self._published(publish)

    @rule(kind=kinds, ns=st.lists(lengths, max_size=12), publish=st.booleans())
    def push_batch(self, kind: int, ns: list[int], publish: bool) -> None:
        datas = [self._next_payload(n) for n in ns]
        tail, expect = self.p.tail, 0
        for n in ns:
            if not fits(self.mem, tail, record_span(n)):
                break
            tail = advance(tail, record_span(n))
            expect += 1
        done, used = self.p.push_batch(kind, b"".join(datas) + b"spare", array("I", ns),
                                       publish=publish)
        assert (done, used, self.p.tail) == (expect, sum(ns[:expect]), tail)
        self.pending.extend((kind, d) for d in datas[:done])
        self._published(publish)

    @rule(kind=kinds, size=st.integers(0, 3 * MAXREC), chunk=st.integers(1, MAXREC),
          publish=st.booleans())
    def push_chunks(self, kind: int, size: int, chunk: int, publish: bool) -> None:
        data = self._next_payload(size)
        pieces = [data[i : i + chunk] for i in range(0, size, chunk)]
        tail, expect = self.p.tail, 0
        for piece in pieces:
            if not fits(self.mem, tail, record_span(len(piece))):
                break
            tail = advance(tail, record_span(len(piece)))
            expect += 1
        done, used = self.p.push_chunks(kind, data, chunk, publish=publish)
        assert (done, used) == (expect, sum(len(p) for p in pieces[:expect]))
        self.pending.extend((kind, p) for p in pieces[:done])
        self._published(publish)

    @rule()
    def publish(self) -> None:
        self.p.publish()
        self._published(True)

    @rule(release=st.booleans())
    def poll(self, release: bool) -> None:
        record = self.c.poll(release=release)
        if not self.published:
            assert record is None
        else:
            assert record == Record(*self._consumed(release))
        self._after_take(release)

    @rule(release=st.booleans(), offset=st.integers(0, 16))
    def poll_into(self, release: bool, offset: int) -> None:
        dst = bytearray(offset + MAXREC)
        got = self.c.poll_into(dst, offset, release=release)
        if not self.published:
            assert got is None
        else:
            kind, data = self._consumed(release)
            assert got == (kind, len(data))
            assert dst[offset : offset + len(data)] == data
        self._after_take(release)

    @rule(room=st.integers(0, 3 * MAXREC), slots=st.integers(0, 6), release=st.booleans())
    def drain(self, room: int, slots: int, release: bool) -> None:
        dst, meta = bytearray(room + 3), array("I", bytes(8 * slots))
        records, nbytes = self.c.drain_into(dst, meta, offset=3, release=release)
        expect, at = [], 3
        for kind, data in list(self.published)[:slots]:
            if at + len(data) > len(dst):
                break
            expect.append((kind, data))
            at += len(data)
        assert (records, nbytes) == (len(expect), at - 3)
        at = 3
        for i, (kind, data) in enumerate(expect):
            assert (meta[2 * i], meta[2 * i + 1]) == (kind, len(data))
            assert dst[at : at + len(data)] == data
            at += len(data)
            self._consumed(release)
        self._after_take(release)

    @rule()
    def peek(self) -> None:
        got = self.c.peek()
        for view, _ in self.peeked:  # a new peek of the same record ends the earlier views
            with pytest.raises(ValueError):
                view.tobytes()
        self.peeked.clear()
        if not self.published:
            assert got is None
            return
        kind, data = self.published[0]
        assert got is not None and got[0] == kind and got[1] == data
        assert got[1].readonly
        self.peeked.append((got[1], data))

    @precondition(lambda self: bool(self.peeked))
    @rule(release=st.booleans())
    def consume(self, release: bool) -> None:
        self.c.consume(release=release)
        self._consumed(release)
        self._after_take(release)

    @precondition(lambda self: not self.peeked)
    @rule()
    def consume_without_peek(self) -> None:
        with pytest.raises(RuntimeError):
            self.c.consume()

    @rule()
    def release(self) -> None:
        self.c.release()
        self._after_take(True)

    @invariant()
    def views_keep_their_bytes_until_released(self) -> None:
        for view, data in self.peeked + self.held:
            assert view.tobytes() == data

    @invariant()
    def indices_in_shared_memory_are_what_was_published_and_released(self) -> None:
        head = self.mem.load_u64(HEAD_OFF)
        assert 0 <= (self.p.tail - head) & MASK <= CAP
        assert 0 <= (self.c.head - head) & MASK <= CAP


RingModel.TestCase.settings = settings(
    max_examples=250, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingModel = RingModel.TestCase


# Python and C agree --------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(start=starts, lag=st.integers(0, CAP // 8), ns=st.lists(lengths, max_size=20), kind=kinds)
def test_push_batch_lays_out_the_same_bytes_as_try_push(start, lag, ns, kind):
    rings = []
    for _ in range(2):
        mem, p, _ = make(start)
        filler = lag * 8  # some space in use first, so wraps land anywhere
        while filler >= 8:
            n = min(filler - 8, 512)
            if not p.try_push(1, [bytes(n)]):
                break
            filler -= record_span(n)
        rings.append((mem, p))
    (mem_a, a), (mem_b, b) = rings
    data = [payload(i, n) for i, n in enumerate(ns)]
    done_a = 0
    for d in data:
        if not a.try_push(kind, [d]):
            break
        done_a += 1
    done_b, used = b.push_batch(kind, b"".join(data), ns)
    assert (done_b, used, b.tail) == (done_a, sum(ns[:done_a]), a.tail)
    assert mem_a.read(0, 4096 + CAP) == mem_b.read(0, 4096 + CAP)


def _hostile_ring(start: int, delta: int, script: list[tuple[int, int, int]]) -> SharedBuffer:
    """A ring whose bytes a hostile producer wrote: plausible records, pads and garbage."""
    mem, _, _ = make(start)
    pos = start % CAP
    for op, a, b in script:
        if op == 0:  # a record of some length, maybe too long
            length = a % (MAXREC + 64) if b % 5 else a
            kind = (b & 0xFFFFFFFF) or 1
            mem.put_header(4096 + pos, length, kind)
            pos = (pos + record_span(min(length, CAP))) % CAP
        elif op == 1:  # a pad, right or wrong
            to_end = CAP - pos
            length = to_end - 8 if a % 3 else a % CAP
            mem.put_header(4096 + pos, length, 0)
            pos = 0 if a % 3 else (pos + 8) % CAP
        else:  # 8 bytes of garbage anywhere aligned
            mem.put_header(4096 + (a % CAP) // 8 * 8, b & 0xFFFFFFFF, b >> 32)
    mem.store_u64(TAIL_OFF, (start + delta) & MASK)
    return mem


script_ops = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)),
    max_size=14,
)


@settings(max_examples=400, deadline=None)
@given(
    start=starts,
    delta=st.one_of(st.integers(0, CAP // 8).map(lambda x: x * 8), st.integers(0, 2 * CAP)),
    script=script_ops,
    slots=st.integers(1, 5),
    room=st.integers(MAXREC, 3 * MAXREC),
)
def test_drain_into_returns_what_polls_return_on_any_bytes(start, delta, script, slots, room):
    mem = _hostile_ring(start, delta, script)
    image = mem.read(0, 4096 + CAP)

    polled, poll_error = [], None
    a = RingConsumer(mem, GEOMETRY, MAXREC, start)
    try:
        while (record := a.poll()) is not None:
            polled.append(record)
    except RingCorruptError as exc:
        poll_error = str(exc)

    mem_b = SharedBuffer(bytearray(image))
    b = RingConsumer(mem_b, GEOMETRY, MAXREC, start)
    drained, drain_error = [], None
    dst, meta = bytearray(room), array("I", bytes(8 * slots))
    try:
        for _ in range(10_000):
            n, _nbytes = b.drain_into(dst, meta)
            if not n:
                break
            at = 0
            for i in range(n):
                kind, length = meta[2 * i], meta[2 * i + 1]
                drained.append(Record(kind, bytes(dst[at : at + length])))
                at += length
    except RingCorruptError as exc:
        drain_error = str(exc)

    assert drained == polled
    assert drain_error == poll_error
    assert b.head == a.head
    # Released space: the same, except that a drain which stopped at a bad header
    # may have stepped over, and so released, padding in front of it, where the
    # poll that finds the bad header raises before releasing that padding.
    released_a, released_b = mem.load_u64(HEAD_OFF), mem_b.load_u64(HEAD_OFF)
    assert released_a == released_b or (
        poll_error is not None and (released_b - released_a) & MASK <= (a.head - released_a) & MASK
    )


# Views and loans ---------------------------------------------------------------------
def test_a_view_is_never_overwritten_before_its_space_is_released():
    mem, p, c = make()
    n = 0
    while p.try_push(1, [payload(n, 1000)]):
        n += 1
    assert n >= 6
    while p.try_push(1, [b""]):  # fill the last bytes too
        pass
    views = []
    for i in range(5):
        got = c.peek()
        assert got is not None
        views.append((got[1], payload(i, 1000)))
        c.consume(release=False)
    # Five records consumed but not released: the producer must find no room at all.
    assert not p.try_push(1, [bytes(8)])
    assert p.loan(0) is None
    assert p.push_batch(1, bytes(8), [8]) == (0, 0)
    assert p.push_chunks(1, bytes(64), 8) == (0, 0)
    for view, data in views:
        assert view == data
    c.release()
    for view, _ in views:
        with pytest.raises(ValueError):
            view.tobytes()
    # Now the space is the producer's again, and it may overwrite it.
    while p.try_push(1, [b"\xff" * 1000]):
        pass
    assert mem.read(4096, 16) == struct.pack("<II", 1000, 1) + b"\xff" * 8


def test_a_view_of_an_unconsumed_record_survives_release():
    _, p, c = make()
    assert p.try_push(1, [b"first"]) and p.try_push(1, [b"second"])
    assert c.poll(release=False) == Record(1, b"first")
    got = c.peek()
    assert got is not None
    c.release()  # hands back "first" only
    assert got[1] == b"second"
    c.consume()
    with pytest.raises(ValueError):
        got[1].tobytes()


def test_a_poll_after_a_peek_consumes_the_peeked_record_once():
    _, p, c = make()
    for word in (b"one", b"two", b"three"):
        assert p.try_push(1, [word])
    assert c.peek() is not None
    assert c.poll() == Record(1, b"one")
    with pytest.raises(RuntimeError, match="nothing peeked"):
        c.consume()
    assert c.poll() == Record(1, b"two")


def test_poll_into_a_short_buffer_raises_and_consumes_nothing():
    _, p, c = make()
    assert p.try_push(9, [b"twelve bytes"])
    with pytest.raises(IndexError):
        c.poll_into(bytearray(11))
    buf = bytearray(20)
    assert c.poll_into(buf, 8) == (9, 12)
    assert buf[8:] == b"twelve bytes"


def test_a_loan_blocks_other_pushes_and_ends_at_commit():
    _, p, c = make()
    view = p.loan(10)
    assert view is not None
    with pytest.raises(RuntimeError):
        p.try_push(1, [b"x"])
    with pytest.raises(RuntimeError):
        p.push_chunks(1, b"x", 1)
    with pytest.raises(RuntimeError):
        p.loan(1)
    view[:4] = b"abcd"
    with pytest.raises(ValueError):
        p.commit(1, 11)
    with pytest.raises(ValueError):
        p.commit(0)
    p.commit(5, 4)
    assert released(view)
    with pytest.raises(RuntimeError):
        p.commit(1)
    assert c.poll() == Record(5, b"abcd")


def test_batches_refuse_bad_input_before_writing_anything():
    mem, p, _ = make()
    before = mem.read(0, 4096 + CAP)
    with pytest.raises(ValueError, match="max_record"):
        p.push_batch(1, bytes(MAXREC + 1), [MAXREC + 1])
    with pytest.raises(ValueError, match="more than the data"):
        p.push_batch(1, bytes(10), [5, 6])
    with pytest.raises(ValueError, match="reserved"):
        p.push_batch(0, bytes(10), [10])
    with pytest.raises(OverflowError):
        p.push_batch(1, bytes(10), [-1])
    with pytest.raises(ValueError):
        p.push_chunks(1, bytes(10), 0)
    with pytest.raises(ValueError):
        p.push_chunks(1, bytes(10), MAXREC + 1)
    assert mem.read(0, 4096 + CAP) == before
    assert p.push_chunks(1, b"", 8) == (0, 0)
    assert p.push_batch(1, b"", []) == (0, 0)


def test_batches_check_the_consumer_index_like_try_push():
    mem, p, _ = make(800)
    mem.store_u64(HEAD_OFF, 808)  # the consumer claims to be ahead of the producer
    with pytest.raises(RingCorruptError):
        p.push_batch(1, bytes(8), [8])
    with pytest.raises(RingCorruptError):
        p.push_chunks(1, bytes(8), 8)


def test_drain_into_takes_what_fits_and_leaves_the_rest():
    _, p, c = make()
    assert p.push_batch(3, b"aaabbbbcc", [3, 4, 2]) == (3, 9)
    meta = array("I", bytes(16))
    dst = bytearray(7)
    assert c.drain_into(dst, meta) == (2, 7)
    assert dst == b"aaabbbb" and list(meta) == [3, 3, 3, 4]
    assert c.drain_into(dst, meta, offset=6) == (0, 0)  # 2 bytes do not fit in 1
    with pytest.raises(ValueError):
        c.drain_into(dst, meta, offset=8)
    assert c.drain_into(dst, meta, offset=5) == (1, 2)
    assert c.drain_into(dst, meta) == (0, 0)
