"""The focused VM window on a sway (Wayland) host, through sway's IPC socket.

A Wayland compositor tells ordinary clients nothing about other windows, but
sway answers on its IPC socket (``$SWAYSOCK``, the i3 IPC protocol): the
tree of outputs, workspaces and windows, with ``focused`` set on the one
window that has the focus.  A native Wayland window has an ``app_id``; an
XWayland window has ``window_properties`` with its WM_CLASS.  Either goes
through the same window rules as on X11 (broker.windows), with the title.

The wire format, both ways: the 6 bytes ``i3-ipc``, the payload length and
the message type as native-endian u32, then the JSON payload.  The parsing
here is pure (bytes in, values out); :func:`focused_vm` does the I/O.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.errors import ConfigError
from broker.windows import WindowRule, vm_for_window

MAGIC = b"i3-ipc"
HEADER = struct.Struct("=6sII")
GET_TREE = 4
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
    if message_type != expected_type:
        raise ConfigError(f"sway answered message type {message_type}, not {expected_type}")
    if length > MAX_REPLY:
        raise ConfigError(f"sway's reply of {length} bytes is over {MAX_REPLY}")
    return int(length)


@dataclass(frozen=True, slots=True)
class SwayWindow:
    classes: tuple[str, ...]  # app_id, or WM_CLASS instance and class under XWayland
    title: str
    vm: str | None

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


def focused_window(tree: object, rules: Sequence[WindowRule]) -> SwayWindow | None:
    """The focused window in a GET_TREE reply, and its VM; None when no window has the focus
    (an empty workspace, or the focus on an output or workspace)."""
    if not isinstance(tree, dict):
        return None
    for node in _nodes(tree):
        if node.get("focused") is not True or node.get("type") not in ("con", "floating_con"):
            continue
        classes: list[str] = []
        app_id = node.get("app_id")
        if isinstance(app_id, str) and app_id:
            classes.append(app_id)
        props = node.get("window_properties")
        if isinstance(props, dict):
            classes += [v for k in ("instance", "class") if isinstance(v := props.get(k), str) and v]
        title = node.get("name")
        title = title[:1024] if isinstance(title, str) else ""
        return SwayWindow(tuple(classes), title, vm_for_window(classes, title, rules))
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
