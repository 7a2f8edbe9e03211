"""Host hotkeys under Xvfb: real key presses (xdotool, through the X server), windows that
look like alice's and bob's viewers, a fake broker that records gestures, and a real
notification receiver on a private D-Bus session.

No assertion depends on timing: after the combinations under test, the test types a
marker key into the same window and waits for it, so every event caused by the earlier
keys has been delivered by then (the X server keeps their order); and the daemon handles
events in order too, so a gesture recorded after a refused one proves the refusal.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.lab import NotificationReceiver, SessionBus, XServer
from control.framing import FrameDecoder, encode_frame

MISSING = [tool for tool in ("Xvfb", "xdotool", "dbus-daemon") if shutil.which(tool) is None]
try:
    import jeepney  # noqa: F401
    import Xlib  # noqa: F401
except ImportError as exc:
    MISSING.append(f"{exc.name} (pip install -e '.[desktop]')")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing: {', '.join(MISSING)} "
                                "(apt-get install xvfb xdotool dbus)")

WINDOW = r'''
import sys
from Xlib import X, XK, Xatom, display
d = display.Display()
win = d.screen().root.create_window(0, 0, 200, 100, 0, d.screen().root_depth,
                                    event_mask=X.KeyPressMask | X.KeyReleaseMask)
win.set_wm_class(sys.argv[1], sys.argv[2])
win.set_wm_name(sys.argv[3])
win.change_property(d.intern_atom("_NET_WM_NAME"), d.intern_atom("UTF8_STRING"), 8, sys.argv[3].encode())
win.map()
d.sync()
print("ready", win.id, flush=True)
while True:
    ev = d.next_event()
    if ev.type in (X.KeyPress, X.KeyRelease):
        name = XK.keysym_to_string(d.keycode_to_keysym(ev.detail, 0)) or str(ev.detail)
        print("press" if ev.type == X.KeyPress else "release", name, flush=True)
'''


class Window:
    """A tiny X client that looks like a viewer window and reports the keys it receives."""

    def __init__(self, xserver: XServer, wm_class: tuple[str, str], title: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WINDOW, *wm_class, title],
                                     stdout=subprocess.PIPE, text=True, env=xserver.env())
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        assert ready[:1] == ["ready"], f"the test window did not start: {ready}"
        self.id = ready[1]
        self.events: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(line.strip())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class FakeBroker:
    """Listens like the broker's control socket; records each gesture and answers ok."""

    def __init__(self, path: Path) -> None:
        self.gestures: list[tuple[str, str]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                decoder = FrameDecoder(0)
                frame = None
                while frame is None:
                    data = conn.recv(4096)
                    if not data:
                        break
                    decoder.feed(data)
                    frame = decoder.next_frame()
                if frame is None:
                    continue
                op, vm = frame.header["op"], frame.header["vm"]
                self.gestures.append((op, vm))
                conn.sendall(encode_frame({"ok": True, "message": f"fake {op} {vm}"}))

    def close(self) -> None:
        self.server.close()


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Desk:
    def __init__(self, tmp: Path, xserver: XServer, bus: SessionBus) -> None:
        self.tmp = tmp
        self.xserver = xserver
        self.bus = bus
        self.broker = FakeBroker(tmp / "broker.sock")
        self.receiver = NotificationReceiver(bus.address)
        self.alice = Window(xserver, ("virt-viewer", "Virt-viewer"), "alice - Virt Viewer")
        self.bob = Window(xserver, ("qemu-system-x86_64", "Qemu-system-x86_64"), "QEMU (bob)")
        # A host program whose title imitates bob's console: the class gives it away.
        self.impostor = Window(xserver, ("xterm", "XTerm"), "QEMU (bob)")
        self.daemons: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return self.xserver.env(DBUS_SESSION_BUS_ADDRESS=self.bus.address)

    def hotkeys(self, *args: str, log: str = "hotkeys.log") -> subprocess.Popen[bytes]:
        log_path = self.tmp / log
        with log_path.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "broker", "hotkeys", "--socket",
                                     str(self.tmp / "broker.sock"), "--log-level", "debug", *args],
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env())
        self.daemons.append(proc)
        wait_until(lambda: "hotkeys ready" in log_path.read_text() or proc.poll() is not None,
                   "the hotkeys daemon")
        assert proc.poll() is None, log_path.read_text()
        return proc

    def press(self, window: Window, *keys: str) -> None:
        """Focus `window`, type `keys`, then a marker key, and wait until the marker arrived."""
        marker = len([e for e in window.events if e == "release x"]) + 1
        subprocess.run(["xdotool", "windowfocus", "--sync", window.id], check=True, env=self.env())
        subprocess.run(["xdotool", "key", "--clearmodifiers", *keys, "x"], check=True, env=self.env())
        wait_until(lambda: window.events.count("release x") >= marker, "the marker key")

    def close(self) -> None:
        for proc in self.daemons:
            proc.terminate()
            proc.wait(10)
        for window in (self.alice, self.bob, self.impostor):
            window.close()
        self.receiver.close()
        self.broker.close()


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    with XServer() as xserver, SessionBus() as bus:
        desk = Desk(tmp_path, xserver, bus)
        try:
            yield desk
        finally:
            desk.close()


