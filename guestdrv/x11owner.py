"""``python -m guestdrv.x11owner``: own the X11 CLIPBOARD selection and serve one paste.

The guest driver (:class:`guestdrv.clipboard.X11Clipboard`) runs this in a process
of its own for every paste, as it used to run ``xclip -i`` in the foreground: X
clients may be slow or hostile, and the driver's one thread must never wait for
them.  Unlike xclip it serves every delivered type at once, so that Ctrl-V gives
the text to a text editor and the image to an image editor.

With its parent it speaks through its three standard streams:

- stdin: the paste, a typed clipboard container (:mod:`protocol.clipformat`), to its end;
- stdout: exactly one line: ``owned`` (OWNER_READY) once the selection is ours, taken with a
  real server timestamp (ICCCM 2.1), or ``error: REASON`` before exiting with
  status 1;
- stderr: log lines (they end up in the driver's log).

It serves until another client takes the clipboard (SelectionClear) or it is told
to stop (SIGTERM, SIGINT, SIGHUP: it gives the selection up if it still holds it),
then exits with status 0.  Transfers in flight when the selection is lost are
finished first, as ICCCM 2.3 asks (each within its own timeout); on a stop they
end with the process, and the requestor's own timeout ends them, as with any
owner that exits.

Targets
    TARGETS, TIMESTAMP and MULTIPLE; every delivered MIME type under its own name
    (and as its own property type); for the text item (``text/plain;charset=utf-8``)
    also:

    - ``UTF8_STRING``: the bytes as delivered.
    - ``STRING``: ICCCM defines it as Latin-1, so it is offered only when every
      character of the text has a Latin-1 code, and then served in Latin-1.
      Otherwise it is not listed and a request for it is refused.  (xclip answers
      any target with the UTF-8 bytes under its own type, which an old STRING
      reader shows as mojibake; a refusal makes a client ask for something else,
      and every toolkit of this century asks for UTF8_STRING first anyway.)
    - ``TEXT``: the owner picks the encoding (ICCCM 2.6.2): STRING when the text
      fits Latin-1, else UTF8_STRING.
    - ``text/plain``: a MIME type without a charset means US-ASCII (RFC 2046), so
      it is offered only for ASCII text.

    Anything else is refused (the SelectionNotify names no property), and so is
    every request made before our ownership began or for another selection.

Large data (ICCCM 2.7.2)
    Data over one request's worth (the server's maximum request length, less a
    margin) goes out incrementally: the property gets type INCR and the size, and
    each time the requestor deletes the property the next chunk is appended,
    ending with a zero-length one.  Any number of requestors are served at once,
    one transfer per (window, property), up to MAX_TRANSFERS.  A transfer that
    makes no progress for ``--incr-timeout`` seconds is abandoned, so a requestor
    that stops reading costs a bounded amount of memory and time, and a window
    destroyed mid-transfer ends its transfers.  Errors an odd requestor causes
    (a window gone, a bad property) are logged and never stop the serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from Xlib import X, Xatom
from Xlib.display import Display
from Xlib.error import ConnectionClosedError, DisplayError, XError
from Xlib.protocol import event as xevent
from Xlib.protocol import rq
from Xlib.xobject.drawable import Window

from control.cli import LOG_LEVELS, setup_logging
from guestdrv.clipboard import OWNER_READY
from guestdrv.errors import ClipboardError
from protocol import clipformat
from protocol.clipformat import TEXT_MIME, ClipItem
from protocol.errors import ClipFormatError

log = logging.getLogger("guestdrv.x11owner")  # not "__main__", which it is when run with -m

INCR_IDLE_TIMEOUT_S = 5.0
"""An incremental transfer with no progress for this long is abandoned.  Applications
read chunks as fast as the X server carries them; a requestor this slow has gone."""
MAX_TRANSFERS = 32
"""Incremental transfers served at once; each holds a reference to the data, not a copy."""
MAX_MULTIPLE_PAIRS = 64
"""Conversions one MULTIPLE request may ask for (a toolkit asks for a handful)."""
REQUEST_MARGIN = 1024
"""Bytes of a ChangeProperty request left for its 24-byte header, with room to spare."""
TIMESTAMP_WAIT_S = 5.0
"""How long the X server may take to report the time of our zero-length property change."""

_UINT32 = 1 << 32


@dataclass(frozen=True, slots=True)
class Offer:
    """What a request for one target gets: the property's type (an atom name) and its bytes."""

    type: str
    data: bytes


