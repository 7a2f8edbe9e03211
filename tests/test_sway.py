"""broker.sway: the focused VM window on a sway host, against a stand-in sway IPC server."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from broker import sway
from broker.cli import focused_session_vm
from broker.errors import ConfigError
from broker.notify import Notifier
from broker.windows import DEFAULT_RULES


def window(focused: bool, *, app_id: str | None = None, title: str = "",
           x11: tuple[str, str] | None = None, floating: bool = False) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "floating_con" if floating else "con", "focused": focused,
                            "name": title, "app_id": app_id, "nodes": [], "floating_nodes": []}
    if x11 is not None:
        node["window_properties"] = {"instance": x11[0], "class": x11[1], "title": title}
    return node


def tree(*windows: dict[str, Any], floating: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The shape of sway's GET_TREE reply: root -> output -> workspace -> windows."""
    workspace = {"type": "workspace", "name": "1", "focused": False, "nodes": list(windows),
                 "floating_nodes": list(floating)}
    output = {"type": "output", "name": "HEADLESS-1", "focused": False, "nodes": [workspace]}
    return {"type": "root", "name": "root", "focused": False, "nodes": [output], "floating_nodes": []}


@pytest.mark.parametrize(("the_tree", "vm"), [
    (tree(window(False, app_id="foot", title="~"),
          window(True, app_id="remote-viewer", title="alice - Remote Viewer")), "alice"),
    (tree(window(True, title="bob - Virt Viewer", x11=("virt-viewer", "Virt-viewer"))), "bob"),
    (tree(window(False, app_id="virt-manager", title="carol on QEMU/KVM"),
          floating=(window(True, app_id="qemu", title="QEMU (carol)", floating=True),)), "carol"),
    # A browser page titled like a console is not one: both class and title must match.
    (tree(window(True, app_id="firefox", title="QEMU (bob)")), None),
])
def test_the_focused_window_and_its_vm(the_tree: dict[str, Any], vm: str | None) -> None:
    found = sway.focused_window(the_tree, DEFAULT_RULES)
    assert found is not None and found.vm == vm


@pytest.mark.parametrize("odd", [
    None, [], "tree", {"nodes": "x"}, {"nodes": [1, None, {"focused": "yes", "type": "con"}]},
    tree(),  # an empty workspace: the focus is on no window
    {**tree(), "focused": True},  # the focus on the root (no window)
])
def test_odd_trees_give_no_window(odd: object) -> None:
    assert sway.focused_window(odd, DEFAULT_RULES) is None


def test_the_header_is_checked() -> None:
    request = sway.encode_request(sway.GET_TREE)
    assert request[:6] == b"i3-ipc" and len(request) == sway.HEADER.size
    assert sway.parse_reply_header(sway.HEADER.pack(b"i3-ipc", 42, 4), 4) == 42
    for bad, words in [(sway.HEADER.pack(b"HTTP/1", 1, 4), "not i3 IPC"),
                       (sway.HEADER.pack(b"i3-ipc", 1, 3), "message type 3"),
                       (sway.HEADER.pack(b"i3-ipc", sway.MAX_REPLY + 1, 4), "is over")]:
        with pytest.raises(ConfigError, match=words):
            sway.parse_reply_header(bad, 4)


