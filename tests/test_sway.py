"""broker.sway: the focused VM window on a sway host, against a stand-in sway IPC server."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import sway
from broker.cli import focused_session_vm
from broker.errors import ConfigError
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
