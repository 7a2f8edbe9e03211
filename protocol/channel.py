"""Sans-IO state machines for the two ends of one VM's channel.

:class:`HostChannel` is the broker's view of one VM; :class:`GuestChannel` is
the guest driver's view of the broker.  Both take decoded messages in
(``receive``), hand messages out (``next_output`` / ``output_done``), report
what happened as events, and read the time only when it is passed in.

The broker's authority lives here: a VM's data is accepted only while a copy
gesture for that VM is in flight (state AWAIT_COPY / RECEIVING_COPY, with the
transfer id the broker drew), and a VM is sent content only by
:meth:`HostChannel.start_paste`.  Everything else a guest sends is either
dropped and counted (well-formed but unasked) or a protocol error (malformed,
or contradicting the transfer it claims to belong to) that makes the broker
mark the VM faulty.

Transitions are one table per side, keyed by (state, message type); a pair
missing from the table is an unsolicited message.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import (
    Cancel,
    CopyRequest,
    DataBegin,
    DataChunk,
    DataEnd,
    Message,
    RefusedBecause,
    Status,
    StatusCode,
)

CAP_COPY_FROM = 1 << 0
"""Capability bit: the broker accepts this VM's clipboard now (a copy gesture for it)."""
CAP_PASTE_TO = 1 << 1
"""Capability bit: the broker is handing the global clipboard to this VM (a paste gesture)."""


class FailReason(enum.Enum):
    EMPTY = "the clipboard is empty"
    TOO_LARGE = "the content is over the size limit"
    TIMEOUT = "no answer in time"
    REFUSED = "the receiver refused the content"
    BUSY = "the VM is busy with another transfer"
    CANCELLED = "the transfer was cancelled"
    DETACHED = "the VM's driver detached"


# Events --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CopyCompleted:
    transfer_id: int
    data: bytearray


@dataclass(frozen=True, slots=True)
class CopyFailed:
    transfer_id: int
    reason: FailReason
    size: int = 0


@dataclass(frozen=True, slots=True)
class PasteCompleted:
    transfer_id: int
    size: int


