"""Long requests: progress frames while a transfer runs, hang-up detection, a terminal bar.

A long request (a file send, an approve gesture) keeps its connection until
the outcome, like a copy gesture.  Meanwhile the server may send *interim*
frames, ``{"progress": true, ...}``, before the one final frame; a client that
does not read them loses nothing (the server skips an update rather than
block).  A client that goes away (Ctrl-C, killed) is noticed at once: its end
of the socket becomes readable with nothing to read, and the server cancels
what it was waiting for.

:class:`HeldRequest` is the server side, :func:`request_with_progress` the
client side, :class:`ProgressBar` what a terminal shows (nothing when standard
error is not a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from control.errors import ControlError, NotRunningError
from control.framing import Frame, FrameDecoder, encode_frame
from control.server import Connection

log = logging.getLogger(__name__)

PROGRESS_PERIOD_S = 0.2
"""Least time between two progress frames of one request."""


def human_size(size: float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal; bytes exact)."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def files_phrase(files: int, entries: int) -> str:
    """(1, 3) -> '1 file and 2 other entries': the files of a transfer and the rest."""
    others = entries - files
    rest = f" and {others} other entr{'ies' if others != 1 else 'y'}" if others else ""
    return f"{files} file{'s' if files != 1 else ''}{rest}"


class HeldRequest:
    """The server's side of one long request: progress out, hang-up in, then the final reply."""

    def __init__(self, conn: Connection, selector: selectors.BaseSelector,
                 on_hangup: Callable[[], None]) -> None:
        self.conn = conn
        self._selector = selector
        self._on_hangup = on_hangup
        self._pending = b""
        self._last = 0.0
        self.gone = False
        conn.sock.setblocking(False)
        selector.register(conn.sock, selectors.EVENT_READ, self._readable)

    def _readable(self) -> None:
        try:
            data = self.conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # a client has nothing more to say; ignore rather than guess
        self._forget()
        self.gone = True
        log.info("the client of a %r request went away", self.conn.request.header.get("op")
                 if self.conn.request else "?")
        self._on_hangup()

    def _forget(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.conn.sock)

    def progress(self, now: float, **info: Any) -> None:
        """Send a progress frame unless one went out less than PROGRESS_PERIOD_S ago."""
        if self.gone or self.conn.closed:
            return
        if not self._pending:
            if now - self._last < PROGRESS_PERIOD_S:
                return
            self._last = now
            self._pending = encode_frame({"progress": True, **info})
        try:
            sent = self.conn.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return  # the client is not reading right now: the frame waits, newer ones are skipped
        except OSError:
            return  # gone: _readable will say so
        self._pending = self._pending[sent:]

    def finish(self, header: dict[str, Any]) -> None:
        """Send the final frame (after the rest of a half-sent progress frame) and close."""
        self._forget()
        if self._pending and not self.gone and not self.conn.closed:
            try:
                self.conn.sock.setblocking(True)
                self.conn.sock.settimeout(5.0)
                self.conn.sock.sendall(self._pending)
            except OSError:
                pass
            self._pending = b""
        self.conn.reply(header)


def request_with_progress(
    path: Path,
    header: dict[str, Any],
    body: bytes = b"",
    *,
    on_progress: Callable[[dict[str, Any]], None],
    connect_timeout_s: float = 10.0,
) -> Frame:
    """Send one request and wait (without a time limit: a user may take a while to approve)
    for its final frame, handing every progress frame to `on_progress`.

    Ctrl-C (KeyboardInterrupt) closes the connection on its way out: the server
    takes that as a cancel.

    Raises:
        NotRunningError: nothing listens at `path`.
        ControlError: the connection broke or a frame was malformed.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(connect_timeout_s)
        try:
            conn.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunningError(f"nothing is listening on {path}") from exc
        conn.sendall(encode_frame(header, body))
        conn.settimeout(None)
        decoder = FrameDecoder(0)
        while True:
            frame = decoder.next_frame()
            if frame is None:
                data = conn.recv(1 << 16)
                if not data:
                    raise ControlError(f"{path} closed the connection without an answer")
                decoder.feed(data)
                continue
            if frame.header.get("progress") is True:
                on_progress(frame.header)
                continue
            return frame
    except TimeoutError as exc:
        raise ControlError(f"no answer on {path} within {connect_timeout_s:g} s") from exc
    except OSError as exc:
        raise ControlError(f"talking to {path} failed: {exc.strerror or exc}") from exc
    finally:
        conn.close()


class ProgressBar:
    """One line on standard error, redrawn in place: files, bytes, rate, time left.

    Quiet (draws nothing) when the stream is not a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._drawn = False
        self._started: float | None = None
        self._width = 0

    def update(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = self.render(info, time.monotonic())
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
        self._drawn = True

    def render(self, info: dict[str, Any], now: float) -> str:
        """The line for one progress frame (pure but for the clock passed in)."""
        if info.get("phase") == "waiting":
            return str(info.get("message", "waiting"))[:200]
        if self._started is None:
            self._started = now
        done, total = int(info.get("bytes", 0)), int(info.get("bytes_total", 0))
        entries, entries_total = int(info.get("entries", 0)), int(info.get("entries_total", 0))
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        fraction = done / total if total else (entries / entries_total if entries_total else 0.0)
        bar = "#" * int(20 * min(1.0, fraction))
        left = ""
        if rate > 0 and total > done and elapsed > 0.5:
            seconds = int((total - done) / rate)
            left = f"  {seconds // 60}:{seconds % 60:02d} left"
        return (f"{entries}/{entries_total} entries  {human_size(done)}/{human_size(total)}  "
                f"[{bar:<20}]  {human_size(rate)}/s{left}")

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
