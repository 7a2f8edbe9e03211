"""Owner-only UNIX sockets with peer-credential checks, and a blocking client.

The runtime directory is ``$XDG_RUNTIME_DIR/ivclip`` (falling back to
``/run/user/<uid>/ivclip``, then ``/tmp/ivclip-<uid>``).  It is created mode
0700 and refused when it is a symlink, belongs to someone else or is open to
the group or others.  Sockets are bound under umask 077 (mode 0600) and every
accepted peer's uid is checked with SO_PEERCRED: only our own uid and root may
talk to us.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from control.errors import ControlError, NotRunningError
from control.framing import Frame, FrameDecoder, encode_frame

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


def runtime_dir() -> Path:
    """The per-user directory for ivclip's sockets and lock files (created if needed).

    Raises:
        ControlError: the directory is unsafe (not ours, a symlink, or group/world-accessible).
    """
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        path = Path(base) / "ivclip"
    elif Path(f"/run/user/{uid}").is_dir():
        path = Path(f"/run/user/{uid}") / "ivclip"
    else:
        path = Path(f"/tmp/ivclip-{uid}")
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: Path) -> None:
    """Create `path` mode 0700 or check that an existing one is ours and private.

    Raises:
        ControlError: it is a symlink, not a directory, not ours, or accessible by others.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.geteuid():
        raise ControlError(f"{path} belongs to uid {st.st_uid}, not to us; refusing to use it")
    if st.st_mode & 0o077:
        raise ControlError(f"{path} is accessible by other users (mode {st.st_mode & 0o777:o})")


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected UNIX socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)


def peer_allowed(conn: socket.socket) -> bool:
    """Only the user who runs us, or root, may send requests."""
    return peer_uid(conn) in (os.geteuid(), 0)


class InstanceLock:
    """An exclusive flock on a file: held for as long as one live instance runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Raises: ControlError when another live instance holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ControlError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ControlError(f"another {what} is already running (it holds {self.path})") from exc
            raise ControlError(f"cannot lock {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def listen(path: Path) -> socket.socket:
    """Bind a non-blocking listening socket at `path`, mode 0600.

    The caller must hold the instance lock: a leftover socket file is then
    stale and is replaced.

    Raises:
        ControlError: the path is too long or cannot be bound.
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o077)
    try:
        server.bind(os.fsencode(path))
    except OSError as exc:
        server.close()
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(16)
    server.setblocking(False)
    return server


def request(
    path: Path, header: dict[str, Any], body: bytes = b"", *, timeout_s: float, max_body: int
) -> Frame:
    """Send one request frame and wait for the one reply frame.

    Raises:
        NotRunningError: nothing listens at `path`.
        ControlError: the connection broke, timed out, or the reply was malformed.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout_s)
    try:
        try:
            conn.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunningError(f"nothing is listening on {path}") from exc
        conn.sendall(encode_frame(header, body))
        decoder = FrameDecoder(max_body)
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            data = conn.recv(1 << 20)
            if not data:
                raise ControlError(f"{path} closed the connection without an answer")
            decoder.feed(data)
    except TimeoutError as exc:
        raise ControlError(f"no answer on {path} within {timeout_s:g} s") from exc
    except OSError as exc:
        raise ControlError(f"talking to {path} failed: {exc.strerror or exc}") from exc
    finally:
        conn.close()
