"""The broker's control socket: other users are refused; bad requests get a clear error; it carries on."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import FIGURES

from broker.lab import HostLab
from control.framing import MAX_HEADER, Frame
from control.server import Connection, ControlServer

BINARY = ("--type", "application/octet-stream")  # random bytes are no text for a strict driver

NOBODY = 65534


@pytest.fixture(scope="module")
def lab() -> Iterator[HostLab]:
    # The socket's directory must be reachable by another user for the refusal
    # tests: a private temporary directory made traversable on purpose.
    workdir = Path(tempfile.mkdtemp(prefix="ivclip-control-"))
    os.chmod(workdir, 0o711)
    try:
        with HostLab(["alice", "bob"], workdir, size="1M") as lab:
            lab.start_broker()
            for vm in ("alice", "bob"):
                lab.start_guest(vm)
            lab.wait_attached(["alice", "bob"])
            yield lab
            assert lab.broker is not None and lab.broker.poll() is None, "the broker died"
            assert "Traceback" not in lab.log_text("broker.log")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def raw(lab: HostLab, data: bytes, *, shutdown: bool = False) -> dict[str, Any]:
    """Send raw bytes, return the reply header ({} when the broker just closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(15)
        conn.connect(str(lab.socket))
        with contextlib.suppress(BrokenPipeError):  # it answered and closed first: read the answer
            conn.sendall(data)
        if shutdown:
            conn.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply) if reply else {}


def as_nobody(path: Path, data: bytes) -> tuple[str, bytes]:
    """Connect to `path` from a child process running as uid/gid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                try:
                    conn.connect(str(path))
                except PermissionError:
                    os.write(write_end, b"EACCES\n")
                else:
                    # Refused at accept, the answer may already be waiting.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        conn.sendall(data)
                    os.write(write_end, b"REPLY\n" + conn.recv(65536))
        except BaseException as exc:  # report anything, then leave without pytest's cleanup
            os.write(write_end, f"ERROR {exc!r}\n".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    first, _, rest = out.partition(b"\n")
    return first.decode(), rest


def test_another_user_cannot_even_connect(lab: HostLab) -> None:
    outcome, _ = as_nobody(lab.socket, b'{"op":"copy","vm":"alice"}\n')
    assert outcome == "EACCES"  # the socket is mode 0600


def test_another_user_who_reaches_the_socket_is_refused_and_logged(lab: HostLab) -> None:
    os.chmod(lab.socket, 0o666)  # as if misconfigured: the peer-credential check still holds
    try:
        outcome, reply = as_nobody(lab.socket, b'{"op":"copy","vm":"alice"}\n')
    finally:
        os.chmod(lab.socket, 0o600)
    assert outcome == "REPLY"
    assert json.loads(reply) == {"ok": False, "error": "permission denied: not the owner of this socket"}
    HostLab._wait_for(lambda: f"refused a control request from uid {NOBODY}" in lab.log_text("broker.log"),
                      5, "the refusal's log line")
    assert lab.status()["clipboard"] == {"empty": True}  # no gesture happened


# (raw request, words in the error)
BAD_REQUESTS = [
    (b"not json\n", "not valid JSON"),
    (b"\xff\xfe\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"copy"\n', "must be a JSON object"),
    (b'{"op": "copy", "op": "paste", "vm": "alice"}\n', "duplicate key 'op'"),
    (b'{"op": "status", "body_size": 2000000}\n', "exceeds the limit of 1048576"),
    (b'{"op": "status", "body_size": -1}\n', "non-negative integer"),
    (b'{"op": "status", "body_size": true}\n', "non-negative integer"),
    (b"[" * 30000 + b"\n", "nested too deeply"),
    (b'{"op": ' + b"9" * 5000 + b"}\n", "not valid JSON"),
    (b'{"op": "status"}\n{"op": "status"}\n', "one request per connection"),
    (b'{"op": "launch"}\n', "unknown request 'launch'"),
    (b'{"op": "copy", "vm": ["alice"]}\n', "unknown VM ['alice']"),
    (b'{"op": "copy", "vm": "' + b"a" * 60000 + b'"}\n', "unknown VM 'aaaa"),
    (b'{"op": "copy"}\n', "unknown VM None"),
    (b"{" + b"".join(b'"k%d": 1, ' % i for i in range(100)) + b'"op": {"op": {"op": 1}}}\n',
     "unknown request {'op'"),
]


@pytest.mark.parametrize(("data", "words"), BAD_REQUESTS, ids=[w for _, w in BAD_REQUESTS])
def test_a_bad_request_gets_a_clear_error_and_the_broker_carries_on(lab: HostLab, data: bytes,
                                                                     words: str) -> None:
    reply = raw(lab, data)
    assert reply.get("ok") is False, reply
    message = reply.get("error") or reply.get("message") or ""
    assert words in message and len(json.dumps(reply)) < 1000
    assert raw(lab, b'{"op": "status"}\n')["ok"]
    FIGURES["malformed control requests"] = f"{len(BAD_REQUESTS) + 1} kinds, each answered, broker alive"


def test_an_oversized_header_is_refused(lab: HostLab) -> None:
    reply = raw(lab, b"x" * (MAX_HEADER + 10))
    assert reply == {"ok": False, "error": f"bad request: request header longer than {MAX_HEADER} bytes"}


def test_many_idle_connections_do_not_stop_gestures(lab: HostLab) -> None:
    idle = []
    try:
        for _ in range(50):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(lab.socket))
            conn.sendall(b'{"op": "sta')  # never finished
            idle.append(conn)
        content = b"through the crowd " + os.urandom(64)
        assert lab.guest_cmd("alice", "copy", *BINARY, input=content).returncode == 0
        assert lab.broker_cmd("copy", "alice").returncode == 0
        assert lab.broker_cmd("paste", "bob").returncode == 0
        assert lab.guest_cmd("bob", "paste").stdout == content
    finally:
        for conn in idle:
            conn.close()


def test_a_silent_client_is_timed_out(tmp_path: Path) -> None:
    selector = selectors.DefaultSelector()
    handled: list[Frame] = []

    def handler(conn: Connection, frame: Frame) -> None:
        handled.append(frame)

    server = ControlServer(tmp_path / "s.sock", selector, handler, max_body=0, idle_timeout_s=0.2)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "s.sock"))
            client.sendall(b'{"op": ')
            deadline = time.monotonic() + 5
            client.settimeout(0.01)
            reply = b""
            while not reply and time.monotonic() < deadline:
                for key, _ in selector.select(0.01):
                    key.data()
                server.expire(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    reply = client.recv(1000)
        assert json.loads(reply) == {"ok": False, "error": "request incomplete; timed out"}
        assert handled == []
    finally:
        server.close()
