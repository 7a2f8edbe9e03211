"""Gestures on a real sway host: sway binds the keys, `broker hotkeys` turns them into gestures.

A headless sway with two foot terminals dressed as viewer windows (alice's
remote-viewer and bob's virt-viewer, by app_id and title), wtype pressing the
keys through sway's virtual keyboard, host-process guests with the headless
clipboard, and the real broker.  Each terminal writes every byte it receives
from the keyboard to a file, which shows that the VM window never sees the
gesture keys but does see ordinary typing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import sway
from broker.audit import read_audit
from broker.lab import HostLab, SwaySession
from broker.windows import DEFAULT_RULES

MISSING = [tool for tool in ("sway", "swaymsg", "foot", "wtype") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=(
    f"{', '.join(MISSING)} not installed (apt-get install --no-install-recommends sway foot wtype)"))

SWAY_CONFIG = """\
bindsym Ctrl+Shift+c nop ivclip copy
bindsym Ctrl+Shift+v nop ivclip paste
"""
# foot's own clipboard keys off, so a Ctrl-Shift-V reaching the window would show as ^V.
FOOT_CONFIG = """\
[key-bindings]
clipboard-copy=none
clipboard-paste=none
primary-paste=none
"""
WINDOWS = {"alice": ("remote-viewer", "alice - Remote Viewer"), "bob": ("virt-viewer", "bob - Virt Viewer")}


def wait_for(ready: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class SwayDesk:
    def __init__(self, lab: HostLab, session: SwaySession, workdir: Path) -> None:
        self.lab = lab
        self.session = session
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def open_viewer(self, vm: str) -> None:
        app_id, title = WINDOWS[vm]
        config = self.workdir / "foot.ini"
        config.write_text(FOOT_CONFIG)
        keys = self.keys_file(vm)
        self.procs.append(subprocess.Popen(
            ["foot", "-c", str(config), f"--app-id={app_id}", f"--title={title}", "sh", "-c",
             f"stty raw -echo; exec cat > {keys}"],
            env=self.session.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: keys.exists(), f"{vm}'s window")

    def keys_file(self, vm: str) -> Path:
        return self.workdir / f"{vm}.keys"

    def focus(self, vm: str) -> None:
        self.session.command(f'[app_id="{WINDOWS[vm][0]}"] focus')
        wait_for(lambda: (w := sway.focused_window(sway.get_tree(self.session.ipc_socket), DEFAULT_RULES))
                 and w.vm == vm, f"{vm}'s window to have the focus")

    def press(self, *args: str) -> None:
        subprocess.run(["wtype", *args], env=self.session.env(), check=True, timeout=20)

    def gestures(self) -> list[dict[str, Any]]:
        return [r for r in read_audit(self.lab.audit_path) if r.get("gesture") in ("copy", "paste")] \
            if self.lab.audit_path.exists() else []

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwayDesk]:
    workdir = tmp_path_factory.mktemp("sway")
    with SwaySession(workdir, SWAY_CONFIG) as session, HostLab(["alice", "bob"], workdir) as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm, "--clipboard", "headless")
        lab.wait_attached(["alice", "bob"])
        desk = SwayDesk(lab, session, workdir)
        hotkeys = subprocess.Popen(
            [sys.executable, "-m", "broker", "hotkeys", "--socket", str(lab.socket), "--no-notify",
             "--log-level", "debug"],
            env=session.env(), stdout=(workdir / "hotkeys.log").open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "hotkeys ready under sway" in (workdir / "hotkeys.log").read_text(),
                     "the hotkeys daemon")
            for vm in WINDOWS:
                desk.open_viewer(vm)
            yield desk
        finally:
            hotkeys.terminate()
            assert hotkeys.wait(10) == 0, (workdir / "hotkeys.log").read_text()
            desk.close()


def test_copy_in_alice_and_paste_in_bob_through_sways_bindings(desk: SwayDesk) -> None:
    secret = b"alice's secret " + os.urandom(8).hex().encode()
    assert desk.lab.guest_cmd("alice", "copy", input=secret).returncode == 0
    desk.focus("alice")
    time.sleep(0.6)
    desk.press("-M", "ctrl", "-M", "shift", "c", "-m", "shift", "-m", "ctrl")
    wait_for(lambda: [g for g in desk.gestures() if g["gesture"] == "copy"], "the copy gesture")
    # bob's window just got the focus: the paste is refused by the focus guard ...
    desk.focus("bob")
    desk.press("-M", "ctrl", "-M", "shift", "v", "-m", "shift", "-m", "ctrl")
    wait_for(lambda: "focus changed" in (desk.workdir / "hotkeys.log").read_text(), "the guard's refusal")
    assert [g["gesture"] for g in desk.gestures()] == ["copy"]
    # ... and goes through once the focus has settled.
    time.sleep(0.6)
    desk.press("-M", "ctrl", "-M", "shift", "v", "-m", "shift", "-m", "ctrl")
    wait_for(lambda: [g for g in desk.gestures() if g["gesture"] == "paste"], "the paste gesture")
    assert [(g["gesture"], g["target"], g["outcome"]) for g in desk.gestures()] == [
        ("copy", "clipboard", "ok"), ("paste", "bob", "ok")]
    assert desk.lab.guest_cmd("bob", "paste").stdout == secret
    # Ordinary typing reaches the window; the gesture keys never did (a Ctrl-Shift-V that
    # reached it would show as ^V).  A client can miss the first key of a new virtual
    # keyboard (each wtype is one) while it takes the keymap, so type until one arrives.
    for _ in range(20):
        desk.press("z")
        time.sleep(0.2)
        if desk.keys_file("bob").read_bytes():
            break
    typed = desk.keys_file("bob").read_bytes()
    assert typed and typed == b"z" * len(typed), typed
    assert desk.keys_file("alice").read_bytes() == b""


def test_a_window_of_no_vm_gets_no_gesture(desk: SwayDesk) -> None:
    before = len(desk.gestures())
    desk.session.command("workspace 2")  # an empty workspace: no window has the focus
    desk.press("-M", "ctrl", "-M", "shift", "c", "-m", "shift", "-m", "ctrl")
    wait_for(lambda: "belongs to no VM (no window)" in (desk.workdir / "hotkeys.log").read_text(),
             "the daemon to say so")
    assert len(desk.gestures()) == before
    desk.session.command("workspace 1")


@pytest.mark.parametrize(("args", "words"), [
    ([], "another hotkeys daemon for this sway session is already running"),
    (["--copy", "ctrl+alt+c"], "under sway the keys are bound in sway's config"),
])
def test_a_second_daemon_and_x11_key_options_are_refused(desk: SwayDesk, args: list[str], words: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "hotkeys", "--socket", str(desk.lab.socket), "--no-notify", *args],
        env=desk.session.env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
