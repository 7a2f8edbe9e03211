"""``python -m guestdrv.wlowner``: own the Wayland clipboard with every type of a paste.

wl-copy serves one type per process; this serves them all, so that Ctrl-V works in
a text editor and in an image editor alike.  The guest driver starts it for each
paste (:meth:`guestdrv.clipboard._ServingTool.start`, as guestdrv.x11owner on X11)
and never waits on it after that, so a slow or stuck reader cannot block the
driver's loop.

It reads a typed clipboard (:mod:`protocol.clipformat`'s container) on standard
input, connects to ``$XDG_RUNTIME_DIR/$WAYLAND_DISPLAY``, takes the selection
through the compositor's data-control protocol (:mod:`guestdrv.wayland`) and,
once the compositor has processed that, writes one line on standard output:
``owned`` (OWNER_READY).  Text is offered as text/plain;charset=utf-8, text/plain,
UTF8_STRING, TEXT and STRING; every other item under its own MIME type.  It then
writes the bytes for each request to the descriptor it came with, without
blocking (many readers at once, each abandoned after TRANSFER_STALL_S without
progress), and closes it.

It ends when another client takes the clipboard (after finishing the transfers
in flight), on SIGTERM, SIGINT or SIGHUP, and when its parent goes away (its
standard output, a pipe, breaks).  Exit status 0 then.  Before ``owned``, a
failure is one line ``error: REASON`` on standard output and status 1, or
OWNER_UNSUPPORTED (3) when the compositor has no data-control protocol (GNOME's
Mutter), so that the driver falls back to wl-copy; 2 for input that is not a
typed clipboard.  Log lines go to standard error, which is the driver's.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

from control.cli import LOG_LEVELS, setup_logging
from guestdrv.clipboard import OWNER_READY, OWNER_UNSUPPORTED
from guestdrv.errors import ClipboardError, ClipboardUnsupported
from guestdrv.wayland import Cancelled, Ready, SelectionOwner, SendRequested, offers_for
from protocol import clipformat
from protocol.errors import ClipFormatError

log = logging.getLogger("guestdrv.wlowner")  # not __main__ when run with -m

TRANSFER_STALL_S = 10.0
"""A reader that takes no byte for this long is abandoned (its descriptor closed)."""
MAX_TRANSFERS = 32
"""Transfers served at once; a request beyond this is refused (its descriptor closed at once),
so that a client asking over and over cannot make the owner hold descriptors without end."""
RECV_SIZE = 1 << 16
"""Bytes read from the compositor at a time: the input buffer stays under this plus one message."""
MAX_FDS_PER_READ = 28
"""libwayland's MAX_FDS_OUT: the most descriptors a compositor passes with one batch."""
WRITE_CHUNK = 1 << 20


class _Stop(Exception):
    """A signal asked us to end."""


def _on_signal(signum: int, _frame: FrameType | None) -> NoReturn:
    raise _Stop(signal.Signals(signum).name)


def socket_path(environ: Mapping[str, str]) -> Path:
    """Where the compositor listens: $WAYLAND_DISPLAY, under $XDG_RUNTIME_DIR unless absolute.

    Raises:
        ClipboardError: XDG_RUNTIME_DIR is needed and not set.
    """
    display = environ.get("WAYLAND_DISPLAY") or "wayland-0"
    if display.startswith("/"):
        return Path(display)
    runtime = environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise ClipboardError("XDG_RUNTIME_DIR is not set, so the Wayland socket cannot be found")
    return Path(runtime) / display


