"""Tests for control.sockets and control.server: private directories, sockets, locks, the server."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control.errors import ControlError, NotRunningError
from control.framing import Frame, FrameDecoder, encode_frame
from control.server import Connection, ControlServer
from control.sockets import (
    InstanceLock,
    ensure_private_dir,
    listen,
    peer_allowed,
    peer_uid,
    request,
    runtime_dir,
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ivc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# Directories -------------------------------------------------------------------
def test_runtime_dir_under_xdg_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = runtime_dir()
    assert path == tmp_path / "ivclip"
    assert path.is_dir() and mode(path) == 0o700
    assert runtime_dir() == path  # an existing private directory is fine


def test_runtime_dir_refuses_an_unsafe_existing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "ivclip").mkdir(mode=0o700)
    os.chmod(tmp_path / "ivclip", 0o755)
    with pytest.raises(ControlError, match="accessible"):
        runtime_dir()


def test_runtime_dir_refuses_a_symlink(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "ivclip").symlink_to(elsewhere)
    with pytest.raises(ControlError, match="symlink"):
        runtime_dir()


def test_ensure_private_dir_creates_mode_0700_even_under_a_lax_umask(tmp_path):
    old = os.umask(0)
    try:
        ensure_private_dir(tmp_path / "new")
    finally:
        os.umask(old)
    assert mode(tmp_path / "new") == 0o700


@pytest.mark.parametrize("bits", [0o755, 0o750, 0o705, 0o701, 0o710, 0o770, 0o777])
def test_ensure_private_dir_refuses_a_dir_open_to_others(tmp_path, bits):
    path = tmp_path / "d"
    path.mkdir()
    os.chmod(path, bits)
    with pytest.raises(ControlError, match="accessible"):
        ensure_private_dir(path)


def test_ensure_private_dir_refuses_a_symlink_even_to_a_private_dir(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    os.chmod(target, 0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ControlError, match="symlink"):
        ensure_private_dir(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ControlError):
        ensure_private_dir(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_ensure_private_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ControlError, match="not a directory"):
        ensure_private_dir(tmp_path / "f")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_ensure_private_dir_refuses_a_dir_of_another_user(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(ControlError, match="belongs to uid 65534"):
        ensure_private_dir(path)


# Sockets and credentials -----------------------------------------------------------
def test_listen_binds_mode_0600_even_under_a_lax_umask(short_dir):
    old = os.umask(0)
    try:
        server = listen(short_dir / "s")
    finally:
        os.umask(old)
    try:
        assert stat.S_ISSOCK(os.lstat(short_dir / "s").st_mode)
        assert mode(short_dir / "s") == 0o600
        assert not server.getblocking()
    finally:
        server.close()


def test_listen_replaces_a_stale_socket_but_not_other_files(short_dir):
    path = short_dir / "s"
    listen(path).close()  # leaves a socket file nobody listens on
    with pytest.raises(NotRunningError):
        request(path, {"op": "status"}, timeout_s=1, max_body=0)
    listen(path).close()
    other = short_dir / "f"
    other.write_bytes(b"precious")
    with pytest.raises(ControlError):
        listen(other)
    assert other.read_bytes() == b"precious"


def test_listen_refuses_a_path_too_long(short_dir):
    with pytest.raises(ControlError):
        listen(short_dir / ("x" * 200))


def test_peer_is_ourselves():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.geteuid()
        assert peer_allowed(a) and peer_allowed(b)


def test_request_when_nothing_listens(short_dir):
    with pytest.raises(NotRunningError):
        request(short_dir / "none", {"op": "status"}, timeout_s=1, max_body=0)
    assert issubclass(NotRunningError, ControlError)


def test_request_times_out_as_a_control_error(short_dir):
    server = listen(short_dir / "s")  # accepts into the backlog, never answers
    try:
        with pytest.raises(ControlError, match="no answer") as info:
            request(short_dir / "s", {"op": "status"}, timeout_s=0.2, max_body=0)
        assert not isinstance(info.value, NotRunningError)
    finally:
        server.close()


# Instance lock --------------------------------------------------------------------
def test_instance_lock_is_exclusive(tmp_path):
    first = InstanceLock(tmp_path / "broker.lock")
    second = InstanceLock(tmp_path / "broker.lock")
    first.acquire("ivclip broker")
    try:
        assert mode(tmp_path / "broker.lock") == 0o600
        with pytest.raises(ControlError, match="already running"):
            second.acquire("ivclip broker")
    finally:
        first.release()
    second.acquire("ivclip broker")
    second.release()
    second.release()  # harmless


def test_instance_lock_refuses_a_symlink_with_a_control_error(tmp_path):
    (tmp_path / "target").write_bytes(b"")
    (tmp_path / "broker.lock").symlink_to(tmp_path / "target")
    with pytest.raises(ControlError):
        InstanceLock(tmp_path / "broker.lock").acquire("ivclip broker")


# The server ---------------------------------------------------------------------------
class ServerThread:
    """A ControlServer driven by its own selector loop, as the broker and driver drive it."""

    def __init__(self, path: Path, handler: Any, **kwargs: Any) -> None:
        self.selector = selectors.DefaultSelector()
        self.server = ControlServer(path, self.selector, handler, **kwargs)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                for key, _ in self.selector.select(0.02):
                    key.data()
                self.server.expire(time.monotonic())
        except BaseException as exc:  # recorded: the test asserts there is none
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        self.selector.close()


def echo(conn: Connection, frame: Frame) -> None:
    if frame.header.get("op") == "crash":
        raise RuntimeError("handler bug")
    if frame.header.get("op") == "huge":
        conn.reply({"ok": True, "names": ["x" * 1000] * 100})  # over MAX_HEADER
        return
    conn.reply({"ok": True, "op": frame.header.get("op")}, frame.body[::-1])


@pytest.fixture
def server(short_dir) -> Iterator[ServerThread]:
    thread = ServerThread(short_dir / "ctl", echo, max_body=64, idle_timeout_s=0.3)
    yield thread
    thread.close()
    assert not (short_dir / "ctl").exists()  # close removes the socket file


def raw_exchange(path: Path, data: bytes, timeout_s: float = 3.0) -> tuple[Frame | None, bool]:
    """Send raw bytes; return the reply frame (if any) and whether the server then closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(os.fsencode(path))
        if data:
            sock.sendall(data)
        decoder = FrameDecoder(1 << 20)
        frame = None
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return frame, True
            decoder.feed(chunk)
            frame = frame or decoder.next_frame()