def keys_seen(window: Window, letter: str) -> list[str]:
    return [e for e in window.events if e.split()[-1].lower() == letter]


def test_combinations_become_gestures_for_the_focused_vm_and_are_swallowed(desk: Desk) -> None:
    desk.hotkeys("--focus-guard-ms", "0")
    desk.press(desk.alice, "ctrl+shift+c")
    desk.press(desk.bob, "ctrl+shift+v")
    wait_until(lambda: len(desk.broker.gestures) == 2, "two gestures")
    assert desk.broker.gestures == [("copy", "alice"), ("paste", "bob")]
    # The windows got the marker key but neither the press nor the release of C or V.
    assert keys_seen(desk.alice, "c") == [] and keys_seen(desk.bob, "v") == []
    assert keys_seen(desk.alice, "x") == ["press x", "release x"]
    # A plain C still reaches the window: the grab is for the combination alone.
    desk.press(desk.alice, "c")
    assert keys_seen(desk.alice, "c") == ["press c", "release c"]
    notes = desk.receiver.wait_for(2)
    assert notes[:2] == [("ivclip copy", "fake copy alice", 1), ("ivclip paste", "fake paste bob", 1)]


def test_a_window_of_no_vm_gets_nothing_and_one_notification(desk: Desk) -> None:
    desk.hotkeys("--focus-guard-ms", "0")
    desk.press(desk.impostor, "ctrl+shift+v")
    desk.press(desk.alice, "ctrl+shift+c")  # handled after the impostor's: proves it sent none
    wait_until(lambda: len(desk.broker.gestures) == 1, "the gesture")
    assert desk.broker.gestures == [("copy", "alice")]
    assert keys_seen(desk.impostor, "v") == []  # swallowed all the same
    notes = desk.receiver.wait_for(2)
    assert notes[0] == ("ivclip paste", "nothing done: the focused window belongs to no VM "
                        "(window of class xterm/XTerm)", 2)
    assert notes[1] == ("ivclip copy", "fake copy alice", 1)
    assert len(notes) == 2


def test_paste_into_a_freshly_focused_window_is_refused(desk: Desk) -> None:
    desk.hotkeys("--focus-guard-ms", "60000")  # every focus change is "just now"
    desk.press(desk.bob, "ctrl+shift+v")
    desk.press(desk.bob, "ctrl+shift+c")  # copies are not guarded: proves the paste was handled
    wait_until(lambda: len(desk.broker.gestures) == 1, "the copy")
    assert desk.broker.gestures == [("copy", "bob")]
    notes = desk.receiver.wait_for(2)
    assert notes[0][0] == "ivclip paste" and notes[0][1].startswith("refused: focus changed")
    assert notes[0][2] == 2


