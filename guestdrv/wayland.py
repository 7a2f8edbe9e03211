"""The Wayland wire protocol and a data-control selection owner, without I/O.

In the manner of h11: bytes and file descriptors read from the compositor go in
(:meth:`SelectionOwner.receive_data`), events come out (:meth:`SelectionOwner.next_event`,
None when it needs more bytes), and the requests it makes wait in
:meth:`SelectionOwner.data_to_send`.  It opens no socket and closes no
descriptor: the process that drives it (:mod:`guestdrv.wlowner`) does both.

The wire format (Wayland's; words in the host's byte order)::

    word 0   object id: the object a request is for, or an event comes from
    word 1   message size in bytes, header included (upper 16 bits) | opcode (lower 16)
    then     the arguments, each a whole number of words:
               uint, object, new_id   one word (object 0 is null)
               string   length including its NUL (0: null), the bytes, the NUL,
                        zero padding to the next word
               fd       no bytes: the next descriptor passed alongside (SCM_RIGHTS)
             wl_registry.bind's new_id of no fixed interface is three arguments:
             the interface name (string), the version (uint) and the id.

The conversation; the object ids are ours and fixed::

    -> wl_display.get_registry(2)  wl_display.sync(3)
    <- wl_registry.global(name, interface, version)...  wl_callback(3).done
    -> bind wl_seat as 4, and ext_data_control_manager_v1 (else zwlr_data_control_manager_v1) as 5
       manager.get_data_device(6, seat 4)  manager.create_data_source(7)
       source.offer(type)...  device.set_selection(7)  wl_display.sync(8)
    <- wl_callback(8).done                     Ready: the selection is ours
    <- source.send(type, fd)                   SendRequested: write the bytes to fd, close it
    <- source.cancelled                        Cancelled: another client took the clipboard
    <- wl_display.error(object, code, text)    CompositorError (fatal)

The device also announces every selection, ours included, with a data_offer (a
new object of the compositor's) and a selection event; we never read offers,
and destroy each one as it comes (the protocol asks clients to).  Events of
objects we do not hold and opcodes we do not know are ignored: none of them
carries a descriptor, so skipping them cannot shift the descriptor queue.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from guestdrv.errors import (
    ClipboardError,
    ClipboardUnsupported,
    CompositorError,
    WaylandProtocolError,
)
from protocol.clipformat import TEXT_MIME, ClipItem

_HEADER = struct.Struct("=II")
_WORD = struct.Struct("=I")

MAX_MESSAGE_SIZE = 4096
"""libwayland refuses messages over 4096 bytes (WL_MAX_MESSAGE_SIZE); every event we
read is far smaller (the longest is an error's text), so a larger size is garbage."""
MAX_PENDING_FDS = 64
"""Descriptors received but not yet claimed by a send event.  A compositor passes at
most 28 with one message batch (libwayland's MAX_FDS_OUT); more waiting means it is
passing descriptors no event claims."""
MAX_OFFERS = 64
"""Types one source offers: a paste has at most 16 items, text among them five names."""
SERVER_ID_START = 0xFF000000
"""Ids from here up are the compositor's own (the objects it creates, such as offers)."""

# Our objects.  One connection, one selection: fixed ids keep the conversation readable.
DISPLAY_ID = 1
REGISTRY_ID = 2
DISCOVERY_SYNC_ID = 3
SEAT_ID = 4
MANAGER_ID = 5
DEVICE_ID = 6
SOURCE_ID = 7
SELECTION_SYNC_ID = 8

MANAGERS = ("ext_data_control_manager_v1", "zwlr_data_control_manager_v1")
"""The data-control protocols, best first: the standardised one, then wlroots' original.
Both have the same requests and events with the same opcodes."""

TEXT_OFFERS = ("text/plain;charset=utf-8", "text/plain", "UTF8_STRING", "TEXT", "STRING")
"""The names a text item is offered under: the MIME types GTK and Qt ask for, and the
X11 target names that XWayland applications ask for."""


def offers_for(items: Sequence[ClipItem]) -> dict[str, ClipItem]:
    """The types to offer for `items` and the item each one serves, best first.

    A text item is offered under every name in TEXT_OFFERS; every other item under
    its own type.  When two items claim one name, the earlier (preferred) keeps it.
    """
    offers: dict[str, ClipItem] = {}
    for item in items:
        for name in TEXT_OFFERS if item.mime == TEXT_MIME else (item.mime,):
            offers.setdefault(name, item)
    return offers


# The wire format ----------------------------------------------------------------
def _padded(length: int) -> int:
    return (length + 3) & ~3


def encode_string(text: str) -> bytes:
    """A string argument: length (with the NUL), UTF-8 bytes, NUL, padding.

    Raises:
        ValueError: `text` holds a NUL or is too long for one message.
    """
    raw = text.encode() + b"\0"
    if b"\0" in raw[:-1] or len(raw) > MAX_MESSAGE_SIZE - 16:
        raise ValueError(f"{text[:40]!r} cannot be a Wayland string")
    return _WORD.pack(len(raw)) + raw + bytes(_padded(len(raw)) - len(raw))


def encode_message(object_id: int, opcode: int, *args: int | str) -> bytes:
    """A whole message: ints become one word (uint, object, new_id), strings strings.

    Raises:
        ValueError: an argument does not fit, or the message is over MAX_MESSAGE_SIZE.
    """
    body = b"".join(encode_string(a) if isinstance(a, str) else _WORD.pack(a) for a in args)
    size = _HEADER.size + len(body)
    if size > MAX_MESSAGE_SIZE or not 0 <= opcode <= 0xFFFF:
        raise ValueError(f"a message of {size} bytes with opcode {opcode} cannot be sent")
    return _HEADER.pack(object_id, size << 16 | opcode) + body


@dataclass(frozen=True, slots=True)
class Message:
    """One message as read from the wire; `body` holds its arguments."""

    object_id: int
    opcode: int
    body: bytes


def split_message(buffer: bytes | bytearray) -> tuple[Message, int] | None:
    """The first whole message in `buffer` and its size, or None until all of it is there.

    Raises:
        WaylandProtocolError: the header gives a size no message can have.
    """
    if len(buffer) < _HEADER.size:
        return None
    object_id, word = _HEADER.unpack_from(buffer)
    size, opcode = word >> 16, word & 0xFFFF
    if size < _HEADER.size or size % 4 or size > MAX_MESSAGE_SIZE:
        raise WaylandProtocolError(
            f"a message of {size} bytes (for object {object_id}, opcode {opcode}): "
            f"sizes are whole words from {_HEADER.size} to {MAX_MESSAGE_SIZE}")
    if len(buffer) < size:
        return None
    return Message(object_id, opcode, bytes(buffer[_HEADER.size : size])), size


class Arguments:
    """Reads one message's arguments in order; every read is checked against the body.

    Raises (every method):
        WaylandProtocolError: the body does not hold the argument asked for.
    """

    def __init__(self, message: Message, what: str, take_fd: Callable[[], int | None]) -> None:
        self._body = message.body
        self._at = 0
        self._what = what
        self._take_fd = take_fd

    def _fail(self, why: str) -> WaylandProtocolError:
        return WaylandProtocolError(f"malformed {self._what} event: {why}")

    def uint(self) -> int:
        if self._at + 4 > len(self._body):
            raise self._fail(f"it ends at byte {len(self._body)}, before an argument")
        (value,) = _WORD.unpack_from(self._body, self._at)
        self._at += 4
        return int(value)

    def string(self) -> str:
        length = self.uint()
        if length == 0:
            raise self._fail("a null string where one is required")
        if self._at + _padded(length) > len(self._body):
            raise self._fail(f"a string of {length} bytes runs past the end")
        raw = self._body[self._at : self._at + length]
        self._at += _padded(length)
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise self._fail("a string is not terminated by its only NUL")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise self._fail("a string is not UTF-8") from None

    def fd(self) -> int:
        fd = self._take_fd()
        if fd is None:
            raise self._fail("its file descriptor did not come with it")
        return fd

    def end(self) -> None:
        if self._at != len(self._body):
            raise self._fail(f"{len(self._body) - self._at} bytes after the last argument")


# Events for the driving process ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """The selection is ours: the compositor processed set_selection without an error."""

    interface: str


@dataclass(frozen=True, slots=True)
class SendRequested:
    """A client asks for `mime`: write its bytes to `fd`, then close it (it is the caller's now)."""

    mime: str
    fd: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Another client took the clipboard: our source is no longer the selection."""


Event = Ready | SendRequested | Cancelled


class State(Enum):
    DISCOVERING = "discovering"  # waiting for the globals (the first sync)
    SETTING = "setting"  # set_selection sent, waiting for the second sync
    SERVING = "serving"
    CANCELLED = "cancelled"
    ERROR = "error"


_EventHandler = Callable[["SelectionOwner", Arguments, int], None]


class SelectionOwner:
    """Take the clipboard with `offers` (MIME types and X11 target names) and serve it.

    Raises (from next_event, after which the state is ERROR and every call raises again):
        ClipboardUnsupported: the compositor offers no data-control protocol.
        CompositorError: the compositor reported a fatal error.
        WaylandProtocolError: the compositor sent something the protocol does not allow.
        ClipboardError: the compositor has no seat, or ended our data device.
    """

    def __init__(self, offers: Sequence[str]) -> None:
        if not 0 < len(offers) <= MAX_OFFERS or len(set(offers)) != len(offers):
            raise ValueError(f"1 to {MAX_OFFERS} distinct types can be offered, not {list(offers)[:8]}")
        for offer in offers:
            encode_string(offer)  # a type that cannot travel fails here, not mid-conversation
        self.offers = tuple(offers)
        self.state = State.DISCOVERING
        self.interface: str | None = None  # the data-control manager in use
        self._error: ClipboardError | None = None
        self._in = bytearray()
        self._fds: deque[int] = deque()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._seat: tuple[int, int] | None = None  # (global name, version)
        self._managers: dict[str, int] = {}  # interface -> global name
        self._objects = {DISPLAY_ID: "wl_display", REGISTRY_ID: "wl_registry",
                         DISCOVERY_SYNC_ID: "wl_callback"}
        self._request(DISPLAY_ID, 1, REGISTRY_ID)  # get_registry
        self._request(DISPLAY_ID, 0, DISCOVERY_SYNC_ID)  # sync

    # The caller's side -------------------------------------------------------------
    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes and descriptors read from the compositor; drain next_event() before more.

        The input buffer then holds at most one read plus one partial message.

        Raises:
            WaylandProtocolError: more than MAX_PENDING_FDS descriptors wait unclaimed
                (they are kept: :meth:`close` hands them back to be closed).
        """
        self._in += data
        self._fds.extend(fds)
        if len(self._fds) > MAX_PENDING_FDS:
            raise self._failed(WaylandProtocolError(
                f"the compositor passed {len(self._fds)} file descriptors that no event claims"))

    def next_event(self) -> Event | None:
        """The next event, or None once the bytes received so far are used up."""
        while True:
            if self._error is not None:
                raise self._error
            if self._events:
                return self._events.popleft()
            try:
                found = split_message(self._in)
                if found is None:
                    return None
                message, size = found
                del self._in[:size]
                self._handle(message)
            except ClipboardError as exc:
                raise self._failed(exc) from None

    def data_to_send(self) -> bytes:
        """The requests made since the last call, to write to the compositor."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def close(self) -> list[int]:
        """The descriptors received and not handed out in an event: the caller closes them."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    # Internals ----------------------------------------------------------------------
    def _failed(self, exc: ClipboardError) -> ClipboardError:
        self.state = State.ERROR
        self._error = exc
        return exc

    def _request(self, object_id: int, opcode: int, *args: int | str) -> None:
        self._out += encode_message(object_id, opcode, *args)

    def _take_fd(self) -> int | None:
        return self._fds.popleft() if self._fds else None

    def _handle(self, message: Message) -> None:
        interface = self._objects.get(message.object_id)
        if interface is None:
            return  # an offer we destroyed, a callback that is done: nothing of ours
        role = _ROLES.get(interface, interface)
        handler = _HANDLERS.get((role, message.opcode))
        if handler is None:
            return  # an event we do not use (a seat's capabilities, say)
        args = Arguments(message, f"{interface}#{message.opcode}", self._take_fd)
        handler(self, args, message.object_id)

    def _on_error(self, args: Arguments, _: int) -> None:
        object_id, code, text = args.uint(), args.uint(), args.string()
        interface = self._objects.get(object_id, "an unknown object")
        raise CompositorError(object_id, interface, code, _printable(text))

    def _on_global(self, args: Arguments, _: int) -> None:
        name, interface, version = args.uint(), args.string(), args.uint()
        args.end()
        if version == 0:
            raise WaylandProtocolError(f"global {_printable(interface)} has version 0")
        if self.state is not State.DISCOVERING:
            return  # hot-plugged later: we use what was there at the start
        if interface == "wl_seat" and self._seat is None:
            self._seat = (name, version)
        elif interface in MANAGERS:
            self._managers.setdefault(interface, name)

    def _on_done(self, args: Arguments, object_id: int) -> None:
        args.uint()  # callback data: a serial we have no use for
        args.end()
        del self._objects[object_id]
        if object_id == DISCOVERY_SYNC_ID and self.state is State.DISCOVERING:
            self._take_selection()
        elif object_id == SELECTION_SYNC_ID and self.state is State.SETTING:
            self.state = State.SERVING
            assert self.interface is not None
            self._events.append(Ready(self.interface))

    def _take_selection(self) -> None:
        manager = next((m for m in MANAGERS if m in self._managers), None)
        if manager is None:
            raise ClipboardUnsupported(
                "the compositor offers no data-control protocol (ext_data_control_manager_v1 "
                "or zwlr_data_control_manager_v1), as GNOME's Mutter does not")
        if self._seat is None:
            raise ClipboardError("the compositor has no seat, so no clipboard")
        self.interface = manager
        family = manager.removesuffix("_manager_v1")
        self._objects.update({SEAT_ID: "wl_seat", MANAGER_ID: manager,
                              DEVICE_ID: f"{family}_device_v1", SOURCE_ID: f"{family}_source_v1",
                              SELECTION_SYNC_ID: "wl_callback"})
        # Version 1 of each is all we use; any compositor offering them has it.
        self._request(REGISTRY_ID, 0, self._seat[0], "wl_seat", 1, SEAT_ID)  # bind
        self._request(REGISTRY_ID, 0, self._managers[manager], manager, 1, MANAGER_ID)
        self._request(MANAGER_ID, 1, DEVICE_ID, SEAT_ID)  # get_data_device
        self._request(MANAGER_ID, 0, SOURCE_ID)  # create_data_source
        for offer in self.offers:
            self._request(SOURCE_ID, 0, offer)  # offer
        self._request(DEVICE_ID, 0, SOURCE_ID)  # set_selection
        self._request(DISPLAY_ID, 0, SELECTION_SYNC_ID)  # sync
        self.state = State.SETTING

    def _on_data_offer(self, args: Arguments, _: int) -> None:
        offer_id = args.uint()
        args.end()
        if offer_id < SERVER_ID_START:
            raise WaylandProtocolError(f"a data offer with id {offer_id}, which is not the compositor's")
        self._request(offer_id, 1)  # destroy: we never read the clipboard through offers

    def _on_selection(self, args: Arguments, _: int) -> None:
        args.uint()  # the offer now the selection (or 0): announced, and destroyed already
        args.end()

    def _on_finished(self, args: Arguments, _: int) -> None:
        args.end()
        raise ClipboardError("the compositor ended our data device (its seat went away)")

    def _on_send(self, args: Arguments, _: int) -> None:
        mime = args.string()
        fd = args.fd()  # taken before the end check: on a failure it is in no queue, so close it
        try:
            args.end()
        except WaylandProtocolError:
            self._fds.appendleft(fd)
            raise
        self._events.append(SendRequested(mime, fd))

    def _on_cancelled(self, args: Arguments, _: int) -> None:
        args.end()
        if self.state is not State.CANCELLED:
            self.state = State.CANCELLED
            self._events.append(Cancelled())


def _printable(text: str, limit: int = 200) -> str:
    """Text from the compositor, made safe for one log line."""
    text = text[:limit]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# Data-control interfaces share a role: the same events with the same opcodes.
_ROLES: Mapping[str, str] = {
    f"{family}_{part}_v1": f"data_control_{part}"
    for family in ("ext_data_control", "zwlr_data_control") for part in ("device", "source")
}
_HANDLERS: Mapping[tuple[str, int], _EventHandler] = {
    ("wl_display", 0): SelectionOwner._on_error,
    ("wl_registry", 0): SelectionOwner._on_global,
    ("wl_callback", 0): SelectionOwner._on_done,
    ("data_control_device", 0): SelectionOwner._on_data_offer,
    ("data_control_device", 1): SelectionOwner._on_selection,
    ("data_control_device", 2): SelectionOwner._on_finished,
    ("data_control_device", 3): SelectionOwner._on_selection,  # primary_selection (not bound)
    ("data_control_source", 0): SelectionOwner._on_send,
    ("data_control_source", 1): SelectionOwner._on_cancelled,
}
"""(role, opcode) -> handler, for the events we use; any other is ignored: wl_display.delete_id
(our ids are never reused), wl_registry.global_remove (a seat that goes away ends the device)
and the seat's own events."""
