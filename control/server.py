"""A small non-blocking request server for a selector-driven loop.

Each connection carries one request frame and gets one reply frame, now or
later (a gesture replies when its transfer ends).  Peers of another uid are
refused with a reply and a log line; malformed requests get an error reply;
connections that say nothing for `idle_timeout_s` are closed.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.errors import FrameError
from control.framing import Frame, FrameDecoder, encode_frame
from control.sockets import listen, peer_allowed, peer_uid

log = logging.getLogger(__name__)


class Connection:
    """One client: one request in, one reply out."""

    def __init__(self, sock: socket.socket, max_body: int) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(max_body)
        self.last_activity = time.monotonic()
        self.request: Frame | None = None
        self.closed = False

    def reply(self, header: dict[str, Any], body: bytes | bytearray = b"") -> None:
        """Send the reply and close.  A client that went away loses its answer, nothing else;
        one too large for a frame is replaced by an error reply that says so (and logged)."""
        if self.closed:
            return
        try:
            try:
                frame = encode_frame(header, body)
            except FrameError as exc:
                log.error("a reply could not be sent: %s", exc)
                frame = encode_frame({"ok": False, "error": f"the answer could not be sent ({exc}); "
                                      "see the log"})
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
            self.sock.sendall(frame)
        except OSError as exc:
            log.info("control client left before its answer: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


Handler = Callable[[Connection, Frame], None]


class ControlServer:
    """Accepts connections on `path` and hands each complete request to `handler`."""

    def __init__(
        self,
        path: Path,
        selector: selectors.BaseSelector,
        handler: Handler,
        *,
        max_body: int,
        idle_timeout_s: float = 10.0,
    ) -> None:
        self.path = path
        self._selector = selector
        self._handler = handler
        self._max_body = max_body
        self._idle_timeout_s = idle_timeout_s
        self._listener = listen(path)
        self._open: dict[int, Connection] = {}
        selector.register(self._listener, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", self.path, exc)
                return
            conn = Connection(sock, self._max_body)
            if not peer_allowed(sock):
                log.warning("refused a control request from uid %d on %s", peer_uid(sock), self.path)
                conn.reply({"ok": False, "error": "permission denied: not the owner of this socket"})
                continue
            sock.setblocking(False)
            self._open[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, lambda c=conn: self._read(c))

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._forget(conn)
            conn.close()
            return
        conn.last_activity = time.monotonic()
        conn.decoder.feed(data)
        try:
            frame = conn.decoder.next_frame()
        except FrameError as exc:
            self._forget(conn)
            conn.reply({"ok": False, "error": f"bad request: {exc}"})
            return
        except Exception:  # a decoder bug must cost one client, not the service
            log.exception("control request could not be decoded")
            self._forget(conn)
            conn.reply({"ok": False, "error": "bad request: cannot be decoded; see the log"})
            return
        if frame is None:
            return
        if conn.decoder.pending:
            self._forget(conn)
            conn.reply({"ok": False, "error": "bad request: one request per connection"})
            return
        self._forget(conn)  # the handler owns the reply from here on
        conn.request = frame
        try:
            self._handler(conn, frame)
        except Exception:  # a bug must cost one request, not the service
            log.exception("control request %r failed", frame.header.get("op"))
            conn.reply({"ok": False, "error": "internal error; see the log"})

    def _forget(self, conn: Connection) -> None:
        if self._open.pop(conn.sock.fileno(), None) is not None:
            self._selector.unregister(conn.sock)

    def expire(self, now: float) -> None:
        """Close connections that stayed silent too long."""
        for conn in list(self._open.values()):
            if now - conn.last_activity > self._idle_timeout_s:
                self._forget(conn)
                conn.reply({"ok": False, "error": "request incomplete; timed out"})

    def close(self) -> None:
        for conn in list(self._open.values()):
            self._forget(conn)
            conn.close()
        if self._listener.fileno() >= 0:
            self._selector.unregister(self._listener)
            self._listener.close()
            self.path.unlink(missing_ok=True)
