"""Lock-free single-producer single-consumer rings of variable-length records.

A ring is `capacity` bytes of data plus two free-running u64 byte indices in
the region header: the producer's tail and the consumer's head
(:mod:`shm.layout`), both modulo :func:`ring_wrap` (the largest multiple of the
capacity below 2**64, so that positions stay continuous when an index wraps).
Position = index % capacity.  Each record is::

    u32 length    payload length in bytes
    u32 kind      0 = padding to the end of the ring; any other value is the caller's
    payload       `length` bytes, then zero to seven bytes of padding to 8-byte alignment

A record never wraps: when it does not fit before the end, the producer writes
a padding record that fills the rest and starts the record at position 0.  So
every record is one contiguous span, which is what makes zero-copy views
possible.

Ordering: the producer writes a record, then release-stores the tail; the
consumer acquire-loads the tail, then reads.  The consumer copies, then
release-stores the head; the producer acquire-loads the head before reusing
space.

Trust: each side keeps its own index privately and never reads it back from
shared memory.  What it reads of the peer (the peer's index, a record header)
is read once into private memory and validated before use:
``tail < wrap``, ``0 <= (tail - head) mod wrap <= capacity``, 8-byte alignment, ``length <= max_record``,
the record inside the published span and inside the ring.  Anything else
raises :class:`RingCorruptError`; the ring must then be re-initialised.

Three ways through, on each side, all over the same records:

* copying: :meth:`RingProducer.try_push` and :meth:`RingConsumer.poll` /
  :meth:`RingConsumer.poll_into`, one record per call;
* zero-copy: :meth:`RingProducer.loan` + :meth:`RingProducer.commit` hands
  out a writable view into the ring; :meth:`RingConsumer.peek` +
  :meth:`RingConsumer.consume` a read-only one.  A consumer's view stays
  valid, and is never overwritten, until its space is handed back
  (:meth:`RingConsumer.release`, or ``release=True``); then it is released
  and using it raises ValueError;
* batched: :meth:`RingProducer.push_batch` / :meth:`RingProducer.push_chunks`
  write many records and publish once; :meth:`RingConsumer.drain_into` copies
  out every record available into one buffer and releases once.  They run in
  C (``ivc_ring_put`` / ``ivc_ring_get`` in shm/_c_build.py), which repeats
  the logic and the checks of this module exactly; Python still reads and
  validates the peer's index.

Batching on the other paths: ``publish=False`` / ``release=False`` and one
:meth:`RingProducer.publish` / :meth:`RingConsumer.release` at the end.
"""


from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from shm.errors import RingCorruptError
from shm.layout import RECORD_ALIGN, RECORD_HEADER_SIZE, RingGeometry
from shm.memory import Buffer, MetaBuffer, SharedBuffer, lengths_array

log = logging.getLogger(__name__)

PAD_KIND = 0
_MASK64 = (1 << 64) - 1
_MASK32 = 0xFFFFFFFF
_HEADER_SIZE = RECORD_HEADER_SIZE
_ALIGN_MASK = RECORD_ALIGN - 1


def record_span(length: int) -> int:
    """Bytes a record with a payload of `length` bytes occupies in the ring."""
    return RECORD_HEADER_SIZE + ((length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1))


@dataclass(frozen=True, slots=True)
class Record:
    """A record copied out of a ring into private memory."""

    kind: int
    payload: bytes


def ring_wrap(capacity: int) -> int:
    """The modulus of a ring's free-running indices: the largest multiple of `capacity` below 2**64."""
    return _MASK64 // capacity * capacity


def _check_kind(kind: int) -> None:
    if not 0 < kind <= _MASK32:
        raise ValueError(f"record kind {kind} is reserved or out of range")


def _release_views(views: list[memoryview]) -> None:
    for view in views:
        with contextlib.suppress(BufferError):  # still exported (numpy, cffi): cannot revoke
            view.release()
    views.clear()


