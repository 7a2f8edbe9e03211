"""Frames on the local control sockets (sans-IO).

A frame is one JSON object on one line, optionally followed by a raw body::

    {"op": "copy", "body_size": 5}\\n
    hello

The header is at most MAX_HEADER bytes (64 KiB: room for a status report of
hundreds of VMs, small enough to bound a hostile local client).  The body
limit is the caller's (the clipboard limit plus nothing).  Duplicate keys,
non-object headers and bodies over the limit are errors, never guesses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from control.errors import FrameError

MAX_HEADER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    header: dict[str, Any]
    body: bytes = field(default=b"", repr=False)


def encode_frame(header: dict[str, Any], body: bytes | bytearray | memoryview = b"") -> bytes:
    """Serialise a frame; `body_size` is set from the body."""
    header = dict(header)
    if len(body):
        header["body_size"] = len(body)
    else:
        header.pop("body_size", None)
    line = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_HEADER:
        raise FrameError(f"frame header of {len(line)} bytes exceeds {MAX_HEADER}")
    return line + bytes(body)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise FrameError(f"duplicate key {key!r} in request")
        result[key] = value
    return result


class FrameDecoder:
    """Feed bytes in, take whole frames out."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._header: dict[str, Any] | None = None
        self._body_size = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises:
            FrameError: the bytes so far cannot be a valid frame.
        """
        if self._header is None:
            end = self._buffer.find(b"\n", 0, MAX_HEADER + 1)
            if end < 0:
                if len(self._buffer) > MAX_HEADER:
                    raise FrameError(f"request header longer than {MAX_HEADER} bytes")
                return None
            try:
                header = json.loads(bytes(self._buffer[:end]), object_pairs_hook=_no_duplicates)
            except RecursionError:
                # "[[[[..." fits in MAX_HEADER and exhausts the parser's stack.
                raise FrameError("request is nested too deeply") from None
            except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of too many digits
                raise FrameError(f"request is not valid JSON: {exc}") from exc
            if not isinstance(header, dict):
                raise FrameError("request must be a JSON object")
            size = header.get("body_size", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise FrameError("body_size must be a non-negative integer")
            if size > self.max_body:
                raise FrameError(f"body of {size} bytes exceeds the limit of {self.max_body}")
            del self._buffer[: end + 1]
            self._header, self._body_size = header, size
        if len(self._buffer) < self._body_size:
            return None
        body = bytes(self._buffer[: self._body_size])
        del self._buffer[: self._body_size]
        frame = Frame(self._header, body)
        self._header, self._body_size = None, 0
        return frame

    @property
    def pending(self) -> int:
        return len(self._buffer)
