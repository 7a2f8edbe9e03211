"""The focused VM window and the gesture keys on a sway (Wayland) host, through sway's IPC.

A Wayland compositor tells ordinary clients nothing about other windows, but
sway answers on its IPC socket (``$SWAYSOCK``, the i3 IPC protocol): the
tree of outputs, workspaces and windows, with ``focused`` set on the one
window that has the focus.  A native Wayland window has an ``app_id``; an
XWayland window has ``window_properties`` with its WM_CLASS.  Either goes
through the same window rules as on X11 (broker.windows), with the title.

The wire format, both ways: the 6 bytes ``i3-ipc``, the payload length and
the message type as native-endian u32, then the JSON payload.  The parsing
here is pure (bytes in, values out); :func:`focused_vm` does the I/O.

:class:`SwayHotkeys` is ``python -m broker hotkeys`` under sway.  No Wayland
client may grab keys, so sway's own configuration binds them to commands that
do nothing::

    bindsym Ctrl+Shift+c nop ivclip copy
    bindsym Ctrl+Shift+v nop ivclip paste

and the daemon subscribes to sway's ``binding`` events (sent when a key
binding runs, never for a command another program sends over IPC) and
``window`` events (the focus, with the moment it moved, for the focus guard).
sway consumes a bound key, so the VM's window sees neither press nor release.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.errors import ConfigError
from broker.hotkeys import DEFAULT_FOCUS_GUARD_S, GestureSender, StoppableLoop, perform_gesture
from broker.notify import Notifier
from broker.windows import WindowRule, vm_for_window

log = logging.getLogger(__name__)

MAGIC = b"i3-ipc"
HEADER = struct.Struct("=6sII")
SUBSCRIBE = 2
GET_TREE = 4
EVENT = 1 << 31
WINDOW_EVENT = EVENT | 3
BINDING_EVENT = EVENT | 5
COMMANDS = {"nop ivclip copy": "copy", "nop ivclip paste": "paste"}
"""The commands sway's key bindings run for the gestures (sway's ``nop`` does nothing)."""
MAX_REPLY = 32 << 20
"""A tree of thousands of windows is a few MiB; a larger reply is refused, not read."""
TIMEOUT_S = 2.0


def encode_request(message_type: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, len(payload), message_type) + payload


def parse_reply_header(header: bytes, expected_type: int) -> int:
    """The payload length a reply header announces.

    Raises:
        ConfigError: not an i3 IPC reply of `expected_type`, or too large.
    """
    magic, length, message_type = HEADER.unpack(header)
    if magic != MAGIC:
        raise ConfigError("the sway IPC socket answered something that is not i3 IPC")
    if message_type != expected_type and expected_type >= 0:
        raise ConfigError(f"sway answered message type {message_type}, not {expected_type}")
    if length > MAX_REPLY:
        raise ConfigError(f"sway's reply of {length} bytes is over {MAX_REPLY}")
    return int(length)


class MessageDecoder:
    """Splits the stream of an IPC connection into (type, JSON payload) messages (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        """Raises:
        ConfigError: the stream is not i3 IPC, a message is too large or not JSON.
        """
        self._buffer += data
        messages: list[tuple[int, object]] = []
        while len(self._buffer) >= HEADER.size:
            length = parse_reply_header(bytes(self._buffer[: HEADER.size]), -1)
            if len(self._buffer) < HEADER.size + length:
                break
            message_type = HEADER.unpack_from(self._buffer)[2]
            payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            try:
                messages.append((message_type, json.loads(payload)))
            except (ValueError, RecursionError):
                raise ConfigError(f"sway sent a message of type {message_type:#x} that is not JSON") from None
        return messages


@dataclass(frozen=True, slots=True)
class SwayWindow:
    classes: tuple[str, ...]  # app_id, or WM_CLASS instance and class under XWayland
    title: str
    vm: str | None
    id: int | None = None  # sway's container id

    def describe(self) -> str:
        return f"window of app_id/class {'/'.join(self.classes) or 'none'}"


def _nodes(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for key in ("floating_nodes", "nodes"):
            children = current.get(key)
            if isinstance(children, list):
                stack.extend(child for child in children if isinstance(child, dict))


def describe_window(node: Mapping[str, Any], rules: Sequence[WindowRule]) -> SwayWindow:
    """A window node of the tree (or of a window event), and its VM."""
    classes: list[str] = []
    app_id = node.get("app_id")
    if isinstance(app_id, str) and app_id:
        classes.append(app_id)
    props = node.get("window_properties")
    if isinstance(props, dict):
        classes += [v for k in ("instance", "class") if isinstance(v := props.get(k), str) and v]
    title = node.get("name")
    title = title[:1024] if isinstance(title, str) else ""
    con_id = node.get("id")
    return SwayWindow(tuple(classes), title, vm_for_window(classes, title, rules),
                      con_id if isinstance(con_id, int) and not isinstance(con_id, bool) else None)


def focused_window(tree: object, rules: Sequence[WindowRule]) -> SwayWindow | None:
    """The focused window in a GET_TREE reply, and its VM; None when no window has the focus
    (an empty workspace, or the focus on an output or workspace)."""
    if not isinstance(tree, dict):
        return None
    for node in _nodes(tree):
        if node.get("focused") is True and node.get("type") in ("con", "floating_con"):
            return describe_window(node, rules)
    return None


def _receive(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConfigError("sway closed its IPC socket before answering")
        data += chunk
    return bytes(data)


def get_tree(socket_path: str) -> object:
    """Ask sway at `socket_path` for its tree.

    Raises:
        ConfigError: sway cannot be reached, does not answer in time, or answers garbage.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(TIMEOUT_S)
            conn.connect(socket_path)
            conn.sendall(encode_request(GET_TREE))
            length = parse_reply_header(_receive(conn, HEADER.size), GET_TREE)
            payload = _receive(conn, length)
    except TimeoutError:
        raise ConfigError(f"sway did not answer on {socket_path} within {TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise ConfigError(f"cannot reach sway at {socket_path}: {exc.strerror or exc}") from None
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise ConfigError("sway's tree is not valid JSON") from None


def focused_vm(socket_path: str, rules: Sequence[WindowRule]) -> str:
    """The VM whose window has the focus in the sway session at `socket_path`.

    Raises:
        ConfigError: sway cannot be asked, or the focused window belongs to no VM.
    """
    focused = focused_window(get_tree(socket_path), rules)
    if focused is None or focused.vm is None:
        what = focused.describe() if focused else "no window has the focus"
        raise ConfigError(f"the focused window belongs to no VM ({what}); nothing done")
    return focused.vm


class SwayHotkeys(StoppableLoop):
    """``python -m broker hotkeys`` under sway: gestures from sway's key bindings."""

    def __init__(self, *, socket_path: str, rules: Sequence[WindowRule], send: GestureSender,
                 notifier: Notifier, focus_guard_s: float = DEFAULT_FOCUS_GUARD_S) -> None:
        """Raises:
        ConfigError: sway cannot be reached or refuses the subscription.
        """
        self.socket_path = socket_path
        self.rules = rules
        self.send = send
        self.notifier = notifier
        self.focus_guard_s = focus_guard_s
        self.gestures = 0
        self._focus = focused_window(get_tree(socket_path), rules)
        self._focus_since = time.monotonic()
        self._decoder = MessageDecoder()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        super().__init__()
        try:
            self._subscribe()
        except BaseException:
            self.close()
            raise

    def _subscribe(self) -> None:
        try:
            self._conn.settimeout(TIMEOUT_S)
            self._conn.connect(self.socket_path)
            self._conn.sendall(encode_request(SUBSCRIBE, json.dumps(["window", "binding"]).encode()))
            length = parse_reply_header(_receive(self._conn, HEADER.size), SUBSCRIBE)
            reply = json.loads(_receive(self._conn, length))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot subscribe to sway's events at {self.socket_path}: {exc}") from None
        if not isinstance(reply, dict) or reply.get("success") is not True:
            raise ConfigError(f"sway refused the event subscription: {reply!r:.200}")
        self._conn.setblocking(False)
        log.info("hotkeys ready under sway; bind the keys in sway's config: %s",
                 "; ".join(f"bindsym ... {command}" for command in COMMANDS))

    def run(self) -> None:
        """Serve until stopped.

        Raises:
            ConfigError: sway went away or sent something that is not i3 IPC.
        """
        while not self._stopping:
            ready, _, _ = select.select([self._conn.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self._conn.fileno() in ready:
                try:
                    data = self._conn.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise ConfigError(f"lost sway's IPC socket: {exc}") from None
                if not data:
                    raise ConfigError("sway closed its IPC socket (did sway exit?)")
                for message_type, payload in self._decoder.feed(data):
                    self.handle(message_type, payload, time.monotonic())

    def handle(self, message_type: int, payload: object, now: float) -> None:
        if not isinstance(payload, dict):
            return
        if message_type == WINDOW_EVENT:
            container = payload.get("container")
            if isinstance(container, dict):
                self._on_window(str(payload.get("change")), describe_window(container, self.rules), now)
        elif message_type == BINDING_EVENT and payload.get("change") == "run":
            binding = payload.get("binding")
            command = binding.get("command") if isinstance(binding, dict) else None
            op = COMMANDS.get(" ".join(command.split())) if isinstance(command, str) else None
            if op is not None:
                self.gesture(op, now)

    def _on_window(self, change: str, window: SwayWindow, now: float) -> None:
        same = self._focus is not None and window.id is not None and window.id == self._focus.id
        if change == "focus":
            if not same:
                self._focus_since = now
            self._focus = window
        elif same and change == "title":
            self._focus = window
        elif same and change == "close":
            self._focus = None
            self._focus_since = now

    def gesture(self, op: str, now: float) -> None:
        # The events say when the focus moved; the tree says where it is now (switching to
        # an empty workspace, say, sends no window event).
        try:
            focused = focused_window(get_tree(self.socket_path), self.rules)
        except ConfigError as exc:
            self.notifier.notify(f"ivclip {op}", f"nothing done: {exc}", ok=False)
            return
        if focused is None or self._focus is None or focused.id != self._focus.id:
            self._focus_since = now
        self._focus = focused
        what = focused.describe() if focused else "no window"
        if perform_gesture(op, focused.vm if focused else None, what, now - self._focus_since,
                           guard_s=self.focus_guard_s, send=self.send, notifier=self.notifier):
            self.gestures += 1

    def close(self) -> None:
        self._conn.close()
        self.close_wake_pipe()
        self.notifier.close()
