"""Moving messages between a channel and a pair of ring ends.

Duck-typed over the ring API (``poll`` / ``try_push`` / ``publish`` /
``release``) so that this module stays free of shared memory and cffi; both
the broker and the guest driver use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from protocol.messages import Kind, Message, decode, encode


class RecordLike(Protocol):
    @property
    def kind(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


class RecordSource(Protocol):
    def poll(self, *, release: bool = True) -> RecordLike | None: ...
    def release(self) -> None: ...


class PeekingSource(RecordSource, Protocol):
    def peek(self) -> tuple[int, memoryview] | None: ...
    def consume(self, *, release: bool = True) -> None: ...


class RecordSink(Protocol):
    def try_push(
        self, kind: int, parts: Sequence[bytes | bytearray | memoryview], *, publish: bool = True
    ) -> bool: ...
    def publish(self) -> None: ...


class Outgoing(Protocol):
    def next_output(self) -> Message | None: ...


def drain(
    source: RecordSource,
    deliver: Callable[[Message], None],
    *,
    max_records: int,
    max_bytes: int | None = None,
    gate: Callable[[], bool] | None = None,
) -> int:
    """Decode and deliver up to `max_records` records, stopping once `max_bytes` of
    payload have been taken (if given); returns how many.

    `gate` is the channel's flow control: no record is taken while it says
    False (records then wait in the ring, where they apply backpressure).
    Space is handed back to the producer once, at the end (batching).

    Raises:
        RingCorruptError: from the ring, when the peer's indices or headers are invalid.
        RemoteProtocolError: a record does not decode, or `deliver` rejects it.
    """
    count = 0
    taken = 0
    try:
        while (count < max_records and (max_bytes is None or taken < max_bytes)
               and (gate is None or gate())):
            record = source.poll(release=False)
            if record is None:
                break
            count += 1
            taken += len(record.payload)
            deliver(decode(record.kind, record.payload))
    finally:
        source.release()
    return count


def drain_views(
    source: PeekingSource, deliver: Callable[[Message], None], *, max_records: int, max_bytes: int
) -> int:
    """Like :func:`drain`, but a file chunk's data is handed over as a view into the ring:
    `deliver` must be done with it when it returns (the record is consumed right after).

    The receiving end of a file stream writes and hashes chunks straight from
    the ring this way, without copying them first.  Other records are copied
    out as usual.  Space is handed back once, at the end.  `max_bytes` bounds the
    payload taken in one call (writing it may take a while on a slow disk).

    Raises:
        RingCorruptError: from the ring, when the peer's indices or headers are invalid.
        RemoteProtocolError: a record does not decode, or `deliver` rejects it.
    """
    count = 0
    taken = 0
    try:
        while count < max_records and taken < max_bytes:
            found = source.peek()
            if found is None:
                break
            kind, view = found
            count += 1
            taken += view.nbytes
            deliver(decode(kind, view if kind == Kind.FILE_CHUNK else bytes(view)))
            source.consume(release=False)
    finally:
        source.release()
    return count


def flush(sink: RecordSink, channel: Outgoing, done: Callable[[], None], *, max_records: int) -> int:
    """Push the channel's pending messages while the ring has room; publish once.

    `done` is called after each message is in the ring.  Returns how many were pushed.

    Raises:
        RingCorruptError: the consumer's index is invalid.
    """
    count = 0
    try:
        while count < max_records:
            message = channel.next_output()
            if message is None:
                break
            kind, parts = encode(message)
            if not sink.try_push(kind, parts, publish=False):
                break
            done()
            count += 1
    finally:
        sink.publish()
    return count