def test_configured_and_disabled_combinations(desk: Desk) -> None:
    desk.hotkeys("--copy", "none", "--paste", "ctrl+alt+p", "--focus-guard-ms", "0")
    desk.press(desk.alice, "ctrl+shift+c")  # disabled: an ordinary key press for alice
    desk.press(desk.bob, "ctrl+alt+p")
    wait_until(lambda: len(desk.broker.gestures) == 1, "the paste")
    assert desk.broker.gestures == [("paste", "bob")]
    assert keys_seen(desk.alice, "c") == ["press c", "release c"]
    assert keys_seen(desk.bob, "p") == []


def test_a_second_daemon_cannot_take_the_combinations(desk: Desk) -> None:
    desk.hotkeys()
    result = subprocess.run([sys.executable, "-m", "broker", "hotkeys"], capture_output=True,
                            text=True, env=desk.env(), timeout=60)
    assert result.returncode == 1
    assert "ctrl+shift+c is already grabbed by another program" in result.stderr
    assert "Traceback" not in result.stderr


def test_copy_and_paste_focused(desk: Desk) -> None:
    desk.press(desk.bob)
    result = subprocess.run([sys.executable, "-m", "broker", "paste", "--focused", "--socket",
                             str(desk.tmp / "broker.sock")], capture_output=True, text=True,
                            env=desk.env(), timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "fake paste bob")
    desk.press(desk.impostor)
    result = subprocess.run([sys.executable, "-m", "broker", "copy", "--focused", "--socket",
                             str(desk.tmp / "broker.sock")], capture_output=True, text=True,
                            env=desk.env(), timeout=60)
    assert result.returncode == 1
    assert "the focused window belongs to no VM (window of class xterm/XTerm)" in result.stderr
    assert desk.broker.gestures == [("paste", "bob")]


def test_gesture_commands_notify_on_request(desk: Desk) -> None:
    for args in (["copy", "alice", "--notify"], ["paste", "--focused", "--notify"]):
        desk.press(desk.impostor)
        result = subprocess.run([sys.executable, "-m", "broker", *args, "--socket",
                                 str(desk.tmp / "broker.sock")], capture_output=True, text=True,
                                env=desk.env(), timeout=60)
        assert "Traceback" not in result.stderr
    assert desk.receiver.wait_for(2) == [
        ("ivclip copy", "fake copy alice", 1),
        ("ivclip paste",
         "the focused window belongs to no VM (window of class xterm/XTerm); nothing done", 2),
    ]
    assert result.stderr.count("belongs to no VM") == 1  # printed once, not logged again


@pytest.mark.parametrize(("args", "env", "message"), [
    (["hotkeys", "--copy", "none", "--paste", "off"], {}, "both the copy and the paste combination"),
    (["hotkeys", "--copy", "ctrl+nosuchkey"], {}, "unknown key 'nosuchkey'"),
    (["hotkeys", "--copy", "c"], {}, "has no modifier"),
    (["hotkeys", "--copy", "hyper+c"], {}, "unknown modifier 'hyper'"),
    (["hotkeys"], {"WAYLAND_DISPLAY": "wayland-0", "SWAYSOCK": ""}, "$SWAYSOCK is not set"),
    (["copy", "--focused"], {"WAYLAND_DISPLAY": "wayland-0", "SWAYSOCK": ""}, "this is a Wayland session"),
    (["copy", "--focused"], {"WAYLAND_DISPLAY": "wayland-0", "SWAYSOCK": "/nonexistent/sway.sock"},
     "cannot reach sway at /nonexistent/sway.sock"),
    (["copy", "--focused"], {"DISPLAY": ""}, "no X display"),
    (["copy"], {}, "name the VM or give --focused"),
    (["copy", "alice", "--focused"], {}, "give a VM or --focused, not both"),
    (["hotkeys", "--window-map", "/nonexistent.toml"], {}, "cannot read /nonexistent.toml"),
])
def test_bad_settings_get_a_clear_message(desk: Desk, args: list[str], env: dict[str, str],
                                          message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "broker", *args, "--socket",
                             str(desk.tmp / "broker.sock")], capture_output=True, text=True,
                            env={**desk.env(), **env}, timeout=60)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert desk.broker.gestures == []
