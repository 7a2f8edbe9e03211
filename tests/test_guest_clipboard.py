"""Guest clipboard backends on their own: detection, the Wayland tools' command lines, limits,
the X11 backend with its selection owner and the Wayland backend with its data-control owner in
a real (headless sway) session: every type at once, large content, withdrawal."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_desktop_guests import png
from test_wlowner import NO_DATA_CONTROL, FakeCompositor

from broker.lab import SwaySession, XServer
from guestdrv import clipboard
from guestdrv.clipboard import (
    HeadlessClipboard,
    WaylandClipboard,
    X11Clipboard,
    choose_item,
    make_backend,
)
from guestdrv.errors import ClipboardError, ClipboardTooLarge, ClipboardUnsupported
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem

XclipOut = Callable[[str], bytes | None]
"""The conftest fixture xclip_out: what `xclip -o -t TARGET` gets (None: refused or no owner)."""


@pytest.mark.parametrize(("env", "kind"), [
    ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, "wayland"),
    ({"DISPLAY": ":0"}, "x11"),
    ({}, "headless"),
])
def test_auto_picks_wayland_then_x11_then_headless(env: dict[str, str], kind: str) -> None:
    assert make_backend("auto", env).name == kind


def test_an_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ClipboardError, match="unknown clipboard 'gnome'"):
        make_backend("gnome", {})


def test_choose_item_prefers_text_then_png() -> None:
    html, text, image = ClipItem("text/html", b"<b>"), ClipItem(TEXT_MIME, b"t"), ClipItem(PNG_MIME, b"p")
    assert choose_item([html, image, text]) is text
    assert choose_item([html, image]) is image
    assert choose_item([html]) is html


def test_headless_withdraw_only_clears_our_own_paste() -> None:
    clip = HeadlessClipboard()
    clip.write([ClipItem(TEXT_MIME, b"pasted")])
    assert clip.withdraw() and clip.read(100) == []
    clip.write([ClipItem(TEXT_MIME, b"pasted")])
    clip._items = [ClipItem(TEXT_MIME, b"the user's own copy")]  # what a later local copy does
    assert not clip.withdraw() and clip.read(100)
    with pytest.raises(ClipboardTooLarge):
        clip.read(5)


FAKE_WL_PASTE = """#!{python}
import os, sys
store = os.environ["FAKE_CLIP"]
if not os.listdir(store):
    sys.exit("Nothing is copied")
if sys.argv[1] == "--list-types":
    print("\\n".join(sorted(n.replace("_", "/") for n in os.listdir(store))))
else:
    assert sys.argv[1:3] == ["--no-newline", "--type"], sys.argv
    sys.stdout.buffer.write(open(os.path.join(store, sys.argv[3].replace("/", "_")), "rb").read())