class _RingEnd:
    __slots__ = ("_capacity", "_data", "_mem", "_wrap", "geometry", "max_record")

    def __init__(self, mem: SharedBuffer, geometry: RingGeometry, max_record: int) -> None:
        if geometry.capacity % 4096 or geometry.data_offset + geometry.capacity > mem.size:
            raise ValueError(f"ring geometry {geometry} does not fit a buffer of {mem.size} bytes")
        if not 0 < max_record <= geometry.capacity // 4:
            raise ValueError(f"max_record {max_record} must be in (0, capacity/4]")
        self._mem = mem
        self.geometry = geometry
        self._data = geometry.data_offset
        self._capacity = geometry.capacity
        # Indices run modulo the largest multiple of the capacity that fits in a u64,
        # not modulo 2**64: a capacity that does not divide 2**64 would otherwise make
        # the position jump when an index wraps.
        self._wrap = ring_wrap(geometry.capacity)
        self.max_record = max_record


class RingProducer(_RingEnd):
    """The writing end.  `start_index` is where this producer resumes."""

    __slots__ = ("_head_seen", "_loan", "_loan_view", "_published", "_tail")

    def __init__(
        self, mem: SharedBuffer, geometry: RingGeometry, max_record: int, start_index: int = 0
    ) -> None:
        super().__init__(mem, geometry, max_record)
        if start_index % RECORD_ALIGN:
            raise ValueError("start index must be 8-byte aligned")
        self._tail = start_index % self._wrap
        self._published = self._tail
        # Unknown yet: assume full, so that the first push reads the real head.
        self._head_seen = (self._tail - self._capacity) % self._wrap
        self._loan: tuple[int, int] | None = None
        self._loan_view: memoryview | None = None

    @property
    def tail(self) -> int:
        return self._tail

    def free_space(self) -> int:
        """Bytes free right now, reading the consumer's head once.

        Raises:
            RingCorruptError: the consumer's head is not within `capacity` behind our tail.
        """
        head = self._mem.load_u64(self.geometry.consumer_index_offset)
        used = (self._tail - head) % self._wrap
        if used > self._capacity or head >= self._wrap:
            raise RingCorruptError(
                f"consumer index {head} is {used} bytes behind producer index {self._tail}, "
                f"more than the capacity {self._capacity}"
            )
        self._head_seen = head
        return self._capacity - used

    def _reserve(self, span: int) -> int | None:
        """Make room for `span` contiguous bytes; return their position or None if full.

        Mirrored by ivc_ring_put in shm/_c_build.py: change both together.
        """
        pos = self._tail % self._capacity
        to_end = self._capacity - pos
        need = span if span <= to_end else to_end + span
        free = self._capacity - ((self._tail - self._head_seen) % self._wrap)
        if need > free:
            free = self.free_space()
            if need > free:
                return None
        if span > to_end:
            self._mem.put_header(self._data + pos, to_end - _HEADER_SIZE, PAD_KIND)
            self._tail = (self._tail + to_end) % self._wrap
            pos = 0
        return pos

    def try_push(self, kind: int, parts: Sequence[Buffer], *, publish: bool = True) -> bool:
        """Append one record whose payload is the concatenation of `parts`.

        Returns False (writing nothing) when the ring has no room now; with
        `publish`, the records written before are published then, so that a
        producer waiting for room never waits on records the consumer cannot see.

        Raises:
            ValueError: `kind` is the padding kind or the payload exceeds max_record.
            RuntimeError: a loan is outstanding.
            RingCorruptError: the consumer's index is invalid.
        """
        if len(parts) == 1:
            length = memoryview(parts[0]).nbytes
        else:
            length = sum([memoryview(p).nbytes for p in parts])
        if not 0 < kind <= _MASK32:
            raise ValueError(f"record kind {kind} is reserved or out of range")
        if length > self.max_record:
            raise ValueError(f"record of {length} bytes exceeds max_record {self.max_record}")
        if self._loan is not None:
            raise RuntimeError("a loan is outstanding; commit it first")
        span = _HEADER_SIZE + ((length + _ALIGN_MASK) & ~_ALIGN_MASK)
        pos = self._reserve(span)
        if pos is None:
            if publish:
                self.publish()
            return False
        self._mem.put_record(self._data + pos, kind, length, parts)
        tail = self._tail = (self._tail + span) % self._wrap
        if publish and tail != self._published:
            self._mem.store_u64(self.geometry.producer_index_offset, tail)
            self._published = tail
        return True

    def push_batch(
        self, kind: int, data: Buffer, lengths: Sequence[int] | Buffer, *, publish: bool = True
    ) -> tuple[int, int]:
        """Append records whose payloads are consecutive slices of `data`, `lengths` long.

        As many as fit now, in order, in one C call (two when the consumer's
        head must be re-read).  Returns (records written, bytes of `data` used).

        Raises:
            ValueError: a bad kind, a length over max_record, or lengths longer than `data`.
            OverflowError: a negative length.
            RuntimeError: a loan is outstanding.
            RingCorruptError: the consumer's index is invalid.
        """
        _check_kind(kind)
        array, count, largest, total = lengths_array(lengths)
        if largest > self.max_record:
            raise ValueError(f"record of {largest} bytes exceeds max_record {self.max_record}")
        if total > memoryview(data).nbytes:
            raise ValueError(f"lengths add up to {total} bytes, more than the data holds")
        return self._put(kind, data, array, 0, count, publish)

    def push_chunks(
        self, kind: int, data: Buffer, chunk: int, *, publish: bool = True
    ) -> tuple[int, int]:
        """Append `data` cut into records of `chunk` bytes (the last one shorter).

        Like :meth:`push_batch`: as many as fit now; returns (records, bytes used).

        Raises:
            ValueError: a bad kind, or `chunk` not in (0, max_record].
            RuntimeError: a loan is outstanding.
            RingCorruptError: the consumer's index is invalid.
        """
        _check_kind(kind)
        if not 0 < chunk <= self.max_record:
            raise ValueError(f"chunk of {chunk} bytes must be in (0, {self.max_record}]")
        size = memoryview(data).nbytes
        return self._put(kind, data, None, chunk, -(-size // chunk), publish)

    def _put(
        self, kind: int, data: Buffer, array: object, each: int, count: int, publish: bool
    ) -> tuple[int, int]:
        if self._loan is not None:
            raise RuntimeError("a loan is outstanding; commit it first")
        done = used = 0
        for attempt in range(2):
            if done == count:
                break
            if attempt:  # stopped short: the consumer may have made room since
                head_before = self._head_seen
                self.free_space()
                if self._head_seen == head_before:
                    break
            source: Buffer = data if not used else memoryview(data).cast("B")[used:]
            rest = None if array is None else array + done  # type: ignore[operator]
            n, self._tail, took = self._mem.put_records(
                self._data, self._capacity, self._tail, self._head_seen, kind,
                source, rest, each, count - done,
            )
            done += n
            used += took
        if publish:
            self.publish()
        return done, used

    def loan(self, length: int) -> memoryview | None:
        """Zero-copy: a writable view of `length` payload bytes inside the ring, or None if full.

        Fill it, then :meth:`commit`.  Only one loan may be outstanding; the
        view is released by commit.  When the ring is full, the records
        committed without publishing are published, so that a producer waiting
        for room never waits on records the consumer cannot see.

        Raises:
            ValueError: the length exceeds max_record.
            RuntimeError: a loan is already outstanding.
            RingCorruptError: the consumer's index is invalid.
        """
        if not 0 <= length <= self.max_record:
            raise ValueError(f"loan of {length} bytes exceeds max_record {self.max_record}")
        if self._loan is not None:
            raise RuntimeError("a loan is already outstanding")
        pos = self._reserve(record_span(length))
        if pos is None:
            self.publish()
            return None
        self._loan = (pos, length)
        start = self._data + pos + _HEADER_SIZE
        view = self._mem.view[start : start + length]
        self._loan_view = view
        return view

    def commit(self, kind: int, length: int | None = None, *, publish: bool = True) -> None:
        """Turn the outstanding loan into a record of `length` bytes (default: all of it).

        Raises:
            RuntimeError: there is no loan.
            ValueError: a bad kind, or `length` beyond the loan.
        """
        if self._loan is None:
            raise RuntimeError("no loan to commit")
        pos, loaned = self._loan
        length = loaned if length is None else length
        if not 0 <= length <= loaned:
            raise ValueError(f"committed length {length} exceeds the loan of {loaned}")
        _check_kind(kind)
        self._mem.put_header(self._data + pos, length, kind)
        self._tail = (self._tail + record_span(length)) % self._wrap
        self._loan = None
        if self._loan_view is not None:
            _release_views([self._loan_view])
            self._loan_view = None
        if publish:
            self.publish()

    def publish(self) -> None:
        """Make every record written so far visible to the consumer (one release store)."""
        if self._tail != self._published:
            self._mem.store_u64(self.geometry.producer_index_offset, self._tail)
            self._published = self._tail


class RingConsumer(_RingEnd):
    """The reading end.  `start_index` is where this consumer resumes."""

    __slots__ = ("_head", "_held", "_peeked", "_released", "_tail_seen", "_unconsumed")

    def __init__(
        self, mem: SharedBuffer, geometry: RingGeometry, max_record: int, start_index: int = 0
    ) -> None:
        super().__init__(mem, geometry, max_record)
        if start_index % RECORD_ALIGN:
            raise ValueError("start index must be 8-byte aligned")
        self._head = start_index % self._wrap
        self._released = self._head
        self._tail_seen = self._head
        self._peeked: int = 0
        # Views handed out by peek(): of the record not yet consumed, and of
        # consumed records whose space is not yet released.
        self._unconsumed: list[memoryview] = []
        self._held: list[memoryview] = []

    @property
    def head(self) -> int:
        return self._head

    def available(self) -> int:
        """Bytes published and not yet consumed; reads the producer's tail only when needed.

        Raises:
            RingCorruptError: the producer's tail is misaligned or out of range.
        """
        if self._head == self._tail_seen:
            tail = self._mem.load_u64(self.geometry.producer_index_offset)
            used = (tail - self._head) % self._wrap
            if used > self._capacity or tail % RECORD_ALIGN or tail >= self._wrap:
                raise RingCorruptError(
                    f"producer index {tail} is not within the capacity {self._capacity} "
                    f"ahead of consumer index {self._head} (or is misaligned)"
                )
            self._tail_seen = tail
        return (self._tail_seen - self._head) % self._wrap

    def _next(self) -> tuple[int, int, int] | None:
        """Validate the next record header; return (kind, payload offset, length) or None.

        Mirrored by ivc_ring_get in shm/_c_build.py: change both together.
        """
        while True:
            available = self.available()
            if available == 0:
                return None
            pos = self._head % self._capacity
            # The header is read once, as one 64-bit load, into a Python int.
            header = self._mem.load_u64(self._data + pos)
            length = header & _MASK32
            kind = header >> 32
            if kind == PAD_KIND:
                to_end = self._capacity - pos
                if length != to_end - _HEADER_SIZE or available < to_end:
                    raise RingCorruptError(
                        f"padding record of {length} bytes at {pos} does not end the ring"
                    )
                self._head = (self._head + to_end) % self._wrap
                continue
            span = _HEADER_SIZE + ((length + _ALIGN_MASK) & ~_ALIGN_MASK)
            if length > self.max_record or span > available or pos + span > self._capacity:
                raise _bad_record(kind, length, pos, available, self.max_record)
            return kind, self._data + pos + _HEADER_SIZE, length

    def _step(self, span: int) -> None:
        """Consume `span` bytes at the head (the record found by _next)."""
        self._head = (self._head + span) % self._wrap
        self._peeked = 0
        if self._unconsumed:  # the peeked record is consumed: its views wait for release
            self._held.extend(self._unconsumed)
            self._unconsumed.clear()

    def poll(self, *, release: bool = True) -> Record | None:
        """Copy the next record out of the ring, or return None when it is empty.

        Raises:
            RingCorruptError: the producer wrote an invalid index or record header.
        """
        found = self._next()
        if found is None:
            if release:
                self.release()
            return None
        kind, offset, length = found
        payload = self._mem.read(offset, length)
        self._step(record_span(length))
        if release:
            self.release()
        return Record(kind, payload)

    def poll_into(
        self, dst: Buffer, offset: int = 0, *, release: bool = True
    ) -> tuple[int, int] | None:
        """Copy the next record's payload into `dst` at `offset`; return (kind, length) or None.

        Raises:
            ValueError: the payload does not fit in `dst` after `offset` (nothing is consumed).
            RingCorruptError: the producer wrote an invalid index or record header.
        """
        found = self._next()
        if found is None:
            if release:
                self.release()
            return None
        kind, at, length = found
        self._mem.read_into(at, dst, offset, length)
        self._step(_HEADER_SIZE + ((length + _ALIGN_MASK) & ~_ALIGN_MASK))
        if release:
            self.release()
        return kind, length

    def drain_into(
        self, dst: Buffer, meta: MetaBuffer, *, offset: int = 0, release: bool = True
    ) -> tuple[int, int]:
        """Copy out every record available, payloads back to back in `dst` from `offset`.

        `meta` is a writable uint32 buffer (``array('I')``, say) that receives
        (kind, length) per record, so it bounds the records taken, as the room
        in `dst` does.  Reads the producer's tail again when it has caught up,
        so one call drains all that was published by the time it returns.
        Space is released once, at the end.  Returns (records, bytes).

        A record that would not fit in what is left of `dst` stays in the ring:
        a `dst` smaller than max_record can stall the drain.

        Raises:
            RingCorruptError: the producer wrote an invalid index or record header
                before any record was taken (one found later is raised by the
                next call, exactly as successive polls would).
            ValueError: `offset` lies outside `dst`.
        """
        records = nbytes = 0
        while self.available():
            status, head, n, used, bad = self._mem.get_records(
                self._data, self._capacity, self.max_record, self._head, self._tail_seen,
                dst, offset + nbytes, meta, records,
            )
            moved = head != self._head
            if moved:
                self._step((head - self._head) % self._wrap)
            records += n
            nbytes += used
            if status:
                if records:
                    break
                pos, length, kind = bad
                if kind == PAD_KIND:
                    raise RingCorruptError(
                        f"padding record of {length} bytes at {pos} does not end the ring"
                    )
                raise _bad_record(
                    kind, length, pos, (self._tail_seen - self._head) % self._wrap,
                    self.max_record,
                )
            if self._head != self._tail_seen or not moved:
                break  # dst or meta is full
        if release:  # not when raising: a failed poll() does not release either
            self.release()
        return records, nbytes

    def peek(self) -> tuple[int, memoryview] | None:
        """Zero-copy: (kind, read-only view of the payload inside the ring), or None.

        The view stays valid, and the producer cannot overwrite it, until its
        space is handed back: :meth:`consume` with ``release=True``, or
        :meth:`release` after ``consume(release=False)``.  Then the view is
        released (using it raises ValueError; slices taken from it are not
        tracked).  A peer can rewrite the bytes under a view at any time: copy
        what must be validated before validating it.

        Peeking again without consuming looks at the same record afresh and ends
        the views the previous peek returned (a reader that waits for room
        elsewhere may peek the same record every round: its views must not pile up).

        Raises:
            RingCorruptError: the producer wrote an invalid index or record header.
        """
        if self._unconsumed:
            _release_views(self._unconsumed)
        found = self._next()
        if found is None:
            return None
        kind, offset, length = found
        self._peeked = record_span(length)
        view = self._mem.view[offset : offset + length].toreadonly()
        self._unconsumed.append(view)
        return kind, view

    def consume(self, *, release: bool = True) -> None:
        """Step over the record returned by the last :meth:`peek`.

        Raises:
            RuntimeError: nothing was peeked since the last step.
        """
        if not self._peeked:
            raise RuntimeError("nothing peeked")
        self._step(self._peeked)
        if release:
            self.release()

    def release(self) -> None:
        """Hand consumed space back to the producer (one release store); views into it end."""
        if self._held:
            _release_views(self._held)
        if self._head != self._released:
            self._mem.store_u64(self.geometry.consumer_index_offset, self._head)
            self._released = self._head


def _bad_record(kind: int, length: int, pos: int, available: int, max_record: int) -> RingCorruptError:
    return RingCorruptError(
        f"record of kind {kind} claims {length} bytes at position {pos} with "
        f"{available} published (max_record {max_record})"
    )
