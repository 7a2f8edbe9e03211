"""Guest clipboard backends.  Headless for now: the clipboard lives in the driver."""

from __future__ import annotations

from typing import Protocol


class ClipboardBackend(Protocol):
    def get(self) -> bytes | None: ...
    def set(self, data: bytes) -> None: ...


class HeadlessClipboard:
    """An in-memory clipboard, set by ``guestdrv copy`` and read by ``guestdrv paste``."""

    def __init__(self) -> None:
        self._data: bytes | None = None

    def get(self) -> bytes | None:
        return self._data

    def set(self, data: bytes) -> None:
        self._data = data