def offers_for(items: Sequence[ClipItem]) -> dict[str, Offer]:
    """The data targets for `items`, in the order TARGETS lists them (the items' order).

    The first item of a type wins; the text item adds the X11 text targets (see the
    module docstring for which, and in which encoding).
    """
    offers: dict[str, Offer] = {}

    def add(target: str, offer: Offer) -> None:
        offers.setdefault(target, offer)

    for item in items:
        data = bytes(item.data)
        if item.mime != TEXT_MIME:
            add(item.mime, Offer(item.mime, data))
            continue
        add("UTF8_STRING", Offer("UTF8_STRING", data))
        add(TEXT_MIME, Offer(TEXT_MIME, data))
        latin1 = _latin1(data)
        add("TEXT", Offer("STRING", latin1) if latin1 is not None else Offer("UTF8_STRING", data))
        if latin1 is not None:
            add("STRING", Offer("STRING", latin1))
        if data.isascii():
            add("text/plain", Offer("text/plain", data))
    return offers


def _latin1(utf8: bytes) -> bytes | None:
    """`utf8` re-encoded in Latin-1, or None if it is not UTF-8 or has a character outside Latin-1."""
    try:
        return utf8.decode("utf-8").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def _earlier(stamp: int, than: int) -> bool:
    """Whether X server time `stamp` is before `than` (32-bit milliseconds that wrap; 0 is "now")."""
    return stamp != X.CurrentTime and 0 < (than - stamp) % _UINT32 < _UINT32 // 2


@dataclass(slots=True)
class _Transfer:
    """An incremental (INCR) transfer of one target to one requestor's property."""

    window: Window
    prop: int
    type: int
    data: bytes
    target: str
    deadline: float
    sent: int = 0


