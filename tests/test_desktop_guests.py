"""Real guest clipboards: host-process guests, each on its own Xvfb display, with xclip.

alice's X clipboard -> copy gesture -> paste gesture -> bob's X clipboard, byte for
byte.  bob runs the default strict text policy; carol is permissive and wipes her
clipboard two seconds after a paste.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.lab import HostLab, NotificationReceiver, SessionBus, XServer, guests_in_sessions

MISSING = [tool for tool in ("Xvfb", "xclip") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (apt-get install xvfb xclip)")

GUESTS = {
    "alice": ["--clipboard", "x11"],
    "bob": ["--clipboard", "x11"],  # strict text policy by default
    "carol": ["--clipboard", "x11", "--text-policy", "permissive", "--wipe-after", "2"],
}


class Desktop:
    def __init__(self, lab: HostLab, displays: dict[str, XServer]) -> None:
        self.lab = lab
        self.displays = displays
        self.owners: list[subprocess.Popen[bytes]] = []

    def set_clipboard(self, vm: str, data: bytes, target: str = "UTF8_STRING") -> None:
        """Ctrl-C in `vm`: an X client (xclip) owns the CLIPBOARD selection with `data`."""
        owner = subprocess.Popen(["xclip", "-quiet", "-selection", "clipboard", "-i", "-t", target],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=self.displays[vm].env())
        assert owner.stdin is not None
        owner.stdin.write(data)
        owner.stdin.close()
        self.owners.append(owner)
        # xclip owns the selection once it has read everything; wait until the display says so.
        self.wait_clipboard(vm, target, lambda got: got == data, "alice's clipboard to be set")

    def get_clipboard(self, vm: str, target: str = "UTF8_STRING") -> bytes | None:
        """Ctrl-V in `vm`: what an application asking for `target` receives (None: nothing)."""
        result = subprocess.run(["xclip", "-selection", "clipboard", "-o", "-t", target],
                                capture_output=True, env=self.displays[vm].env(), timeout=30)
        return result.stdout if result.returncode == 0 else None

    def wait_clipboard(self, vm: str, target: str, ready: object, what: str) -> bytes | None:
        deadline = time.monotonic() + 20
        while True:
            got = self.get_clipboard(vm, target)
            if ready(got) or time.monotonic() > deadline:  # type: ignore[operator]
                return got
            time.sleep(0.05)

    def close(self) -> None:
        for owner in self.owners:
            owner.kill()
            owner.wait()


@pytest.fixture(scope="module")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desktop]:
    with guests_in_sessions(GUESTS, tmp_path_factory.mktemp("desktop"), XServer) as (lab, displays):
        desk = Desktop(lab, displays)
        try:
            yield desk
        finally:
            desk.close()


def gesture(lab: HostLab, op: str, vm: str) -> tuple[int, str]:
    result = lab.broker_cmd(op, vm)
    return result.returncode, (result.stdout + result.stderr).strip()


def round_trip(desk: Desktop, data: bytes, target: str = "UTF8_STRING", to: str = "bob") -> bytes | None:
    desk.set_clipboard("alice", data, target)
    code, line = gesture(desk.lab, "copy", "alice")
    assert code == 0, line
    code, line = gesture(desk.lab, "paste", to)
    assert code == 0, line
    assert line == f"pasted {len(data)} bytes to {to}, global clipboard wiped"
    return desk.wait_clipboard(to, target, lambda got: got == data, f"{to}'s clipboard")


TEXTS = {
    "ascii": b"hello from alice",
    "crlf": b"line one\r\nline two\r\n\r\nend",
    "multibyte": "em dash \u2014 block \u2588 emoji \U0001f98a \u00fcn\u00efc\u00f8d\u00e9".encode(),
}


@pytest.mark.parametrize("name", TEXTS)
def test_text_round_trips_byte_for_byte(desktop: Desktop, name: str) -> None:
    data = TEXTS[name] + os.urandom(4).hex().encode()  # never the previous test's content
    assert round_trip(desktop, data) == data


def test_the_copy_reports_the_types_offered(desktop: Desktop) -> None:
    desktop.set_clipboard("alice", b"typed")
    code, line = gesture(desktop.lab, "copy", "alice")
    assert (code, line) == (0, "copied 5 bytes from alice (text/plain;charset=utf-8)")
    assert desktop.lab.status()["clipboard"]["types"] == ["text/plain;charset=utf-8"]
    assert gesture(desktop.lab, "paste", "bob")[0] == 0


def png(width: int, height: int, noise: bool) -> bytes:
    """A valid RGB PNG; with noise and no compression, about width*height*3 bytes."""
    rows = b"".join(b"\0" + (os.urandom(width * 3) if noise else bytes(width * 3)) for _ in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


def test_a_5_mib_png_screenshot_round_trips(desktop: Desktop) -> None:
    image = png(1280, 1400, noise=True)
    assert len(image) > 5 << 20
    got = round_trip(desktop, image, target="image/png")
    assert got is not None and len(got) == len(image) and got == image


def test_10_mib_of_text_round_trips_through_incr(desktop: Desktop) -> None:
    line = "0123456789 abcdefghijklmnopqrstuvwxyz \u2014 ivclip\n".encode()
    data = (line * ((10 << 20) // len(line) + 1))[: 10 << 20]
    got = round_trip(desktop, data)
    assert got is not None and len(got) == len(data) and got == data


def test_strict_vm_refuses_an_escape_character_and_keeps_its_clipboard(desktop: Desktop) -> None:
    strict_vm_refuses_an_escape_character(desktop)


def strict_vm_refuses_an_escape_character(desktop: Desktop) -> None:
    """bob keeps his own clipboard; carol, permissive, takes the refused content."""
    before = b"bob's own text " + os.urandom(4).hex().encode()
    desktop.set_clipboard("bob", before)
    desktop.set_clipboard("alice", b"ls\x1b]0;pwned\x07\r\n")
    assert gesture(desktop.lab, "copy", "alice")[0] == 0
    code, line = gesture(desktop.lab, "paste", "bob")
    assert code == 1
    assert line == "refused: not valid text for bob (its text policy); global clipboard kept"
    assert desktop.get_clipboard("bob") == before
    assert "text policy" in desktop.lab.log_text("guest-bob.log")
    # The content is still there for another VM: the permissive one takes it (and wipes it later).
    assert gesture(desktop.lab, "paste", "carol")[0] == 0


def test_permissive_vm_takes_control_characters_and_wipes_them_after_the_delay(desktop: Desktop) -> None:
    data = b"raw\x1b[1mbold\rcr " + os.urandom(4).hex().encode()
    assert round_trip(desktop, data, to="carol") == data
    assert desktop.wait_clipboard("carol", "UTF8_STRING", lambda got: got is None, "the wipe") is None
    # The owner gives the selection up at SIGTERM; the driver logs the wipe once it has
    # waited for the owner to exit, a moment later.
    deadline = time.monotonic() + 10
    while "wiped the pasted content" not in (log := desktop.lab.log_text("guest-carol.log")):
        assert time.monotonic() < deadline, log
        time.sleep(0.02)


def test_copy_of_an_empty_x_clipboard_says_so(desktop: Desktop, tmp_path: Path) -> None:
    # carol's clipboard was wiped by the previous test, or has never been set.
    assert desktop.wait_clipboard("carol", "UTF8_STRING", lambda got: got is None, "empty") is None
    code, line = gesture(desktop.lab, "copy", "carol")
    assert (code, line) == (1, "carol's clipboard is empty; nothing copied")


def test_the_four_stages_with_real_hotkeys_and_notifications(desktop: Desktop, tmp_path: Path) -> None:
    """Ctrl-C in alice, Ctrl-Shift-C on alice's viewer window, Ctrl-Shift-V on bob's, Ctrl-V in bob."""
    if shutil.which("xdotool") is None or shutil.which("dbus-daemon") is None:
        pytest.skip("xdotool or dbus-daemon not installed (apt-get install xdotool dbus)")
    pytest.importorskip("Xlib", reason="python-xlib not installed (pip install -e '.[desktop]')")
    pytest.importorskip("jeepney", reason="jeepney not installed (pip install -e '.[desktop]')")
    from test_hotkeys import Window, wait_until

    data = "from alice \u2014 by hotkey\r\n".encode() + os.urandom(4).hex().encode()
    desktop.set_clipboard("alice", data)
    with XServer() as host, SessionBus() as bus:
        receiver = NotificationReceiver(bus.address)
        windows = [Window(host, ("virt-viewer", "Virt-viewer"), "alice - Virt Viewer"),
                   Window(host, ("qemu-system-x86_64", "Qemu-system-x86_64"), "QEMU (bob)")]
        env = host.env(DBUS_SESSION_BUS_ADDRESS=bus.address)
        log = tmp_path / "hotkeys.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "broker", "hotkeys", "--socket", str(desktop.lab.socket),
                 "--focus-guard-ms", "0"], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: "hotkeys ready" in log.read_text() or daemon.poll() is not None, "hotkeys")
            for window, combo in zip(windows, ("ctrl+shift+c", "ctrl+shift+v"), strict=True):
                subprocess.run(["xdotool", "windowfocus", "--sync", window.id], check=True, env=env)
                subprocess.run(["xdotool", "key", combo], check=True, env=env)
                receiver.wait_for(1 if combo.endswith("c") else 2)
            notes = receiver.wait_for(2)
            got = desktop.wait_clipboard("bob", "UTF8_STRING", lambda got: got == data, "bob's clipboard")
        finally:
            daemon.terminate()
            daemon.wait(10)
            for window in windows:
                window.close()
            receiver.close()
    assert notes == [
        ("ivclip copy", f"copied {len(data)} bytes from alice (text/plain;charset=utf-8)", 1),
        ("ivclip paste", f"pasted {len(data)} bytes to bob, global clipboard wiped", 1),
    ], log.read_text()
    assert got == data
    assert all(not [e for e in w.events if e.split()[-1].lower() in "cv"] for w in windows)
