"""Real Wayland guest clipboards: host-process guests, each in its own headless sway.

alice's Wayland clipboard -> copy gesture -> paste gesture -> bob's Wayland clipboard, byte
for byte, read and written by the real driver (wl-paste to read, guestdrv.wlowner to paste).
bob runs the default strict text policy; carol is permissive and wipes her clipboard two
seconds after a paste.  The Xvfb twin of this file is test_desktop_guests.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_desktop_guests import (
    TEXTS,
    Desktop,
    gesture,
    png,
    round_trip,
    strict_vm_refuses_an_escape_character,
)

from broker.lab import HostLab, SwaySession, guests_in_sessions
from protocol import clipformat
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem

MISSING = [tool for tool in ("sway", "wl-copy", "wl-paste") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed "
                          "(apt-get install --no-install-recommends sway wl-clipboard)")

GUESTS = {
    "alice": ["--clipboard", "wayland"],
    "bob": ["--clipboard", "wayland"],  # strict text policy by default
    "carol": ["--clipboard", "wayland", "--text-policy", "permissive", "--wipe-after", "2"],
}


class WaylandDesktop(Desktop):
    """Desktop's helpers, with wl-copy as the application that copies and wl-paste as the one
    that pastes."""

    def __init__(self, lab: HostLab, sessions: dict[str, SwaySession]) -> None:
        super().__init__(lab, {})
        self.sessions = sessions

    def set_clipboard(self, vm: str, data: bytes, target: str = TEXT_MIME) -> None:
        """Ctrl-C in `vm`: wl-copy owns the selection with `data`."""
        owner = subprocess.Popen(["wl-copy", "--foreground", "--type", target], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=self.sessions[vm].env())
        assert owner.stdin is not None
        owner.stdin.write(data)
        owner.stdin.close()
        self.owners.append(owner)
        self.wait_clipboard(vm, target, lambda got: got == data, f"{vm}'s clipboard to be set")

    def get_clipboard(self, vm: str, target: str = TEXT_MIME) -> bytes | None:
        """Ctrl-V in `vm` of an application asking for `target` (None: nothing offered)."""
        result = subprocess.run(["wl-paste", "--no-newline", "--type", target], capture_output=True,
                                env=self.sessions[vm].env(), timeout=30)
        return result.stdout if result.returncode == 0 else None

    def list_types(self, vm: str) -> list[str]:
        result = subprocess.run(["wl-paste", "--list-types"], capture_output=True,
                                env=self.sessions[vm].env(), timeout=30)
        return result.stdout.decode().split()


@pytest.fixture(scope="module")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaylandDesktop]:
    workdir = tmp_path_factory.mktemp("wayland-desktop")
    with guests_in_sessions(GUESTS, workdir, lambda: SwaySession(workdir, "xwayland disable\n")) as (
            lab, sessions):
        desk = WaylandDesktop(lab, sessions)
        try:
            yield desk
        finally:
            desk.close()


@pytest.mark.parametrize("name", TEXTS)
def test_text_round_trips_byte_for_byte(desktop: WaylandDesktop, name: str) -> None:
    data = TEXTS[name] + os.urandom(4).hex().encode()  # never the previous test's content
    assert round_trip(desktop, data, target=TEXT_MIME) == data
    # Pasted through our owner: every text name an application may ask for.
    assert desktop.get_clipboard("bob", "UTF8_STRING") == data


def test_a_png_image_round_trips(desktop: WaylandDesktop) -> None:
    image = png(640, 400, noise=True)
    got = round_trip(desktop, image, target=PNG_MIME)
    assert got is not None and len(got) == len(image) and got == image


def test_10_mib_of_text_round_trips(desktop: WaylandDesktop) -> None:
    line = "0123456789 abcdefghijklmnopqrstuvwxyz \u2014 ivclip\n".encode()
    data = (line * ((10 << 20) // len(line) + 1))[: 10 << 20]
    got = round_trip(desktop, data, target=TEXT_MIME)
    assert got is not None and len(got) == len(data) and got == data


def test_text_and_image_copied_together_are_pasted_together(desktop: WaylandDesktop) -> None:
    """Ctrl-C of text and image in alice (an application offering both); Ctrl-V in bob works
    in a text editor and in an image editor alike."""
    text = "caption \u2014 \u2588\u2588 \U0001f98a\r\n".encode() + os.urandom(4).hex().encode()
    image = png(32, 32, noise=True)
    app = subprocess.Popen([sys.executable, "-m", "guestdrv.wlowner"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           env=desktop.sessions["alice"].env())
    assert app.stdin is not None and app.stdout is not None
    app.stdin.write(clipformat.encode([ClipItem(TEXT_MIME, text), ClipItem(PNG_MIME, image)]))
    app.stdin.close()
    desktop.owners.append(app)
    assert app.stdout.readline() == b"owned\n"
    code, line = gesture(desktop.lab, "copy", "alice")
    size = len(text) + len(image)  # the content's size, as the broker reports it
    assert (code, line) == (0, f"copied {size} bytes from alice (text/plain;charset=utf-8, image/png)")
    assert gesture(desktop.lab, "paste", "bob")[0] == 0
    desktop.wait_clipboard("bob", PNG_MIME, lambda got: got == image, "bob's image")
    assert desktop.list_types("bob") == ["text/plain;charset=utf-8", "text/plain", "UTF8_STRING", "TEXT",
                                         "STRING", "image/png"]
    assert desktop.get_clipboard("bob", "text/plain") == text
    assert desktop.get_clipboard("bob", PNG_MIME) == image


def test_strict_vm_refuses_an_escape_character_and_keeps_its_clipboard(desktop: WaylandDesktop) -> None:
    strict_vm_refuses_an_escape_character(desktop)


def test_permissive_vm_takes_control_characters_and_wipes_them_after_the_delay(
        desktop: WaylandDesktop) -> None:
    data = b"raw\x1b[1mbold\rcr " + os.urandom(4).hex().encode()
    assert round_trip(desktop, data, target=TEXT_MIME, to="carol") == data
    assert desktop.wait_clipboard("carol", TEXT_MIME, lambda got: got is None, "the wipe") is None
    # The owner leaves at SIGTERM; the driver logs the wipe once it has waited for that.
    deadline = time.monotonic() + 10
    while "wiped the pasted content" not in (log := desktop.lab.log_text("guest-carol.log")):
        assert time.monotonic() < deadline, log
        time.sleep(0.02)
    code, line = gesture(desktop.lab, "copy", "carol")
    assert (code, line) == (1, "carol's clipboard is empty; nothing copied")


def test_no_driver_log_holds_a_traceback(desktop: WaylandDesktop, tmp_path: Path) -> None:
    for vm in GUESTS:
        assert "Traceback" not in desktop.lab.log_text(f"guest-{vm}.log"), vm