class SelectionOwner:
    """The CLIPBOARD selection owner for one paste, on one X connection.

    `chunk` bounds the bytes put in one property (default and ceiling: what the
    server's maximum request length allows); data larger than that goes INCR.
    """

    def __init__(self, display: Display, offers: dict[str, Offer], *, chunk: int | None = None,
                 idle_timeout_s: float = INCR_IDLE_TIMEOUT_S) -> None:
        self.display = display
        server_max = display.display.info.max_request_length * 4 - REQUEST_MARGIN
        self.chunk = server_max if chunk is None else max(1, min(chunk, server_max))
        self.idle_timeout_s = idle_timeout_s
        atom = display.intern_atom
        self._clipboard = atom("CLIPBOARD")
        self._targets = atom("TARGETS")
        self._timestamp = atom("TIMESTAMP")
        self._multiple = atom("MULTIPLE")
        self._incr = atom("INCR")
        self._names: dict[int, str] = {}
        self._offers: dict[int, tuple[int, bytes]] = {}
        for target, offer in offers.items():
            target_atom = atom(target)
            self._names[target_atom] = target
            self._offers[target_atom] = (atom(offer.type), offer.data)
        self._target_list = [self._targets, self._timestamp, self._multiple, *self._offers]
        self.transfers: dict[tuple[int, int], _Transfer] = {}
        self.time = X.CurrentTime
        """The server time at which the selection became ours (0 until then)."""
        self.lost = False
        root = display.screen().root
        self._window: Window = root.create_window(
            0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent,
            event_mask=X.PropertyChangeMask)
        display.set_error_handler(self._on_error)

    # Ownership -----------------------------------------------------------------
    def acquire(self) -> None:
        """Take the CLIPBOARD selection, with the server's time of a property change of ours.

        ICCCM 2.1 forbids CurrentTime here: the timestamp orders ownership changes
        and lets us refuse requests made before we owned the selection.

        Raises:
            ClipboardError: the server did not report the time, or another client
                took the selection at once.
        """
        stamp = self.display.intern_atom("_IVCLIP_TIMESTAMP")
        self._window.change_property(stamp, Xatom.STRING, 8, b"", mode=X.PropModeAppend)
        self.display.sync()
        deadline = time.monotonic() + TIMESTAMP_WAIT_S
        while not self.time:
            if self.display.pending_events():
                ev = self.display.next_event()
                if isinstance(ev, xevent.PropertyNotify) and ev.window.id == self._window.id \
                        and ev.atom == stamp:
                    self.time = int(ev.time)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClipboardError(f"the X server did not report the time within {TIMESTAMP_WAIT_S:g} s")
            select.select([self.display.fileno()], [], [], left)
        self._window.set_selection_owner(self._clipboard, self.time)
        if not self.owns():
            raise ClipboardError("another X client took the clipboard at the same moment")
        log.info("own the clipboard (server time %d): %s", self.time,
                 ", ".join(self._names[a] for a in self._offers))

    def owns(self) -> bool:
        """Whether the server says the selection is ours (one round trip)."""
        owner: object = self.display.get_selection_owner(self._clipboard)
        # python-xlib returns a Window object (its stubs say an int): compare ids.
        return getattr(owner, "id", owner) == self._window.id

    def release(self) -> None:
        """Give the selection up if it is still ours (ICCCM 2.3.1: None, with our timestamp),
        and deliver everything still queued.

        The round trip sends the last, empty chunk of a transfer that ended after the
        selection was lost: the X connection's close does not, as python-xlib's flush
        may return before its queue is out, and a requestor without a timeout (xclip)
        would wait for that chunk forever.
        """
        if not self.lost and self.owns():
            nobody = self.display.create_resource_object("window", X.NONE)
            nobody.set_selection_owner(self._clipboard, self.time)
        self.display.sync()

    # The loop ------------------------------------------------------------------
    def serve(self, wake_fd: int, stopping: Callable[[], bool], parent_fd: int | None = None) -> str:
        """Serve requests until the selection is lost and its transfers are done, or `stopping()`,
        or the parent goes away.

        `wake_fd` becomes readable when a signal arrives (signal.set_wakeup_fd);
        `parent_fd`, the write end of a pipe to the parent, polls as readable (an
        error) once the parent's end is closed.  Returns why it ended.

        Raises:
            ConnectionClosedError: the X server went away.
        """
        fd = self.display.fileno()
        while True:
            while self.display.pending_events():
                self._dispatch(self.display.next_event())
            if stopping():
                return "told to stop"
            now = time.monotonic()
            self._expire(now)
            if self.lost and not self.transfers:
                return "another client took the clipboard"
            # Send what we queued before sleeping.  Not flush(): python-xlib's flush and
            # pending_events may leave bytes unsent when the socket is full, and the
            # requestor would then wait on us while we wait on it.  The round trip also
            # reads what has arrived meanwhile: handle that before sleeping.
            self.display.sync()
            if self.display.pending_events():
                continue
            deadlines = [t.deadline for t in self.transfers.values()]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            watched = [fd, wake_fd] if parent_fd is None else [fd, wake_fd, parent_fd]
            readable, _, _ = select.select(watched, [], [], timeout)
            if wake_fd in readable:
                os.read(wake_fd, 64)
            if parent_fd is not None and parent_fd in readable:
                return "the driver went away"

    def _dispatch(self, ev: rq.Event) -> None:
        try:
            if isinstance(ev, xevent.SelectionRequest):
                self._on_request(ev)
            elif isinstance(ev, xevent.PropertyNotify):
                if ev.state == X.PropertyDelete:
                    self._on_deleted(ev.window.id, ev.atom)
            elif isinstance(ev, xevent.SelectionClear):
                if ev.window.id == self._window.id and ev.atom == self._clipboard:
                    log.info("another client took the clipboard")
                    self.lost = True
            elif isinstance(ev, xevent.DestroyNotify):
                self._drop_window(ev.window.id, "its window was destroyed")
        except XError as exc:  # a reply request about a requestor's window failed
            log.info("a request of an X client failed: %s", exc)

    def _on_error(self, error: XError, request: rq.Request | None) -> None:
        """Errors of requests without a reply (to a window that went away, say): end its transfers."""
        log.debug("X error: %s", error)
        resource = getattr(error, "resource_id", None)
        if resource:
            self._drop_window(int(resource), "its window went away", gone=True)

    # Requests ------------------------------------------------------------------
    def _on_request(self, ev: rq.Event) -> None:
        # An obsolete client names no property: the target is the property then (ICCCM 2.2),
        # except for MULTIPLE, whose parameters live in the property.
        prop = ev.property or (ev.target if ev.target != self._multiple else X.NONE)
        ok = (prop != X.NONE and not self.lost and ev.selection == self._clipboard
              and not _earlier(ev.time, self.time)
              and self._convert(ev.requestor, ev.target, prop))
        if not ok:
            log.debug("refused target %d of window 0x%x", ev.target, ev.requestor.id)
        reply = xevent.SelectionNotify(time=ev.time, requestor=ev.requestor.id, selection=ev.selection,
                                       target=ev.target, property=prop if ok else X.NONE)
        ev.requestor.send_event(reply, event_mask=0, propagate=False)

    def _convert(self, window: Window, target: int, prop: int) -> bool:
        """Put `target` into `window`'s property `prop`, or start its transfer; False: refused."""
        if target == self._targets:
            window.change_property(prop, Xatom.ATOM, 32, self._target_list)
        elif target == self._timestamp:
            window.change_property(prop, Xatom.INTEGER, 32, [self.time])
        elif target == self._multiple:
            return self._convert_multiple(window, prop)
        elif target in self._offers:
            kind, data = self._offers[target]
            return self._send(window, prop, target, kind, data)
        else:
            return False
        return True

    def _convert_multiple(self, window: Window, prop: int) -> bool:
        """Convert each (target, property) pair the requestor listed; failed ones get target None."""
        reply = window.get_property(prop, X.AnyPropertyType, 0, 2 * MAX_MULTIPLE_PAIRS)
        if reply is None or reply.format != 32 or reply.bytes_after or len(reply.value) % 2:
            return False
        pairs = [int(atom) for atom in reply.value]
        for i in range(0, len(pairs), 2):
            target, into = pairs[i], pairs[i + 1]
            if target == self._multiple or into == X.NONE or not self._convert(window, target, into):
                pairs[i] = X.NONE  # ICCCM 2.6.2: "replace that atom in the property with None"
        window.change_property(prop, reply.property_type, 32, pairs)
        return True

    def _send(self, window: Window, prop: int, target: int, kind: int, data: bytes) -> bool:
        self._drop((window.id, prop), None)  # a new request for the property replaces an old one
        if len(data) <= self.chunk:
            window.change_property(prop, kind, 8, data)
            return True
        if len(self.transfers) >= MAX_TRANSFERS:
            log.warning("refused %s to window 0x%x: %d transfers in flight already",
                        self._names[target], window.id, len(self.transfers))
            return False
        # Watch the property before the requestor can see it, so no deletion goes unseen.
        window.change_attributes(event_mask=X.PropertyChangeMask | X.StructureNotifyMask)
        window.change_property(prop, self._incr, 32, [min(len(data), _UINT32 - 1)])
        self.transfers[(window.id, prop)] = _Transfer(
            window, prop, kind, data, self._names[target], time.monotonic() + self.idle_timeout_s)
        log.debug("INCR transfer of %s (%d bytes) to window 0x%x", self._names[target], len(data), window.id)
        return True

    def _on_deleted(self, window_id: int, prop: int) -> None:
        """The requestor took the property: append the next chunk (the last is empty)."""
        transfer = self.transfers.get((window_id, prop))
        if transfer is None:
            return
        chunk = transfer.data[transfer.sent : transfer.sent + self.chunk]
        transfer.window.change_property(prop, transfer.type, 8, chunk, mode=X.PropModeAppend)
        transfer.sent += len(chunk)
        transfer.deadline = time.monotonic() + self.idle_timeout_s
        if not chunk:
            self._drop((window_id, prop), None)

    # Ending transfers ----------------------------------------------------------
    def _expire(self, now: float) -> None:
        for key, transfer in list(self.transfers.items()):
            if now >= transfer.deadline:
                self._drop(key, f"no progress in {self.idle_timeout_s:g} s")

    def _drop_window(self, window_id: int, why: str, *, gone: bool = False) -> None:
        for key in [key for key in self.transfers if key[0] == window_id]:
            self._drop(key, why, gone=gone)

    def _drop(self, key: tuple[int, int], why: str | None, *, gone: bool = False) -> None:
        transfer = self.transfers.pop(key, None)
        if transfer is None:
            return
        if why is not None:
            log.info("abandoned the transfer of %s to window 0x%x after %d of %d bytes: %s",
                     transfer.target, key[0], transfer.sent, len(transfer.data), why)
        if not gone and not any(k[0] == key[0] for k in self.transfers):
            transfer.window.change_attributes(event_mask=X.NoEventMask)  # stop watching the window