class StandInSway(socketserver.UnixStreamServer):
    """Answers every request on a UNIX socket with one prepared reply, as sway's IPC would."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        super().__init__(str(path), _Answer)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Answer(socketserver.BaseRequestHandler):
    server: StandInSway

    def handle(self) -> None:
        self.server.requests.append(self.request.recv(sway.HEADER.size))
        self.request.sendall(self.server.reply)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[StandInSway]:
    payload = json.dumps(tree(window(True, app_id="remote-viewer", title="bob (1) - Remote Viewer"))).encode()
    server = StandInSway(tmp_path / "sway.sock", sway.HEADER.pack(b"i3-ipc", len(payload), 4) + payload)
    yield server
    server.close()


def test_focused_vm_asks_sway_when_in_a_sway_session(stand_in: StandInSway) -> None:
    environ = {"WAYLAND_DISPLAY": "wayland-1", "SWAYSOCK": str(stand_in.path)}
    assert focused_session_vm(list(DEFAULT_RULES), environ) == "bob"
    assert stand_in.requests == [sway.encode_request(sway.GET_TREE)]


@pytest.mark.parametrize(("reply", "words"), [
    (b"", "closed its IPC socket"),
    (sway.HEADER.pack(b"i3-ipc", 100, 4) + b"{", "closed its IPC socket"),
    (sway.HEADER.pack(b"i3-ipc", 1, 4) + b"{", "not valid JSON"),
    (sway.HEADER.pack(b"i3-ipc", 2, 4) + b"[]", "belongs to no VM (no window has the focus)"),
])
def test_a_bad_answer_gets_a_clear_error(tmp_path: Path, reply: bytes, words: str) -> None:
    server = StandInSway(tmp_path / "sway.sock", reply)
    try:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            sway.focused_vm(str(server.path), DEFAULT_RULES)
    finally:
        server.close()


def test_a_window_of_no_vm_is_named(tmp_path: Path) -> None:
    payload = json.dumps(tree(window(True, app_id="foot", title="~"))).encode()
    server = StandInSway(tmp_path / "sway.sock", sway.HEADER.pack(b"i3-ipc", len(payload), 4) + payload)
    try:
        with pytest.raises(ConfigError, match=r"belongs to no VM \(window of app_id/class foot\)"):
            sway.focused_vm(str(server.path), DEFAULT_RULES)
    finally:
        server.close()


# The hotkeys daemon under sway ------------------------------------------------------
class EventfulSway(socketserver.ThreadingUnixStreamServer):
    """A stand-in sway: answers GET_TREE with `tree`, accepts subscriptions, pushes events."""

    daemon_threads = True

    def __init__(self, path: Path, *, subscribe_ok: bool = True) -> None:
        self.tree: dict[str, Any] = tree()
        self.subscribe_ok = subscribe_ok
        self.subscribers: list[socket.socket] = []
        self.subscribed = threading.Event()
        super().__init__(str(path), _Sway)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def push(self, message_type: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        for conn in self.subscribers:
            conn.sendall(sway.HEADER.pack(b"i3-ipc", len(data), message_type & 0xFFFFFFFF) + data)

    def close(self) -> None:
        self.shutdown()
        for conn in self.subscribers:
            conn.close()
        self.server_close()


class _Sway(socketserver.BaseRequestHandler):
    server: EventfulSway

    def handle(self) -> None:
        _, length, message_type = sway.HEADER.unpack(self.request.recv(sway.HEADER.size))
        body = self.request.recv(length) if length else b""
        if message_type == sway.GET_TREE:
            reply: object = self.server.tree
        else:
            assert message_type == sway.SUBSCRIBE and json.loads(body) == ["window", "binding"]
            reply = {"success": self.server.subscribe_ok}
        data = json.dumps(reply).encode()
        self.request.sendall(sway.HEADER.pack(b"i3-ipc", len(data), message_type) + data)
        if message_type == sway.SUBSCRIBE:
            self.server.subscribers.append(self.request)
            self.server.subscribed.set()
            threading.Event().wait(30)  # keep the connection open for events


class Recorder:
    """Gestures sent and notifications shown, instead of a broker and a D-Bus service."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str, bool]] = []

    def send(self, op: str, vm: str) -> dict[str, Any]:
        self.sent.append((op, vm))
        return {"ok": True, "message": f"fake {op} {vm}"}

    def notify(self, summary: str, body: str, *, ok: bool) -> bool:
        self.notes.append((summary, body, ok))
        return True

    def close(self) -> None:
        pass


ALICE = window(True, app_id="remote-viewer", title="alice - Remote Viewer") | {"id": 11}
BOB = window(True, app_id="virt-viewer", title="bob - Virt Viewer") | {"id": 12}


def binding(command: str) -> dict[str, Any]:
    return {"change": "run", "binding": {"command": command, "symbol": "v", "event_state_mask": ["Ctrl"]}}


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[tuple[EventfulSway, Recorder, sway.SwayHotkeys]]:
    server = EventfulSway(tmp_path / "sway.sock")
    server.tree = tree(ALICE)
    recorder = Recorder()
    daemon = sway.SwayHotkeys(socket_path=str(server.server_address), rules=DEFAULT_RULES,
                              send=recorder.send, notifier=cast(Notifier, recorder), focus_guard_s=0.5)
    yield server, recorder, daemon
    daemon.close()
    server.close()