def connect(path: Path) -> socket.socket:
    """Raises:
    ClipboardError: nothing accepts connections at `path`.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ClipboardError(f"cannot connect to the compositor at {path}: {exc.strerror or exc}") from None
    return sock


@dataclass(slots=True)
class _Transfer:
    mime: str
    data: memoryview
    sent: int
    deadline: float


class Owner:
    """The I/O around :class:`SelectionOwner`: the socket, the transfers, the clock.

    Raises (from :meth:`run`): what SelectionOwner raises, and ClipboardError when the
    compositor closes the connection.
    """

    def __init__(self, sock: socket.socket, items: list[clipformat.ClipItem], report_fd: int) -> None:
        self.sock = sock
        self.data = {mime: memoryview(item.data).cast("B") for mime, item in offers_for(items).items()}
        self.protocol = SelectionOwner(list(self.data))
        self.report_fd = report_fd
        self.ready = False
        self.cancelled = False
        self.transfers: dict[int, _Transfer] = {}
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ, "compositor")
        if stat.S_ISFIFO(os.fstat(report_fd).st_mode):
            # A pipe's write end polls as an error once its reader is gone: the driver died.
            self.selector.register(report_fd, selectors.EVENT_READ, "parent")

    def run(self) -> None:
        """Take the clipboard and serve it until cancelled (and the transfers are done),
        or the parent goes away."""
        self._flush()
        while not (self.cancelled and not self.transfers):
            deadlines = [t.deadline for t in self.transfers.values()]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.data == "compositor":
                    self._read_compositor()
                elif key.data == "parent":
                    log.info("the driver went away: leaving the clipboard")
                    return
                else:
                    self._write(key.fd)
            now = time.monotonic()
            for fd, transfer in list(self.transfers.items()):
                if now >= transfer.deadline:
                    log.warning("gave up sending %s: the reader took nothing for %g s (%d of %d bytes)",
                                transfer.mime, TRANSFER_STALL_S, transfer.sent, transfer.data.nbytes)
                    self._end(fd)

    def close(self) -> None:
        for fd in list(self.transfers):
            self._end(fd)
        for fd in self.protocol.close():
            os.close(fd)
        self.selector.close()
        self.sock.close()

    def _flush(self) -> None:
        out = self.protocol.data_to_send()
        if out:
            self.sock.sendall(out)

    def _read_compositor(self) -> None:
        data, fds, flags, _ = socket.recv_fds(self.sock, RECV_SIZE, MAX_FDS_PER_READ)
        self.protocol.receive_data(data, fds)
        if flags & socket.MSG_CTRUNC:
            raise ClipboardError(f"the compositor passed more than {MAX_FDS_PER_READ} descriptors at once")
        if not data:
            raise ClipboardError("the compositor closed the connection")
        while (event := self.protocol.next_event()) is not None:
            match event:
                case Ready(interface):
                    log.info("took the clipboard through %s, offering %s", interface, ", ".join(self.data))
                    os.write(self.report_fd, f"{OWNER_READY}\n".encode())
                    self.ready = True
                case SendRequested(mime, fd):
                    self._start(mime, fd)
                case Cancelled():
                    log.info("another client took the clipboard%s", f"; finishing {len(self.transfers)} "
                             "transfers" if self.transfers else "")
                    self.cancelled = True
        self._flush()
        if self.cancelled:  # nothing more to hear: the source is inert
            self.selector.unregister(self.sock)

    def _start(self, mime: str, fd: int) -> None:
        data = self.data.get(mime)
        if data is None or len(self.transfers) >= MAX_TRANSFERS:
            why = "not a type we offer" if data is None else f"{MAX_TRANSFERS} transfers are in flight"
            log.info("refused a request for %r: %s", mime[:60], why)
            os.close(fd)
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # a file never blocks, and cannot be polled
                written = 0
                while written < data.nbytes:
                    written += os.write(fd, data[written : written + WRITE_CHUNK])
            else:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_WRITE)
                self.transfers[fd] = _Transfer(mime, data, 0, time.monotonic() + TRANSFER_STALL_S)
                log.debug("sending %s (%d bytes)", mime, data.nbytes)
                return
        except (OSError, ValueError) as exc:  # not something one can write to or poll
            log.info("could not send %s: %s", mime, exc)
        os.close(fd)

    def _write(self, fd: int) -> None:
        transfer = self.transfers[fd]
        try:
            written = os.write(fd, transfer.data[transfer.sent : transfer.sent + WRITE_CHUNK])
        except BlockingIOError:
            return
        except OSError as exc:  # the reader closed its end (EPIPE): its choice, not a fault
            log.info("the reader of %s went away after %d bytes (%s)", transfer.mime, transfer.sent,
                     exc.strerror or exc)
            self._end(fd)
            return
        transfer.sent += written
        transfer.deadline = time.monotonic() + TRANSFER_STALL_S
        if transfer.sent >= transfer.data.nbytes:
            log.debug("sent %s (%d bytes)", transfer.mime, transfer.sent)
            self._end(fd)

    def _end(self, fd: int) -> None:
        del self.transfers[fd]
        self.selector.unregister(fd)
        os.close(fd)


def _report_failure(status: int, message: str) -> int:
    try:
        os.write(sys.stdout.fileno(), f"error: {message}\n".encode())
    except OSError:
        log.error("%s", message)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guestdrv.wlowner",
        description="Own the Wayland clipboard with the typed clipboard read on standard input "
                    "(every type at once) until another client takes it.")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    owner: Owner | None = None
    try:
        try:
            items = clipformat.parse(sys.stdin.buffer.read())
        except ClipFormatError as exc:
            return _report_failure(2, f"standard input is not a typed clipboard: {exc}")
        try:
            owner = Owner(connect(socket_path(os.environ)), items, sys.stdout.fileno())
            owner.run()
        except ClipboardUnsupported as exc:
            return _report_failure(OWNER_UNSUPPORTED, str(exc))
        except (ClipboardError, OSError) as exc:
            message = str(exc) if isinstance(exc, ClipboardError) else f"{exc.strerror or exc}"
            if owner is not None and owner.ready:
                log.error("stopped serving the clipboard: %s", message)
                return 1
            return _report_failure(1, message)
    except _Stop as stop:
        log.info("stopped by %s", stop)
    finally:
        if owner is not None:
            owner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