# The process -------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m guestdrv.x11owner",
        description="Own the X11 CLIPBOARD selection and serve the typed clipboard read from stdin.")
    parser.add_argument("--display", help="the X display (default: $DISPLAY)")
    parser.add_argument("--chunk", type=int, metavar="BYTES",
                        help="at most this many bytes in one property (default: the server's request size)")
    parser.add_argument("--incr-timeout", type=float, default=INCR_IDLE_TIMEOUT_S, metavar="SECONDS",
                        help="abandon an incremental transfer without progress for this long "
                             f"(default {INCR_IDLE_TIMEOUT_S:g})")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser.parse_args(argv)


def _report(line: str) -> None:
    """The one line for the parent.  stdout stays open afterwards, silent: when it is a
    pipe, its reader going away tells that the driver died (see `serve`)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging(args.log_level)
    signals: list[int] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: signals.append(number))
    try:
        # The offers are copies (python-xlib sends only bytes without converting them), so
        # the container read from stdin is not kept once they are built.
        offers = offers_for(clipformat.parse(sys.stdin.buffer.read()))
    except ClipFormatError as exc:
        _report(f"error: the paste is not a typed clipboard: {exc}")
        return 1
    try:
        display = Display(args.display)
    except (DisplayError, ConnectionClosedError, OSError) as exc:
        _report(f"error: cannot open the X display {args.display or os.environ.get('DISPLAY', '')!r}: {exc}")
        return 1
    ready = False
    try:
        owner = SelectionOwner(display, offers, chunk=args.chunk, idle_timeout_s=args.incr_timeout)
        owner.acquire()
        _report(OWNER_READY)
        ready = True
        stdout = sys.stdout.fileno()
        parent = stdout if stat.S_ISFIFO(os.fstat(stdout).st_mode) else None
        why = owner.serve(wake_read, lambda: bool(signals), parent)
        owner.release()
    except (ClipboardError, ConnectionClosedError, XError) as exc:
        if not ready:
            _report(f"error: {exc}")
        else:
            log.warning("the X connection failed: %s", exc)
        return 1
    finally:
        try:
            display.close()
        except Exception:  # closing a broken X connection can raise anything Xlib has
            log.debug("closing the X connection failed", exc_info=True)
    log.info("stopped serving the clipboard: %s", why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
