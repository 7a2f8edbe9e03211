"""Lock-free single-producer single-consumer rings of variable-length records.

A ring is `capacity` bytes of data plus two free-running u64 byte indices in
the region header: the producer's tail and the consumer's head
(:mod:`shm.layout`).  Position = index % capacity.  Each record is::

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
``0 <= tail - head <= capacity``, 8-byte alignment, ``length <= max_record``,
the record inside the published span and inside the ring.  Anything else
raises :class:`RingCorruptError`; the ring must then be re-initialised.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from shm.errors import RingCorruptError
from shm.layout import RECORD_ALIGN, RECORD_HEADER_SIZE, RingGeometry
from shm.memory import Buffer, SharedBuffer

log = logging.getLogger(__name__)

PAD_KIND = 0
_MASK64 = (1 << 64) - 1
_HEADER = struct.Struct("<II")


def record_span(length: int) -> int:
    """Bytes a record with a payload of `length` bytes occupies in the ring."""
    return RECORD_HEADER_SIZE + ((length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1))


@dataclass(frozen=True, slots=True)
class Record:
    """A record copied out of a ring into private memory."""

    kind: int
    payload: bytes


class _RingEnd:
    __slots__ = ("_capacity", "_data", "_mem", "geometry", "max_record")

    def __init__(self, mem: SharedBuffer, geometry: RingGeometry, max_record: int) -> None:
        if geometry.capacity % 4096 or geometry.data_offset + geometry.capacity > mem.size:
            raise ValueError(f"ring geometry {geometry} does not fit a buffer of {mem.size} bytes")
        if not 0 < max_record <= geometry.capacity // 4:
            raise ValueError(f"max_record {max_record} must be in (0, capacity/4]")
        self._mem = mem
        self.geometry = geometry
        self._data = geometry.data_offset
        self._capacity = geometry.capacity
        self.max_record = max_record


class RingProducer(_RingEnd):
    """The writing end.  `start_index` is where this producer resumes."""

    __slots__ = ("_head_seen", "_loan", "_published", "_tail")

    def __init__(
        self, mem: SharedBuffer, geometry: RingGeometry, max_record: int, start_index: int = 0
    ) -> None:
        super().__init__(mem, geometry, max_record)
        if start_index % RECORD_ALIGN:
            raise ValueError("start index must be 8-byte aligned")
        self._tail = start_index & _MASK64
        self._published = self._tail
        self._head_seen = self._tail - self._capacity  # unknown yet: assume full
        self._loan: tuple[int, int] | None = None

    @property
    def tail(self) -> int:
        return self._tail

    def free_space(self) -> int:
        """Bytes free right now, reading the consumer's head once.

        Raises:
            RingCorruptError: the consumer's head is not within `capacity` behind our tail.
        """
        head = self._mem.load_u64(self.geometry.consumer_index_offset)
        used = (self._tail - head) & _MASK64
        if used > self._capacity:
            raise RingCorruptError(
                f"consumer index {head} is {used} bytes behind producer index {self._tail}, "
                f"more than the capacity {self._capacity}"
            )
        self._head_seen = head
        return self._capacity - used

    def _reserve(self, span: int) -> int | None:
        """Make room for `span` contiguous bytes; return their position or None if full."""
        pos = self._tail % self._capacity
        to_end = self._capacity - pos
        need = span if span <= to_end else to_end + span
        free = self._capacity - ((self._tail - self._head_seen) & _MASK64)
        if need > free:
            free = self.free_space()
            if need > free:
                return None
        if span > to_end:
            self._mem.write(self._data + pos, _HEADER.pack(to_end - RECORD_HEADER_SIZE, PAD_KIND))
            self._tail = (self._tail + to_end) & _MASK64
            pos = 0
        return pos

    def try_push(self, kind: int, parts: Sequence[Buffer], *, publish: bool = True) -> bool:
        """Append one record whose payload is the concatenation of `parts`.

        Returns False (writing nothing) when the ring has no room now.

        Raises:
            ValueError: `kind` is the padding kind or the payload exceeds max_record.
            RingCorruptError: the consumer's index is invalid.
        """
        length = sum(memoryview(p).nbytes for p in parts)
        if not 0 < kind <= 0xFFFFFFFF:
            raise ValueError(f"record kind {kind} is reserved or out of range")
        if length > self.max_record:
            raise ValueError(f"record of {length} bytes exceeds max_record {self.max_record}")
        if self._loan is not None:
            raise RuntimeError("a loan is outstanding; commit it first")
        span = record_span(length)
        pos = self._reserve(span)
        if pos is None:
            return False
        offset = self._data + pos
        self._mem.write(offset, _HEADER.pack(length, kind))
        offset += RECORD_HEADER_SIZE
        for part in parts:
            self._mem.write(offset, part)
            offset += memoryview(part).nbytes
        self._tail = (self._tail + span) & _MASK64
        if publish:
            self.publish()
        return True

    def loan(self, length: int) -> memoryview | None:
        """Zero-copy: a writable view of `length` payload bytes inside the ring, or None if full.

        Fill it, then :meth:`commit`.  Only one loan may be outstanding.

        Raises:
            ValueError: the length exceeds max_record.
        """
        if not 0 <= length <= self.max_record:
            raise ValueError(f"loan of {length} bytes exceeds max_record {self.max_record}")
        if self._loan is not None:
            raise RuntimeError("a loan is already outstanding")
        pos = self._reserve(record_span(length))
        if pos is None:
            return None
        self._loan = (pos, length)
        start = self._data + pos + RECORD_HEADER_SIZE
        return self._mem.view[start : start + length]

    def commit(self, kind: int, length: int | None = None, *, publish: bool = True) -> None:
        """Turn the outstanding loan into a record of `length` bytes (default: all of it)."""
        if self._loan is None:
            raise RuntimeError("no loan to commit")
        pos, loaned = self._loan
        length = loaned if length is None else length
        if not 0 <= length <= loaned:
            raise ValueError(f"committed length {length} exceeds the loan of {loaned}")
        if not 0 < kind <= 0xFFFFFFFF:
            raise ValueError(f"record kind {kind} is reserved or out of range")
        self._mem.write(self._data + pos, _HEADER.pack(length, kind))
        self._tail = (self._tail + record_span(length)) & _MASK64
        self._loan = None
        if publish:
            self.publish()

    def publish(self) -> None:
        """Make every record written so far visible to the consumer (one release store)."""
        if self._tail != self._published:
            self._mem.store_u64(self.geometry.producer_index_offset, self._tail)
            self._published = self._tail


class RingConsumer(_RingEnd):
    """The reading end.  `start_index` is where this consumer resumes."""

    __slots__ = ("_head", "_peeked", "_released", "_tail_seen")

    def __init__(
        self, mem: SharedBuffer, geometry: RingGeometry, max_record: int, start_index: int = 0
    ) -> None:
        super().__init__(mem, geometry, max_record)
        if start_index % RECORD_ALIGN:
            raise ValueError("start index must be 8-byte aligned")
        self._head = start_index & _MASK64
        self._released = self._head
        self._tail_seen = self._head
        self._peeked: int = 0

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
            used = (tail - self._head) & _MASK64
            if used > self._capacity or tail % RECORD_ALIGN:
                raise RingCorruptError(
                    f"producer index {tail} is not within the capacity {self._capacity} "
                    f"ahead of consumer index {self._head} (or is misaligned)"
                )
            self._tail_seen = tail
        return (self._tail_seen - self._head) & _MASK64

    def _next(self) -> tuple[int, int, int] | None:
        """Validate the next record header; return (kind, payload offset, length) or None."""
        while True:
            available = self.available()
            if available == 0:
                return None
            pos = self._head % self._capacity
            length, kind = _HEADER.unpack(self._mem.read(self._data + pos, RECORD_HEADER_SIZE))
            if kind == PAD_KIND:
                to_end = self._capacity - pos
                if length != to_end - RECORD_HEADER_SIZE or available < to_end:
                    raise RingCorruptError(
                        f"padding record of {length} bytes at {pos} does not end the ring"
                    )
                self._head = (self._head + to_end) & _MASK64
                continue
            span = record_span(length)
            if length > self.max_record or span > available or pos + span > self._capacity:
                raise RingCorruptError(
                    f"record of kind {kind} claims {length} bytes at position {pos} with "
                    f"{available} published (max_record {self.max_record})"
                )
            return kind, self._data + pos + RECORD_HEADER_SIZE, length

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
        self._head = (self._head + record_span(length)) & _MASK64
        if release:
            self.release()
        return Record(kind, payload)

    def peek(self) -> tuple[int, memoryview] | None:
        """Zero-copy: (kind, read-only view of the payload inside the ring), or None.

        The view stays valid until :meth:`consume` is called; then release it.
        A peer can rewrite the bytes under a view at any time: copy what must
        be validated before validating it.

        Raises:
            RingCorruptError: the producer wrote an invalid index or record header.
        """
        found = self._next()
        if found is None:
            return None
        kind, offset, length = found
        self._peeked = record_span(length)
        return kind, self._mem.view[offset : offset + length].toreadonly()

    def consume(self, *, release: bool = True) -> None:
        """Step over the record returned by the last :meth:`peek`."""
        if not self._peeked:
            raise RuntimeError("nothing peeked")
        self._head = (self._head + self._peeked) & _MASK64
        self._peeked = 0
        if release:
            self.release()

    def release(self) -> None:
        """Hand consumed space back to the producer (one release store)."""
        if self._head != self._released:
            self._mem.store_u64(self.geometry.consumer_index_offset, self._head)
            self._released = self._head