"""
FAKE_WL_COPY = """#!{python}
import os, sys, time
assert sys.argv[1:3] == ["--foreground", "--type"], sys.argv
out = os.path.join(os.environ["FAKE_CLIP"], sys.argv[3].replace("/", "_"))
open(out, "wb").write(sys.stdin.buffer.read())
while True:
    time.sleep(60)
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def test_without_data_control_the_wayland_backend_falls_back_to_wl_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Against stand-in wl-paste and wl-copy, and a compositor that has no data-control protocol
    (as GNOME's Mutter): the owner says so, and the paste goes through wl-copy, one type."""
    store = tmp_path / "clip"
    store.mkdir()
    monkeypatch.setenv("FAKE_CLIP", str(store))
    mutter = FakeCompositor(tmp_path / "wayland-0", NO_DATA_CONTROL)
    monkeypatch.setenv("WAYLAND_DISPLAY", str(mutter.path))
    clip = WaylandClipboard(_script(tmp_path / "wl-paste", FAKE_WL_PASTE),
                            _script(tmp_path / "wl-copy", FAKE_WL_COPY))
    try:
        assert clip.read(1000) == []
        (store / "text_plain;charset=utf-8").write_bytes(b"hi \xe2\x80\x94")
        (store / "image_png").write_bytes(b"\x89PNG...")
        (store / "image_bmp").write_bytes(b"BM" * 100)  # a conversion of the PNG: not offered
        items = clip.read(1000)
        assert [(i.mime, bytes(i.data)) for i in items] == [(TEXT_MIME, b"hi \xe2\x80\x94"),
                                                           (PNG_MIME, b"\x89PNG...")]
        with pytest.raises(ClipboardTooLarge):
            clip.read(3)
        for name in os.listdir(store):
            (store / name).unlink()
        clip.write([ClipItem(PNG_MIME, b"png"), ClipItem(TEXT_MIME, b"text")])
        assert not clip.data_control
        assert "no data-control protocol" in caplog.text and "through wl-copy" in caplog.text
        # The helper writes the file and stays to serve it; the test waits for the file.
        for _ in range(200):
            if (store / "text_plain;charset=utf-8").exists() and clip.read(100):
                break
            time.sleep(0.05)
        assert [(i.mime, bytes(i.data)) for i in clip.read(100)] == [(TEXT_MIME, b"text")]
        assert clip.withdraw()
        assert not clip.withdraw()
    finally:
        clip.close()
        mutter.close()


def test_missing_tools_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = WaylandClipboard(str(tmp_path / "no-wl-paste"), str(tmp_path / "no-wl-copy"))
    with pytest.raises(ClipboardError, match=r"cannot run .*no-wl-paste"):
        clip.read(10)
    mutter = FakeCompositor(tmp_path / "wayland-0", NO_DATA_CONTROL)
    monkeypatch.setenv("WAYLAND_DISPLAY", str(mutter.path))
    try:
        with pytest.raises(ClipboardError, match=r"cannot run .*no-wl-copy"):
            clip.write([ClipItem(TEXT_MIME, b"x")])
    finally:
        mutter.close()


def test_a_wayland_paste_fails_clearly_without_a_compositor(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAYLAND_DISPLAY", str(tmp_path / "wayland-gone"))
    clip = WaylandClipboard()
    with pytest.raises(ClipboardError, match=r"cannot connect to the compositor at .*wayland-gone"):
        clip.write([ClipItem(TEXT_MIME, b"x")])
    assert clip.data_control  # not a compositor without data-control: no fallback


# A real compositor (headless sway) ---------------------------------------------------------
@pytest.fixture
def wayland(compositor: SwaySession, monkeypatch: pytest.MonkeyPatch) -> Iterator[WaylandClipboard]:
    """The backend in `compositor`'s session, its clipboard empty at the start."""
    for name, value in compositor.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DISPLAY", raising=False)
    clip = WaylandClipboard()
    yield clip
    clip.close()
    subprocess.run(["wl-copy", "--clear"], env=compositor.env(), check=True, timeout=10)


def wl_paste(compositor: SwaySession, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["wl-paste", *args], capture_output=True, env=compositor.env(), timeout=30)


def test_a_paste_installs_text_and_image_together(wayland: WaylandClipboard,
                                                  compositor: SwaySession) -> None:
    text = "Ctrl-V \u2014 text \u2588 and image \U0001f98a\r\n".encode()
    image = png(64, 48, noise=True)
    wayland.write([ClipItem(TEXT_MIME, text), ClipItem(PNG_MIME, image)])
    # No waiting: write returns once the selection is set.
    types = wl_paste(compositor, "--list-types").stdout.decode().split("\n")
    assert types == ["text/plain;charset=utf-8", "text/plain", "UTF8_STRING", "TEXT", "STRING",
                     "image/png", ""]
    assert wl_paste(compositor, "-n", "--type", "text/plain").stdout == text
    assert wl_paste(compositor, "-n", "--type", "UTF8_STRING").stdout == text
    assert wl_paste(compositor, "-n", "--type", "image/png").stdout == image
    # What the driver's next copy in this VM reads back: both items, as they were.
    assert [(i.mime, bytes(i.data)) for i in wayland.read(1 << 20)] == [(TEXT_MIME, text), (PNG_MIME, image)]


def test_10_mib_of_text_through_the_owner(wayland: WaylandClipboard, compositor: SwaySession) -> None:
    line = "0123456789 abcdefghijklmnopqrstuvwxyz \u2014 ivclip\n".encode()
    data = (line * ((10 << 20) // len(line) + 1))[: 10 << 20]
    wayland.write([ClipItem(TEXT_MIME, data)])
    got = wl_paste(compositor, "-n", "--type", "text/plain;charset=utf-8").stdout
    assert len(got) == len(data) and got == data


def test_another_client_taking_the_clipboard_ends_the_owner(wayland: WaylandClipboard,
                                                            compositor: SwaySession) -> None:
    wayland.write([ClipItem(TEXT_MIME, b"ours")])
    assert wayland._server.serving
    subprocess.run(["wl-copy", "the user's own copy"], env=compositor.env(), check=True, timeout=10)
    deadline = time.monotonic() + 10
    while wayland._server.serving and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not wayland.withdraw()  # it no longer held our paste
    assert wl_paste(compositor, "-n").stdout == b"the user's own copy"


def test_withdraw_while_owning_clears_the_clipboard(wayland: WaylandClipboard,
                                                    compositor: SwaySession) -> None:
    wayland.write([ClipItem(TEXT_MIME, b"to be wiped"), ClipItem(PNG_MIME, png(8, 8, noise=False))])
    assert wl_paste(compositor, "-n").stdout == b"to be wiped"
    assert wayland.withdraw()
    assert wl_paste(compositor, "--list-types").stderr == b"No selection\n"
    assert wayland.read(100) == []
    assert not wayland.withdraw()


def test_a_new_paste_replaces_the_previous_owner(wayland: WaylandClipboard,
                                                 compositor: SwaySession) -> None:
    wayland.write([ClipItem(TEXT_MIME, b"first")])
    first = wayland._server._proc
    wayland.write([ClipItem(PNG_MIME, png(4, 4, noise=False))])
    assert first is not None and first.poll() is not None
    assert wl_paste(compositor, "--list-types").stdout == b"image/png\n"


@pytest.fixture
def x11(xserver: XServer) -> Iterator[X11Clipboard]:
    """The X11 backend with our selection owner (python-xlib)."""
    pytest.importorskip("Xlib", reason="python-xlib not installed (pip install -e '.[desktop]')")
    clip = X11Clipboard(display=xserver.display)
    assert clip.use_owner
    yield clip
    clip.close()


def test_x11_content_over_the_limit_is_refused_not_truncated(x11: X11Clipboard) -> None:
    x11.write([ClipItem(TEXT_MIME, b"x" * 5000)])
    assert [len(i.data) for i in x11.read(1 << 20)] == [5000]  # at once: write returns owning
    with pytest.raises(ClipboardTooLarge, match="over the limit of 4999"):
        x11.read(4999)


def test_x11_paste_installs_text_and_image_together(x11: X11Clipboard, xclip_out: XclipOut) -> None:
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    x11.write([ClipItem(TEXT_MIME, b"caption"), ClipItem(PNG_MIME, image)])
    targets = (xclip_out("TARGETS") or b"").split()
    assert b"UTF8_STRING" in targets and b"image/png" in targets
    assert xclip_out("UTF8_STRING") == b"caption"  # Ctrl-V in a text editor
    assert xclip_out("image/png") == image  # and in an image editor
    assert [(i.mime, bytes(i.data)) for i in x11.read(1 << 20)] == [(TEXT_MIME, b"caption"),
                                                                   (PNG_MIME, image)]


LATIN1 = "\u00fcn\u00efc\u00f8d\u00e9 \u00e0 la Latin-1\r\n"


@pytest.mark.parametrize(("text", "as_string"), [
    ("em dash \u2014 block \u2588\u2593 emoji \U0001f98a\U0001f600".encode(), None),  # beyond Latin-1
    (b"line one\r\nline two\r\n\r\n", b"line one\r\nline two\r\n\r\n"),
    (LATIN1.encode(), LATIN1.encode("latin-1")),
], ids=["multibyte", "crlf", "latin1"])
def test_x11_text_is_byte_exact(x11: X11Clipboard, xclip_out: XclipOut, text: bytes,
                                as_string: bytes | None) -> None:
    x11.write([ClipItem(TEXT_MIME, text)])
    assert xclip_out("UTF8_STRING") == text
    assert xclip_out(TEXT_MIME) == text
    assert xclip_out("STRING") == as_string  # ICCCM's STRING is Latin-1


def test_x11_10_mib_of_text_and_a_5_mib_image_in_one_paste(x11: X11Clipboard, xclip_out: XclipOut) -> None:
    line = "0123456789 abcdefghijklmnopqrstuvwxyz \u2014 ivclip\r\n".encode()
    text = (line * ((10 << 20) // len(line) + 1))[: 10 << 20]
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(5 << 20)
    x11.write([ClipItem(TEXT_MIME, text), ClipItem(PNG_MIME, image)])
    assert xclip_out("UTF8_STRING") == text  # both well over one request: INCR
    assert xclip_out("image/png") == image


def test_x11_withdraw_clears_our_paste_but_not_a_later_copy(x11: X11Clipboard, xserver: XServer,
                                                            xclip_out: XclipOut) -> None:
    x11.write([ClipItem(TEXT_MIME, b"ours")])
    assert x11.withdraw()
    assert xclip_out("TARGETS") is None  # nobody owns the clipboard now
    assert not x11.withdraw()
    x11.write([ClipItem(TEXT_MIME, b"ours again")])
    other = subprocess.Popen(["xclip", "-display", xserver.display, "-quiet", "-selection", "clipboard",
                              "-i", "-t", "UTF8_STRING"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert other.stdin is not None
        other.stdin.write(b"the user's own copy")
        other.stdin.close()
        deadline = time.monotonic() + 10
        while x11._server.serving and time.monotonic() < deadline:
            time.sleep(0.02)  # our owner exits when the other client takes the selection
        assert not x11._server.serving
        assert not x11.withdraw()
        assert xclip_out("UTF8_STRING") == b"the user's own copy"
    finally:
        other.kill()
        other.wait()


def test_x11_without_python_xlib_xclip_serves_one_type(xserver: XServer, xclip_out: XclipOut) -> None:
    clip = X11Clipboard(display=xserver.display, owner=False)
    try:
        clip.write([ClipItem(PNG_MIME, b"\x89PNG"), ClipItem(TEXT_MIME, b"text wins")])
        deadline = time.monotonic() + 10  # xclip owns the selection once it has read its input
        while xclip_out("UTF8_STRING") != b"text wins" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (xclip_out("TARGETS") or b"").split() == [b"TARGETS", b"UTF8_STRING"]
    finally:
        clip.close()


def test_x11_owner_on_a_missing_display_is_a_clear_error() -> None:
    pytest.importorskip("Xlib", reason="python-xlib not installed (pip install -e '.[desktop]')")
    clip = X11Clipboard(display=":9999")
    with pytest.raises(ClipboardError, match=r"the X11 clipboard owner exited with status 1: cannot open "
                                             r"the X display ':9999'"):
        clip.write([ClipItem(TEXT_MIME, b"x")])
    assert not clip.withdraw()


FAKE_OWNER = """#!{python}
import sys, time
mode = sys.argv[1]
if mode == "reads-nothing":
    time.sleep(60)
data = sys.stdin.buffer.read()
if mode == "error":
    print("error: the display is on fire", flush=True)
    sys.exit(1)
time.sleep(60)  # "silent": reads everything, never says it owns the selection
"""


@pytest.mark.parametrize(("mode", "message"), [
    ("reads-nothing", "fake owner did not read the paste within 0.5 s"),
    ("silent", "fake owner did not take the clipboard within 0.5 s"),
    ("error", "fake owner exited with status 1: the display is on fire"),
])
def test_a_paste_is_installed_within_its_deadline_or_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, message: str) -> None:
    monkeypatch.setattr(clipboard, "WRITE_TIMEOUT_S", 0.5)
    server = clipboard._ServingTool()
    argv = [_script(tmp_path / "owner", FAKE_OWNER), mode]
    started = time.monotonic()
    with pytest.raises(ClipboardError, match=f"^{message}$"):
        server.start(argv, bytes(1 << 20), label="fake owner", reports_ready=True)  # over a pipe's buffer
    assert time.monotonic() - started < 5
    assert not server.serving and not server.stop()


def test_an_owner_exiting_unsupported_is_told_apart(tmp_path: Path) -> None:
    owner = _script(tmp_path / "owner", """#!{python}
import sys
sys.stdin.buffer.read()
print("error: no data-control protocol here", flush=True)
sys.exit(3)
""")
    server = clipboard._ServingTool()
    with pytest.raises(ClipboardUnsupported, match=r"^no data-control protocol here$"):
        server.start([owner], b"paste", label="fake owner", reports_ready=True)
    assert not server.serving


def test_x11_without_a_display_is_a_clear_error(tmp_path: Path) -> None:
    if shutil.which("xclip") is None:
        pytest.skip("xclip not installed (apt-get install xclip)")
    clip = X11Clipboard(display=":9999")
    with pytest.raises(ClipboardError, match="display"):
        clip.read(10)


@pytest.mark.parametrize(("level", "logged"), [(logging.INFO, True), (logging.WARNING, False)])
def test_the_owner_logs_at_the_drivers_level(wayland: WaylandClipboard, caplog: pytest.LogCaptureFixture,
                                             capfd: pytest.CaptureFixture[str], level: int,
                                             logged: bool) -> None:
    caplog.set_level(level, "guestdrv")
    wayland.write([ClipItem(TEXT_MIME, b"quiet or not")])
    assert ("guestdrv.wlowner INFO: took the clipboard" in capfd.readouterr().err) is logged