def call(path: Path, header: dict[str, Any], body: bytes = b"") -> Frame:
    return request(path, header, body, timeout_s=3, max_body=64)


def test_server_answers_requests(server):
    reply = call(server.server.path, {"op": "echo"}, b"abc")
    assert reply == Frame({"ok": True, "op": "echo", "body_size": 3}, b"cba")
    assert call(server.server.path, {"op": "again"}).header["op"] == "again"
    assert mode(server.server.path) == 0o600
    assert server.errors == []


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json\n", "not valid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"op":"a","op":"b"}\n', "duplicate"),
        (b'{"op":"big","body_size":65}\n', "exceeds"),
        (encode_frame({"op": "a"}) + encode_frame({"op": "b"}), "one request per connection"),
    ],
    ids=["garbage", "array", "duplicate", "body-too-big", "two-requests"],
)
def test_server_refuses_malformed_requests_and_carries_on(server, data, why):
    reply, closed = raw_exchange(server.server.path, data)
    assert reply is not None and reply.header["ok"] is False
    assert why in reply.header["error"]
    assert closed
    assert call(server.server.path, {"op": "next"}).header["ok"] is True
    assert server.errors == []


def test_server_survives_a_handler_bug(server):
    reply = call(server.server.path, {"op": "crash"})
    assert reply.header == {"ok": False, "error": "internal error; see the log"}
    assert call(server.server.path, {"op": "next"}).header["ok"] is True
    assert server.errors == []


def test_a_reply_too_large_for_a_frame_becomes_an_error_reply(server):
    reply = call(server.server.path, {"op": "huge"})
    assert reply.header["ok"] is False
    assert reply.header["error"].startswith("the answer could not be sent (frame header of ")
    assert "see the log" in reply.header["error"]
    assert call(server.server.path, {"op": "next"}).header["ok"] is True
    assert server.errors == []


@pytest.mark.parametrize("data", [b"", b'{"op":"ec'], ids=["silent", "half-a-header"])
def test_server_closes_idle_connections(server, data):
    started = time.monotonic()
    reply, closed = raw_exchange(server.server.path, data)
    assert closed and reply is not None
    assert reply.header == {"ok": False, "error": "request incomplete; timed out"}
    assert 0.25 <= time.monotonic() - started < 2.5
    assert server.errors == []


def test_server_forgets_clients_that_leave(server):
    for _ in range(5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fsencode(server.server.path))
            sock.sendall(b'{"op":')
    time.sleep(0.1)
    assert call(server.server.path, {"op": "still-here"}).header["ok"] is True
    assert server.errors == []


def test_server_survives_pathological_json(server):
    try:
        reply, _ = raw_exchange(server.server.path, b'{"op":' + b"1" * 5000 + b"}\n", timeout_s=1)
    except TimeoutError:
        reply = None
    assert server.errors == []
    assert reply is not None and reply.header["ok"] is False
    assert call(server.server.path, {"op": "next"}).header["ok"] is True