def test_bindings_become_gestures_for_the_focused_vm(desk: tuple[EventfulSway, Recorder, sway.SwayHotkeys]
                                                      ) -> None:
    _, recorder, daemon = desk
    start = time.monotonic()
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip copy"), start + 1)
    daemon.handle(sway.BINDING_EVENT, binding("nop   ivclip  paste"), start + 1)
    daemon.handle(sway.BINDING_EVENT, binding("exec foot"), start + 1)  # not ours
    daemon.handle(sway.BINDING_EVENT, {"change": "run", "binding": "nop ivclip copy"}, start + 1)
    assert recorder.sent == [("copy", "alice"), ("paste", "alice")]
    assert recorder.notes == [("ivclip copy", "fake copy alice", True),
                              ("ivclip paste", "fake paste alice", True)]


def test_a_paste_right_after_the_focus_moved_is_refused(desk: tuple[EventfulSway, Recorder, sway.SwayHotkeys]
                                                         ) -> None:
    server, recorder, daemon = desk
    start = time.monotonic()
    server.tree = tree(BOB)
    daemon.handle(sway.WINDOW_EVENT, {"change": "focus", "container": BOB}, start + 10)
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip paste"), start + 10.2)
    assert recorder.sent == []
    assert recorder.notes == [("ivclip paste", "refused: focus changed 200 ms ago (to bob's window); "
                                               "press the combination again to paste there", False)]
    # A title change of the same window is no focus change; the copy has no guard.
    daemon.handle(sway.WINDOW_EVENT, {"change": "title", "container": BOB}, start + 10.3)
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip copy"), start + 10.3)
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip paste"), start + 10.6)
    assert recorder.sent == [("copy", "bob"), ("paste", "bob")]


def test_the_tree_decides_where_the_focus_is_now(desk: tuple[EventfulSway, Recorder, sway.SwayHotkeys]
                                                  ) -> None:
    server, recorder, daemon = desk
    start = time.monotonic()
    server.tree = tree()  # the user switched to an empty workspace: sway sent no window event
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip paste"), start + 5)
    assert recorder.sent == []
    assert recorder.notes[-1] == ("ivclip paste", "nothing done: the focused window belongs to no VM "
                                                  "(no window)", False)
    # Back on alice's workspace, again without a window event: a focus change for the guard.
    server.tree = tree(ALICE)
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip paste"), start + 5.1)
    assert recorder.sent == [] and "focus changed 0 ms ago" in recorder.notes[-1][1]
    daemon.handle(sway.BINDING_EVENT, binding("nop ivclip paste"), start + 5.7)
    assert recorder.sent == [("paste", "alice")]


def test_the_daemon_serves_events_from_the_socket(desk: tuple[EventfulSway, Recorder, sway.SwayHotkeys]
                                                   ) -> None:
    server, recorder, daemon = desk
    daemon.focus_guard_s = 0.0
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert server.subscribed.wait(5)
        server.push(sway.BINDING_EVENT, binding("nop ivclip copy"))
        deadline = time.monotonic() + 5
        while not recorder.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.sent == [("copy", "alice")]
    finally:
        daemon.stop()
        runner.join(5)
    assert not runner.is_alive()


def test_garbage_from_sway_stops_the_daemon_with_a_clear_error(
    desk: tuple[EventfulSway, Recorder, sway.SwayHotkeys],
) -> None:
    server, _, daemon = desk
    assert server.subscribed.wait(5)
    server.subscribers[0].sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ConfigError, match="not i3 IPC"):
        daemon.run()


def test_a_refused_subscription_is_a_clear_error(tmp_path: Path) -> None:
    server = EventfulSway(tmp_path / "sway.sock", subscribe_ok=False)
    try:
        with pytest.raises(ConfigError, match="sway refused the event subscription"):
            sway.SwayHotkeys(socket_path=str(server.server_address), rules=DEFAULT_RULES,
                             send=Recorder().send, notifier=cast(Notifier, Recorder()))
    finally:
        server.close()


def test_the_decoder_splits_and_joins_messages() -> None:
    one = sway.HEADER.pack(b"i3-ipc", 2, sway.WINDOW_EVENT) + b"{}"
    two = sway.HEADER.pack(b"i3-ipc", 4, sway.BINDING_EVENT) + b"[1] "
    decoder = sway.MessageDecoder()
    stream = one + two
    got = [m for i in range(len(stream)) for m in decoder.feed(stream[i : i + 1])]
    assert got == [(sway.WINDOW_EVENT, {}), (sway.BINDING_EVENT, [1])]
    with pytest.raises(ConfigError, match="not JSON"):
        sway.MessageDecoder().feed(sway.HEADER.pack(b"i3-ipc", 1, sway.WINDOW_EVENT) + b"{")
