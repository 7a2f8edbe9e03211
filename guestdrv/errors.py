"""Errors of the guest driver's clipboard backends (see shm.errors for the whole tree)."""

from shm.errors import IvclipError


class ClipboardError(IvclipError):
    """The guest's clipboard (X11, Wayland) could not be read or set."""


class ClipboardTooLarge(ClipboardError):
    """The guest's clipboard holds more than the limit; `size` is a lower bound of its size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the clipboard holds at least {size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit
