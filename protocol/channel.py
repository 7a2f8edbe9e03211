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

Files (protocol.filestream): a guest may *announce* a transfer (FileOffer) at
any time; that only records a pending offer, shown to the host user.  Its
stream is accepted only after the approve gesture (:meth:`HostChannel.
start_file_source`, state FILE_SOURCE), under the transfer id the broker drew,
and only as fast as the other end can take it: in FILE_SOURCE the channel does
not want its input drained (:meth:`HostChannel.wants_input`); the broker's
relay pulls one record at a time, when the target has room, and checks each
with :meth:`HostChannel.take_stream` against what was approved.  A VM receives
a stream only after :meth:`HostChannel.start_file_target` (state FILE_TARGET).
Records of a transfer that already ended are ignored silently (they were in
flight); any other file record is dropped and counted like clipboard ones.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.filestream import LENIENT, EntryStep, StreamChecker
from protocol.messages import (
    Cancel,
    CopyRequest,
    DataBegin,
    DataChunk,
    DataEnd,
    FileBegin,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileOffer,
    FileResult,
    FileStart,
    Message,
    RefusedBecause,
    Status,
    StatusCode,
    StreamEnd,
    StreamMessage,
)

CAP_COPY_FROM = 1 << 0
"""Capability bit: the broker accepts this VM's clipboard now (a copy gesture for it)."""
CAP_PASTE_TO = 1 << 1
"""Capability bit: the broker is handing the global clipboard to this VM (a paste gesture)."""
CAP_FILES_FROM = 1 << 2
"""Capability bit: the broker takes this VM's approved file stream now."""
CAP_FILES_TO = 1 << 3
"""Capability bit: the broker is streaming files to this VM."""


def capabilities_label(caps: int) -> str:
    """The bits for people, as the status commands print them: "C-F-" (Copy, Paste,
    Files from, files To; "-" for a bit that is off)."""
    letters = ((CAP_COPY_FROM, "C"), (CAP_PASTE_TO, "P"), (CAP_FILES_FROM, "F"), (CAP_FILES_TO, "T"))
    return "".join(letter if caps & bit else "-" for bit, letter in letters)

OFFER_INTERVAL_S = 1.0
OFFER_BURST = 3
"""Offers that follow a withdrawal are taken at one per OFFER_INTERVAL_S, after a burst of
OFFER_BURST; the others are dropped.  Bounds what a guest withdrawing and re-offering in a
loop costs (each offer is a log line and a desktop notification).  An honest driver waits
OFFER_INTERVAL_S after a withdrawal itself (GuestChannel.announce), and the burst absorbs a
broker that read a withdrawal and the next offer in the same round."""

FILE_IDLE_TIMEOUT_S = 60.0
"""A file transfer fails after this long without a record moving either way.  Longer than
the clipboard's timeout: a receiver may spend a while making a big transfer durable.  A
driver that dies is noticed sooner, by its heartbeat (the broker aborts stale VMs)."""
_STREAM_TYPES = (FileEntry, FileChunk, FileEnd, StreamEnd)
_CLIPBOARD_TYPES = (CopyRequest, DataBegin, DataChunk, DataEnd, Status)


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


@dataclass(frozen=True, slots=True)
class FileOffered:
    """A guest announced files; the broker shows the offer until a gesture or a withdrawal."""

    offer: FileOffer


@dataclass(frozen=True, slots=True)
class OfferWithdrawn:
    offer_id: int


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """The transfer this VM took part in ended on its side.

    `result` is the VM's own FileResult (the receiver's verdict, or a sender's
    failure); None when it cancelled, timed out or went away (`reason`).
    """

    transfer_id: int
    result: FileResult | None
    reason: FailReason | None = None


@dataclass(frozen=True, slots=True)
class FileSendApproved:
    """(guest) The host user approved our offer: stream it under `transfer_id`."""

    transfer_id: int


@dataclass(frozen=True, slots=True)
class FileSendEnded:
    """(guest) Our outgoing transfer ended: the receiver's verdict, relayed, or a cancel."""

    transfer_id: int
    result: FileResult


@dataclass(frozen=True, slots=True)
class FileIncoming:
    """(guest) A stream of files follows."""

    begin: FileBegin


@dataclass(frozen=True, slots=True)
class FileStreamed:
    """(guest) The next record of the incoming stream."""

    message: StreamMessage


@dataclass(frozen=True, slots=True)
class FileIncomingCancelled:
    transfer_id: int


FileEvent = FileOffered | OfferWithdrawn | FileOutcome
FILE_EVENTS = (FileOffered, OfferWithdrawn, FileOutcome)
"""The host events that belong to file transfers (broker.files takes them)."""
HostEvent = CopyCompleted | CopyFailed | PasteCompleted | PasteFailed | Dropped | FileEvent
GuestEvent = (
    CopyRequested | PasteReceived | Dropped
    | FileSendApproved | FileSendEnded | FileIncoming | FileStreamed | FileIncomingCancelled
)


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
        self._producer: Callable[[], Message | None] | None = None

    def send(self, message: Message) -> None:
        self._queue.append(message)

    def attach(self, producer: Callable[[], Message | None]) -> None:
        """Pull messages from `producer` (after anything queued) until it returns None.

        It is called only when the previous message is in the ring, so it may
        reuse one buffer for every chunk it hands out.
        """
        self._producer = producer

    def detach(self) -> None:
        """Stop pulling (a cancelled stream); a message already taken still goes out."""
        self._producer = None

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
            if self._producer is None:
                return None
            message = self._producer()
            if message is None:
                self._producer = None
            return message
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
        return (self._current is None and not self._queue and self._stream is None
                and self._producer is None)

    def clear(self) -> None:
        self._queue.clear()
        self._current = None
        if self._stream is not None:
            self._stream[1].release()
        self._stream = None

    def clear_clipboard(self) -> None:
        """Drop clipboard traffic only: file records queued beside it still go out."""
        self._queue = deque(m for m in self._queue if not isinstance(m, _CLIPBOARD_TYPES))
        if isinstance(self._current, _CLIPBOARD_TYPES):
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
    FILE_SOURCE = "sending files"
    FILE_TARGET = "receiving files"


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
        self.pending_offer: FileOffer | None = None
        self.offer_seen_at = 0.0
        self.offer_withdrawn_at: float | None = None
        """When the VM last withdrew a pending offer (its next one may be a swap)."""
        self._offer_tokens = float(OFFER_BURST)  # offers after a withdrawal (see OFFER_BURST)
        self._withdrew = False  # since its last offer was taken
        self._tokens_at = 0.0
        self._checker: StreamChecker | None = None
        self._stream_ended = False
        self._retired_id = 0  # a file transfer that ended: its late records are ignored

    # Commands from the broker ---------------------------------------------
    @property
    def capabilities(self) -> int:
        if self.state in (HostState.AWAIT_COPY, HostState.RECEIVING_COPY):
            return CAP_COPY_FROM
        if self.state is HostState.SENDING_PASTE:
            return CAP_PASTE_TO
        if self.state is HostState.FILE_SOURCE:
            return CAP_FILES_FROM
        if self.state is HostState.FILE_TARGET:
            return CAP_FILES_TO
        return 0

    def wants_input(self) -> bool:
        """Flow: False while the broker's relay pulls this VM's records one by one itself."""
        return self.state is not HostState.FILE_SOURCE

    @property
    def stream_checker(self) -> StreamChecker | None:
        """The checker of the approved stream (FILE_SOURCE), for progress counts."""
        return self._checker

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

    def start_file_source(self, transfer_id: int, now: float) -> FileOffer:
        """Approve the pending offer: ask the VM to stream it under `transfer_id`.

        Returns the offer; the stream is then held to its counts.

        Raises:
            LocalProtocolError: no offer is pending, or a transfer is in flight.
        """
        self._require_idle()
        offer = self.pending_offer
        if offer is None:
            raise LocalProtocolError("no file offer is pending")
        self._begin(transfer_id, now)
        self.pending_offer = None
        # Structure, counts and the offered top-level names (what the user approved);
        # the receiver applies its own name policy.
        self._checker = StreamChecker(
            max_entries=offer.entries, max_files=offer.files, max_bytes=offer.total_size,
            policy=LENIENT, offered=(offer.roots, offer.names),
        )
        self.state = HostState.FILE_SOURCE
        self._out.send(FileStart(transfer_id, offer.offer_id))
        return offer

    def start_file_target(
        self, transfer_id: int, *, entries: int, files: int, total_size: int, flags: int,
        source: str, now: float,
    ) -> None:
        """Announce a stream of files to this VM; then hand it the stream with :meth:`give_stream`.

        Raises:
            LocalProtocolError: a transfer is in flight.
            ValueError: a count or the source name is out of range.
        """
        begin = FileBegin(transfer_id, entries, files, total_size, flags, source)
        self._require_idle()
        self._begin(transfer_id, now)
        self._stream_ended = False
        self.state = HostState.FILE_TARGET
        self._out.send(begin)

    def take_stream(self, message: StreamMessage, now: float) -> EntryStep | None:
        """(FILE_SOURCE) Check the next record of the approved stream before it is relayed.

        Raises:
            LocalProtocolError: not in FILE_SOURCE, or the record belongs to another transfer.
            RemoteProtocolError: the record breaks the stream's order, counts or sizes.
        """
        if self.state is not HostState.FILE_SOURCE or self._checker is None:
            raise LocalProtocolError(f"no approved stream to take ({self.state.value})")
        if message.transfer_id != self._transfer_id:
            raise LocalProtocolError("a record of another transfer")
        self._deadline = now + FILE_IDLE_TIMEOUT_S
        return self._checker.check(message)

    def give_stream(self, message: StreamMessage, now: float) -> int:
        """(FILE_TARGET) Note that `message` goes to this VM next; returns the transfer id
        to tag it with (messages.encode_stream) before it is put in the VM's ring.

        Raises:
            LocalProtocolError: not in FILE_TARGET.
        """
        if self.state is not HostState.FILE_TARGET:
            raise LocalProtocolError(f"no stream to give ({self.state.value})")
        self._deadline = now + FILE_IDLE_TIMEOUT_S
        if type(message) is StreamEnd:
            self._stream_ended = True
        return self._transfer_id

    def finish_file(self, result: FileResult | None) -> None:
        """End this VM's part in a file transfer from the broker's side.

        A source is told the outcome (`result`, re-tagged); a target is told to
        cancel (result None).  Late records of the transfer are then ignored.
        """
        if self.state not in (HostState.FILE_SOURCE, HostState.FILE_TARGET):
            return
        transfer_id = self._transfer_id
        tell: Message = Cancel(transfer_id) if result is None else replace(result, transfer_id=transfer_id)
        self._retire()
        self._out.send(tell)

    def _retire(self) -> None:
        """End a file role.  What is queued (a FileStart or FileBegin not yet in the ring)
        still goes out first, so the VM always hears of the transfer before its end."""
        self._retired_id = self._transfer_id
        self._checker = None
        self.state = HostState.IDLE

    def abort(self, reason: FailReason) -> list[HostEvent]:
        """Drop whatever is in flight (driver detached, VM faulty, shutdown)."""
        events: list[HostEvent] = []
        if self.state in (HostState.AWAIT_COPY, HostState.RECEIVING_COPY):
            events.append(CopyFailed(self._transfer_id, reason))
        elif self.state is HostState.SENDING_PASTE:
            events.append(PasteFailed(self._transfer_id, reason, self._paste_size))
        elif self.state in (HostState.FILE_SOURCE, HostState.FILE_TARGET):
            events.append(FileOutcome(self._transfer_id, None, reason))
            self._retire()
            # A slow but live driver stops at once; a new driver skips what an old one left.
            self._out.send(Cancel(self._retired_id))
            return events
        self._to_idle()
        return events

    def detach(self, now: float) -> list[HostEvent]:
        """The VM's driver went away or restarted: abort what is in flight, and its pending
        offer counts as withdrawn (a new driver's offer is limited like any that follows a
        withdrawal, and may be a swap)."""
        events = self.abort(FailReason.DETACHED)
        if self.pending_offer is not None:
            events.append(self._withdraw_offer(now))
        return events

    def inherit_offer_limits(self, previous: HostChannel, now: float) -> None:
        """Take over what limits offers from the channel of the VM's previous session (its
        region was re-initialised): an offer pending there counts as withdrawn now."""
        self.offer_withdrawn_at = now if previous.pending_offer is not None else previous.offer_withdrawn_at
        self._withdrew = previous._withdrew or previous.pending_offer is not None
        self._offer_tokens = previous._offer_tokens
        self._tokens_at = previous._tokens_at

    def _withdraw_offer(self, now: float) -> OfferWithdrawn:
        assert self.pending_offer is not None
        offer_id, self.pending_offer = self.pending_offer.offer_id, None
        self.offer_withdrawn_at = now
        self._withdrew = True
        return OfferWithdrawn(offer_id)

    def reject_offer(self) -> FileOffer | None:
        """The user rejected the pending offer: forget it and tell the VM; returns it."""
        offer, self.pending_offer = self.pending_offer, None
        if offer is not None:
            self._out.send(Cancel(offer.offer_id))
        return offer

    @property
    def output_pending(self) -> bool:
        """Messages still wait for ring space (a relay must not overtake them)."""
        return not self._out.drained

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
        self._checker = None
        self.state = HostState.IDLE

    # Transport side --------------------------------------------------------
    def next_output(self) -> Message | None:
        return self._out.next()

    def output_done(self, now: float) -> None:
        """The message from :meth:`next_output` is in the ring."""
        self._out.done()
        if self.state in (HostState.FILE_SOURCE, HostState.FILE_TARGET):
            self._deadline = now + FILE_IDLE_TIMEOUT_S
        elif self.state is not HostState.IDLE:
            self._deadline = now + self.timeout_s

    def tick(self, now: float) -> list[HostEvent]:
        """Time out a transfer that made no progress."""
        if self.state is HostState.IDLE:
            return []
        if self.state in (HostState.FILE_SOURCE, HostState.FILE_TARGET):
            # No overall limit: a big tree takes as long as it takes while it moves.
            return self.abort(FailReason.TIMEOUT) if now >= self._deadline else []
        if now < self._deadline and now < self._hard_deadline:
            return []
        return self.abort(FailReason.TIMEOUT)

    def receive(self, message: Message, now: float) -> list[HostEvent]:
        """Feed one decoded message from the guest.

        Raises:
            RemoteProtocolError: the guest broke the protocol; the caller marks it faulty.
        """
        if isinstance(message, CopyRequest | FileStart | FileBegin):
            raise RemoteProtocolError(f"a guest may not send {type(message).__name__} records")
        if isinstance(message, FileOffer):
            return self._on_offer(message, now)
        if isinstance(message, Cancel) and self.pending_offer is not None \
                and message.transfer_id == self.pending_offer.offer_id:
            return [self._withdraw_offer(now)]
        if self._retired_id and message.transfer_id == self._retired_id \
                and isinstance(message, (*_STREAM_TYPES, FileResult, Cancel)):
            # In flight when the transfer ended (an honest peer may send a few), or a
            # flood: either way dropped, counted, and no progress for the broker's loop.
            return [Dropped(message)]
        handler = _HOST_TABLE.get((self.state, type(message)))
        if handler is None or message.transfer_id != self._transfer_id:
            return [Dropped(message)]
        if self.state in (HostState.FILE_SOURCE, HostState.FILE_TARGET):
            self._deadline = now + FILE_IDLE_TIMEOUT_S
        else:
            self._deadline = now + self.timeout_s
        return handler(self, message)

    def _on_offer(self, message: FileOffer, now: float) -> list[HostEvent]:
        if self.pending_offer is not None:
            return [Dropped(message)]  # one at a time: an offer never changes under the user's eyes
        if self._withdrew:  # rate-limited (see OFFER_BURST)
            elapsed = max(0.0, now - self._tokens_at)
            self._tokens_at = now
            self._offer_tokens = min(float(OFFER_BURST), self._offer_tokens + elapsed / OFFER_INTERVAL_S)
            if self._offer_tokens < 1.0:
                return [Dropped(message)]
            self._offer_tokens -= 1.0
            self._withdrew = False
        self.pending_offer = message
        self.offer_seen_at = now
        return [FileOffered(message)]

    def _on_file_result(self, message: FileResult) -> list[HostEvent]:
        if self.state is HostState.FILE_TARGET and message.code is FileCode.OK and not (
            self._stream_ended and self._out.drained
        ):
            raise RemoteProtocolError("the receiver confirmed files it has not all been sent")
        if self.state is HostState.FILE_SOURCE and message.code is FileCode.OK:
            raise RemoteProtocolError("a sender cannot declare its own transfer successful")
        self._retire()
        return [FileOutcome(self._retired_id, message)]

    def _on_file_cancel(self, message: Cancel) -> list[HostEvent]:
        self._retire()
        return [FileOutcome(self._retired_id, None, FailReason.CANCELLED)]

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
    (HostState.FILE_SOURCE, FileResult): HostChannel._on_file_result,  # type: ignore[dict-item]
    (HostState.FILE_SOURCE, Cancel): HostChannel._on_file_cancel,  # type: ignore[dict-item]
    (HostState.FILE_TARGET, FileResult): HostChannel._on_file_result,  # type: ignore[dict-item]
    (HostState.FILE_TARGET, Cancel): HostChannel._on_file_cancel,  # type: ignore[dict-item]
}


# Guest side ----------------------------------------------------------------
class GuestState(enum.Enum):
    IDLE = "idle"
    RECEIVING_PASTE = "receiving paste"
    DISCARDING_PASTE = "discarding refused paste"


class GuestChannel:
    """The guest driver's end: answers copy requests, assembles pastes, offers and
    streams files, receives file streams.  File transfers run beside the clipboard."""

    def __init__(self, *, chunk_size: int, limit: int) -> None:
        self.state = GuestState.IDLE
        self.limit = limit
        self._out = _Outbox(chunk_size)
        self._inbox: _Inbox | None = None
        self._discarding = 0
        self._answering = 0
        self._request_limit = 0
        self.offer_id = 0  # our pending offer
        self._withdrawn_at: float | None = None  # when we last withdrew one
        self.sending_id = 0  # our approved outgoing transfer
        self.receiving_id = 0  # the incoming transfer

    def next_output(self) -> Message | None:
        return self._out.next()

    def output_done(self) -> None:
        self._out.done()

    # Files out ---------------------------------------------------------------
    def announce(self, offer: FileOffer, now: float) -> None:
        """Offer files to the host user.

        Raises:
            LocalProtocolError: an offer or an outgoing transfer is already under way, or
                we withdrew an offer less than OFFER_INTERVAL_S ago (the broker would drop
                this one).
        """
        if self.offer_id or self.sending_id:
            raise LocalProtocolError("a file transfer is already offered or under way")
        if self._withdrawn_at is not None and now - self._withdrawn_at < OFFER_INTERVAL_S:
            raise LocalProtocolError(f"an offer was withdrawn less than {OFFER_INTERVAL_S:g} s ago; "
                                     "send again in a moment")
        self.offer_id = offer.offer_id
        self._out.send(offer)

    def stream(self, producer: Callable[[], Message | None]) -> None:
        """Send the approved stream: `producer` hands out its records one by one, when the
        ring took the previous one (it may reuse one buffer for every chunk).

        Raises:
            LocalProtocolError: no transfer was approved.
        """
        if not self.sending_id:
            raise LocalProtocolError("no approved transfer to stream")
        self._out.attach(producer)

    def cancel_send(self, now: float) -> None:
        """Withdraw our offer or stop our stream (the user pressed Ctrl-C)."""
        if self.sending_id:
            self._out.detach()
            self._out.send(Cancel(self.sending_id))
        elif self.offer_id:
            self._out.send(Cancel(self.offer_id))
            self._withdrawn_at = now
        self.offer_id = self.sending_id = 0

    def fail_send(self, result: FileResult) -> None:
        """We could not read what we offered: tell the broker why, and stop."""
        if self.sending_id:
            self._out.detach()
            self._out.send(replace(result, transfer_id=self.sending_id))
        self.sending_id = 0

    # Files in ----------------------------------------------------------------
    def file_result(self, result: FileResult) -> None:
        """The receiver's verdict on the incoming transfer (OK only after StreamEnd)."""
        if result.transfer_id == self.receiving_id:
            self.receiving_id = 0
        self._out.send(result)

    def answer_copy(self, transfer_id: int, data: bytes | bytearray | None) -> None:
        """Answer the copy request `transfer_id` with the clipboard (None or b"" if empty)."""
        self._out.clear_clipboard()
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
            case FileStart(transfer_id, offer_id):
                if not self.offer_id or offer_id != self.offer_id:
                    return [Dropped(message)]
                self.offer_id = 0
                self.sending_id = transfer_id
                return [FileSendApproved(transfer_id)]
            case FileResult(transfer_id):
                if not self.sending_id or transfer_id != self.sending_id:
                    return [Dropped(message)]
                self._out.detach()
                self.sending_id = 0
                return [FileSendEnded(transfer_id, message)]
            case FileBegin(transfer_id):
                self.receiving_id = transfer_id
                return [FileIncoming(message)]
            case FileEntry(transfer_id) | FileChunk(transfer_id) | FileEnd(transfer_id) | \
                    StreamEnd(transfer_id):
                if not self.receiving_id or transfer_id != self.receiving_id:
                    return [Dropped(message)]
                return [FileStreamed(message)]
            case Cancel(transfer_id) if transfer_id and transfer_id == self.sending_id:
                self._out.detach()
                self.sending_id = 0
                return [FileSendEnded(transfer_id, FileResult(transfer_id, FileCode.CANCELLED))]
            case Cancel(transfer_id) if transfer_id and transfer_id == self.offer_id:
                self.offer_id = 0
                return [FileSendEnded(transfer_id, FileResult(
                    transfer_id, FileCode.REFUSED, detail=b"the host user rejected the offer"))]
            case Cancel(transfer_id) if transfer_id and transfer_id == self.receiving_id:
                self.receiving_id = 0
                return [FileIncomingCancelled(transfer_id)]
            case CopyRequest(transfer_id, limit):
                self._request_limit = min(limit, self.limit)
                return [CopyRequested(transfer_id, self._request_limit)]
            case Cancel(transfer_id):
                if self._answering == transfer_id:
                    self._out.clear_clipboard()
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