@dataclass(frozen=True, slots=True)
class PasteFailed:
    transfer_id: int
    reason: FailReason
    size: int = 0
    because: RefusedBecause = RefusedBecause.UNSPECIFIED
    """Why the receiver refused (REFUSED only)."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """A well-formed message nobody asked for; the broker counts these."""

    message: Message


@dataclass(frozen=True, slots=True)
class CopyRequested:
    transfer_id: int
    limit: int


@dataclass(frozen=True, slots=True)
class PasteReceived:
    transfer_id: int
    data: bytearray


HostEvent = CopyCompleted | CopyFailed | PasteCompleted | PasteFailed | Dropped
GuestEvent = CopyRequested | PasteReceived | Dropped


# Shared machinery ----------------------------------------------------------
class _Outbox:
    """Messages waiting for ring space; a content stream is chunked lazily."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        self.chunk_size = chunk_size
        self._queue: deque[Message] = deque()
        self._stream: tuple[int, memoryview, int] | None = None  # id, data, next offset
        self._stream_done = True
        self._current: Message | None = None

    def send(self, message: Message) -> None:
        self._queue.append(message)

    def stream(self, transfer_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue DataBegin, the chunks and DataEnd for `data` (not copied)."""
        view = memoryview(data).cast("B")
        self._queue.append(DataBegin(transfer_id, view.nbytes))
        self._stream = (transfer_id, view, 0)
        self._stream_done = False

    def next(self) -> Message | None:
        if self._current is None:
            self._current = self._produce()
        return self._current

    def done(self) -> None:
        self._current = None

    def _produce(self) -> Message | None:
        if self._queue:
            return self._queue.popleft()
        if self._stream is None:
            return None
        transfer_id, view, offset = self._stream
        if offset < view.nbytes:
            end = min(offset + self.chunk_size, view.nbytes)
            self._stream = (transfer_id, view, end)
            return DataChunk(transfer_id, offset, view[offset:end])
        self._stream = None
        self._stream_done = True
        view.release()
        return DataEnd(transfer_id)

    @property
    def drained(self) -> bool:
        """Everything queued has been handed to the transport."""
        return self._current is None and not self._queue and self._stream is None

    def clear(self) -> None:
        self._queue.clear()
        self._current = None
        if self._stream is not None:
            self._stream[1].release()
        self._stream = None


class _Inbox:
    """Assembles one incoming transfer into a buffer preallocated to its declared size."""

    def __init__(self, transfer_id: int, total: int) -> None:
        self.transfer_id = transfer_id
        self.total = total
        self.buffer = bytearray(total)
        self.received = 0

    def add(self, chunk: DataChunk) -> None:
        size = len(chunk.data)
        if chunk.offset != self.received or self.received + size > self.total:
            raise RemoteProtocolError(
                f"chunk at offset {chunk.offset} of {size} bytes does not follow "
                f"{self.received} of {self.total} bytes received"
            )
        self.buffer[self.received : self.received + size] = chunk.data
        self.received += size

    def finish(self) -> bytearray:
        if self.received != self.total:
            raise RemoteProtocolError(
                f"transfer ended after {self.received} of {self.total} declared bytes"
            )
        return self.buffer

    def wipe(self) -> None:
        self.buffer[:] = bytes(len(self.buffer))
        self.buffer = bytearray()


# Host side -----------------------------------------------------------------
class HostState(enum.Enum):
    IDLE = "idle"
    AWAIT_COPY = "awaiting copy answer"
    RECEIVING_COPY = "receiving copy"
    SENDING_PASTE = "sending paste"


class HostChannel:
    """The broker's end of one VM's channel."""

    def __init__(self, *, chunk_size: int, timeout_s: float, max_transfer_s: float = 120.0) -> None:
        self.state = HostState.IDLE
        self.timeout_s = timeout_s
        self.max_transfer_s = max_transfer_s
        self._out = _Outbox(chunk_size)
        self._transfer_id = 0
        self._limit = 0
        self._paste_size = 0
        self._inbox: _Inbox | None = None
        self._deadline = 0.0
        self._hard_deadline = 0.0

    # Commands from the broker ---------------------------------------------
    @property
    def capabilities(self) -> int:
        if self.state in (HostState.AWAIT_COPY, HostState.RECEIVING_COPY):
            return CAP_COPY_FROM
        if self.state is HostState.SENDING_PASTE:
            return CAP_PASTE_TO
        return 0

    @property
    def transfer_id(self) -> int:
        return self._transfer_id

    def start_copy(self, transfer_id: int, limit: int, now: float) -> None:
        """Ask the VM for its clipboard (a copy gesture).

        Raises:
            LocalProtocolError: a transfer is already in flight on this channel.
        """
        self._require_idle()
        request = CopyRequest(transfer_id, limit)  # validates before any state changes
        self._begin(transfer_id, now)
        self._limit = limit
        self.state = HostState.AWAIT_COPY
        self._out.send(request)

    def start_paste(self, transfer_id: int, data: bytes | bytearray, now: float) -> None:
        """Hand `data` to the VM (a paste gesture).  `data` is not copied: keep it
        unchanged until the PasteCompleted or PasteFailed event.

        Raises:
            LocalProtocolError: a transfer is already in flight on this channel.
        """
        self._require_idle()
        DataBegin(transfer_id, len(data))  # validates before any state changes
        self._begin(transfer_id, now)
        self._paste_size = len(data)
        self.state = HostState.SENDING_PASTE
        self._out.stream(transfer_id, data)

    def abort(self, reason: FailReason) -> list[HostEvent]:
        """Drop whatever is in flight (driver detached, VM faulty, shutdown)."""
        events: list[HostEvent] = []
        if self.state in (HostState.AWAIT_COPY, HostState.RECEIVING_COPY):
            events.append(CopyFailed(self._transfer_id, reason))
        elif self.state is HostState.SENDING_PASTE:
            events.append(PasteFailed(self._transfer_id, reason, self._paste_size))
        self._to_idle()
        return events

    def _require_idle(self) -> None:
        if self.state is not HostState.IDLE:
            raise LocalProtocolError(f"channel is busy ({self.state.value})")

    def _begin(self, transfer_id: int, now: float) -> None:
        self._out.clear()
        self._transfer_id = transfer_id
        self._deadline = now + self.timeout_s
        self._hard_deadline = now + self.max_transfer_s

    def _to_idle(self) -> None:
        if self._inbox is not None:
            self._inbox.wipe()
            self._inbox = None
        self._out.clear()
        self.state = HostState.IDLE

    # Transport side --------------------------------------------------------
    def next_output(self) -> Message | None:
        return self._out.next()

    def output_done(self, now: float) -> None:
        """The message from :meth:`next_output` is in the ring."""
        self._out.done()
        if self.state is not HostState.IDLE:
            self._deadline = now + self.timeout_s

    def tick(self, now: float) -> list[HostEvent]:
        """Time out a transfer that made no progress."""
        if self.state is HostState.IDLE or (now < self._deadline and now < self._hard_deadline):
            return []
        return self.abort(FailReason.TIMEOUT)

    def receive(self, message: Message, now: float) -> list[HostEvent]:
        """Feed one decoded message from the guest.

        Raises:
            RemoteProtocolError: the guest broke the protocol; the caller marks it faulty.
        """
        if isinstance(message, CopyRequest):
            raise RemoteProtocolError("a guest may not send copy requests")
        handler = _HOST_TABLE.get((self.state, type(message)))
        if handler is None or message.transfer_id != self._transfer_id:
            return [Dropped(message)]
        self._deadline = now + self.timeout_s
        return handler(self, message)

    def _on_copy_status(self, message: Status) -> list[HostEvent]:
        reason = {
            StatusCode.EMPTY: FailReason.EMPTY,
            StatusCode.TOO_LARGE: FailReason.TOO_LARGE,
            StatusCode.BUSY: FailReason.BUSY,
        }.get(message.code, FailReason.REFUSED)
        if message.code is StatusCode.OK:
            raise RemoteProtocolError("a copy is answered with data, not with OK")
        event = CopyFailed(self._transfer_id, reason, message.value)
        self._to_idle()
        return [event]

    def _on_copy_begin(self, message: DataBegin) -> list[HostEvent]:
        if message.total_size > self._limit:
            raise RemoteProtocolError(
                f"guest announced {message.total_size} bytes over the limit {self._limit} it was given"
            )
        self._inbox = _Inbox(message.transfer_id, message.total_size)
        self.state = HostState.RECEIVING_COPY
        return []

    def _on_copy_chunk(self, message: DataChunk) -> list[HostEvent]:
        assert self._inbox is not None
        self._inbox.add(message)
        return []

    def _on_copy_end(self, message: DataEnd) -> list[HostEvent]:
        assert self._inbox is not None
        data = self._inbox.finish()
        self._inbox = None  # handed over to the caller, not wiped
        self._to_idle()
        return [CopyCompleted(message.transfer_id, data)]

    def _on_paste_status(self, message: Status) -> list[HostEvent]:
        if message.code is StatusCode.OK and not self._out.drained:
            raise RemoteProtocolError("guest confirmed a paste it has not received yet")
        event: HostEvent
        if message.code is StatusCode.OK:
            event = PasteCompleted(message.transfer_id, self._paste_size)
        else:
            reason = {
                StatusCode.TOO_LARGE: FailReason.TOO_LARGE,
                StatusCode.BUSY: FailReason.BUSY,
            }.get(message.code, FailReason.REFUSED)
            try:
                because = RefusedBecause(message.value) if reason is FailReason.REFUSED else None
            except ValueError:  # a newer peer's reason: still a refusal
                because = None
            event = PasteFailed(message.transfer_id, reason, self._paste_size,
                                because or RefusedBecause.UNSPECIFIED)
        self._to_idle()
        return [event]

    def _on_cancel(self, message: Cancel) -> list[HostEvent]:
        return self.abort(FailReason.CANCELLED)


_HostHandler = Callable[[HostChannel, Message], list[HostEvent]]
_HOST_TABLE: dict[tuple[HostState, type], _HostHandler] = {
    (HostState.AWAIT_COPY, Status): HostChannel._on_copy_status,  # type: ignore[dict-item]
    (HostState.AWAIT_COPY, DataBegin): HostChannel._on_copy_begin,  # type: ignore[dict-item]
    (HostState.AWAIT_COPY, Cancel): HostChannel._on_cancel,  # type: ignore[dict-item]
    (HostState.RECEIVING_COPY, DataChunk): HostChannel._on_copy_chunk,  # type: ignore[dict-item]
    (HostState.RECEIVING_COPY, DataEnd): HostChannel._on_copy_end,  # type: ignore[dict-item]
    (HostState.RECEIVING_COPY, Cancel): HostChannel._on_cancel,  # type: ignore[dict-item]
    (HostState.SENDING_PASTE, Status): HostChannel._on_paste_status,  # type: ignore[dict-item]
    (HostState.SENDING_PASTE, Cancel): HostChannel._on_cancel,  # type: ignore[dict-item]
}


# Guest side ----------------------------------------------------------------
class GuestState(enum.Enum):
    IDLE = "idle"
    RECEIVING_PASTE = "receiving paste"
    DISCARDING_PASTE = "discarding refused paste"


class GuestChannel:
    """The guest driver's end: answers copy requests, assembles pastes."""

    def __init__(self, *, chunk_size: int, limit: int) -> None:
        self.state = GuestState.IDLE
        self.limit = limit
        self._out = _Outbox(chunk_size)
        self._inbox: _Inbox | None = None
        self._discarding = 0
        self._answering = 0
        self._request_limit = 0

    def next_output(self) -> Message | None:
        return self._out.next()

    def output_done(self) -> None:
        self._out.done()

    def answer_copy(self, transfer_id: int, data: bytes | bytearray | None) -> None:
        """Answer the copy request `transfer_id` with the clipboard (None or b"" if empty)."""
        self._out.clear()
        self._answering = transfer_id
        if not data:
            self._out.send(Status(transfer_id, StatusCode.EMPTY))
        elif len(data) > self._request_limit:
            self._out.send(Status(transfer_id, StatusCode.TOO_LARGE, len(data)))
        else:
            self._out.stream(transfer_id, data)

    def answer_status(self, transfer_id: int, code: StatusCode, value: int = 0) -> None:
        """Answer the copy request `transfer_id` with a status alone (EMPTY, TOO_LARGE with
        the size, or REFUSED with a :class:`RefusedBecause`)."""
        self._out.clear()
        self._answering = transfer_id
        self._out.send(Status(transfer_id, code, value))

    def confirm_paste(self, transfer_id: int, code: StatusCode = StatusCode.OK, value: int = 0) -> None:
        """Tell the broker the outcome of the paste `transfer_id` (value: see StatusCode)."""
        self._out.send(Status(transfer_id, code, value))

    def receive(self, message: Message) -> list[GuestEvent]:
        """Feed one decoded message from the broker.

        Raises:
            RemoteProtocolError: the broker's stream is inconsistent.
        """
        match message:
            case CopyRequest(transfer_id, limit):
                self._request_limit = min(limit, self.limit)
                return [CopyRequested(transfer_id, self._request_limit)]
            case Cancel(transfer_id):
                if self._answering == transfer_id:
                    self._out.clear()
                if self._inbox is not None and self._inbox.transfer_id == transfer_id:
                    self._inbox.wipe()
                    self._inbox = None
                    self.state = GuestState.IDLE
                return []
            case DataBegin(transfer_id, total):
                if self._inbox is not None:
                    self._inbox.wipe()
                self._inbox = None
                if total > self.limit:
                    self.state = GuestState.DISCARDING_PASTE
                    self._discarding = transfer_id
                    self._out.send(Status(transfer_id, StatusCode.TOO_LARGE, total))
                    return []
                self._inbox = _Inbox(transfer_id, total)
                self.state = GuestState.RECEIVING_PASTE
                return []
            case DataChunk(transfer_id, _, _) | DataEnd(transfer_id):
                if self.state is GuestState.DISCARDING_PASTE and transfer_id == self._discarding:
                    if isinstance(message, DataEnd):
                        self.state = GuestState.IDLE
                    return []
                if self._inbox is None or transfer_id != self._inbox.transfer_id:
                    return [Dropped(message)]
                if isinstance(message, DataChunk):
                    self._inbox.add(message)
                    return []
                data = self._inbox.finish()
                self._inbox = None
                self.state = GuestState.IDLE
                return [PasteReceived(transfer_id, data)]
        return [Dropped(message)]
