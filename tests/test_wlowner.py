"""The owner process (python -m guestdrv.wlowner): its failures, each a clear line, against
a fake compositor; and its service against a real headless sway."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.lab import SwaySession
from guestdrv import wlowner
from guestdrv.clipboard import OWNER_UNSUPPORTED
from protocol import clipformat
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)


def event(object_id: int, opcode: int, *args: int | str) -> bytes:
    from guestdrv.wayland import encode_message

    return encode_message(object_id, opcode, *args)


class FakeCompositor:
    """A socket that answers the owner's first requests (get_registry, sync) with `reply`,
    then reads until the owner hangs up (or hangs up itself with `hang_up`)."""

    def __init__(self, path: Path, reply: bytes, *, hang_up: bool = False) -> None:
        self.path = path
        self.reply = reply
        self.hang_up = hang_up
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                got = b""
                while len(got) < 24 and (chunk := conn.recv(24 - len(got))):
                    got += chunk
                conn.sendall(self.reply)
                if not self.hang_up:
                    while conn.recv(4096):
                        pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


NO_DATA_CONTROL = (event(2, 0, 1, "wl_seat", 7) + event(2, 0, 2, "wl_data_device_manager", 3)
                   + event(3, 0, 0))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[list[FakeCompositor]]:
    made: list[FakeCompositor] = []
    yield made
    for compositor in made:
        compositor.close()


def run_owner(env: dict[str, str], data: bytes | None = None) -> subprocess.CompletedProcess[str]:
    if data is None:
        data = bytes(clipformat.encode([ClipItem(TEXT_MIME, b"text")]))
    return subprocess.run([sys.executable, "-m", "guestdrv.wlowner"], input=data.decode("latin-1"),
                          capture_output=True, text=True, encoding="latin-1", env=env, timeout=30)


def at(path: Path) -> dict[str, str]:
    return {**os.environ, "WAYLAND_DISPLAY": str(path)}


@pytest.mark.parametrize(("reply", "hang_up", "status", "line"), [
    (NO_DATA_CONTROL, False, OWNER_UNSUPPORTED,
     "error: the compositor offers no data-control protocol (ext_data_control_manager_v1 or "
     "zwlr_data_control_manager_v1), as GNOME's Mutter does not"),
    (event(2, 0, 2, "zwlr_data_control_manager_v1", 2) + event(3, 0, 0), False, 1,
     "error: the compositor has no seat, so no clipboard"),
    (event(1, 0, 2, 1, "invalid arguments for wl_registry#0"), False, 1,
     "error: the compositor reported error 1 on wl_registry (object 2): invalid arguments for wl_registry#0"),
    (b"\2\0\0\0\0\0\2\0", False, 1,
     "error: a message of 2 bytes (for object 2, opcode 0): sizes are whole words from 8 to 4096"),
    (struct.pack("=IIII", 2, 32 << 16, 1, 10) + b"wl_seat\0x\0\0\0" + struct.pack("=I", 1), False, 1,
     "error: malformed wl_registry#0 event: a string is not terminated by its only NUL"),
    (b"", True, 1, "error: the compositor closed the connection"),
])
def test_each_failure_is_one_line_and_a_status(fake: list[FakeCompositor], tmp_path: Path, reply: bytes,
                                               hang_up: bool, status: int, line: str) -> None:
    fake.append(FakeCompositor(tmp_path / "wayland-9", reply, hang_up=hang_up))
    result = run_owner(at(tmp_path / "wayland-9"))
    assert (result.returncode, result.stdout) == (status, line + "\n")
    assert "Traceback" not in result.stderr


def test_no_compositor_and_bad_input_are_clear_too(tmp_path: Path) -> None:
    result = run_owner(at(tmp_path / "wayland-nothing"))
    assert result.returncode == 1
    assert result.stdout == f"error: cannot connect to the compositor at {tmp_path}/wayland-nothing: " \
                            "No such file or directory\n"
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"WAYLAND_DISPLAY": "wayland-0"}
    result = run_owner(env)
    assert (result.returncode, result.stdout) == (
        1, "error: XDG_RUNTIME_DIR is not set, so the Wayland socket cannot be found\n")
    result = run_owner(at(tmp_path / "wayland-nothing"), b"plain text, no container")
    assert result.returncode == 2
    assert result.stdout.startswith("error: standard input is not a typed clipboard: ")
    assert "Traceback" not in result.stderr


# Against sway -----------------------------------------------------------------------
def wl_paste(compositor: SwaySession, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["wl-paste", *args], capture_output=True, env=compositor.env(), timeout=30)


def start_owner(compositor: SwaySession, items: list[ClipItem]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "guestdrv.wlowner"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=compositor.env())
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(clipformat.encode(items))
    proc.stdin.close()
    assert proc.stdout.readline() == b"owned\n"
    return proc


def test_the_owner_leaves_when_its_driver_goes_away(compositor: SwaySession) -> None:
    proc = start_owner(compositor, [ClipItem(TEXT_MIME, b"held by the owner")])
    try:
        assert wl_paste(compositor, "-n").stdout == b"held by the owner"
        assert proc.stdout is not None
        proc.stdout.close()  # what the kernel does when the driver dies
        assert proc.wait(10) == 0
        assert wl_paste(compositor, "--list-types").stderr == b"No selection\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert "the driver went away" in log and "Traceback" not in log


def test_a_stuck_reader_holds_up_no_one_and_is_given_up(compositor: SwaySession,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """In process, to shorten the stall limit: a reader that never reads 4 MiB of text does not
    delay an image request, and is abandoned after the limit, not before."""
    monkeypatch.setattr(wlowner, "TRANSFER_STALL_S", 2.0)
    text = os.urandom(2 << 20).hex().encode()
    read_fd, write_fd = os.pipe()
    path = wlowner.socket_path(compositor.env())
    owner = wlowner.Owner(wlowner.connect(path), [ClipItem(TEXT_MIME, text), ClipItem(PNG_MIME, PNG)],
                          write_fd)
    thread = threading.Thread(target=owner.run, daemon=True)
    caplog.set_level(logging.INFO, "guestdrv.wlowner")
    thread.start()
    stuck: subprocess.Popen[bytes] | None = None
    try:
        assert os.read(read_fd, 100) == b"owned\n"
        stuck = subprocess.Popen(["wl-paste", "-n", "--type", "text/plain"], stdout=subprocess.PIPE,
                                 env=compositor.env())
        time.sleep(0.3)  # its request is in
        started = time.monotonic()
        assert wl_paste(compositor, "-n", "--type", "image/png").stdout == PNG
        assert time.monotonic() - started < 1.5, "the image waited for the stuck reader"
        assert "gave up" not in caplog.text
        deadline = time.monotonic() + 10
        while "gave up sending text/plain" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "gave up sending text/plain: the reader took nothing for 2 s" in caplog.text
        subprocess.run(["wl-copy", "someone else"], env=compositor.env(), check=True, timeout=10)
        thread.join(10)
        assert not thread.is_alive(), "the owner did not end when cancelled"
        assert stuck.stdout is not None
        assert 0 < len(stuck.stdout.read()) < len(text)
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
            assert stuck.stdout is not None
            stuck.stdout.close()
        owner.close()
        os.close(read_fd)
        os.close(write_fd)
