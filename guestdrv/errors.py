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


class ClipboardUnsupported(ClipboardError):
    """The desktop lacks what the backend needs: a compositor without a data-control protocol."""


class WaylandProtocolError(ClipboardError):
    """The compositor sent bytes the Wayland protocol does not allow (remote: its fault)."""


class CompositorError(ClipboardError):
    """The compositor reported a fatal protocol error (in its eyes ours) and ends the connection."""

    def __init__(self, object_id: int, interface: str, code: int, message: str) -> None:
        super().__init__(f"the compositor reported error {code} on {interface} (object {object_id}): "
                         f"{message}")
        self.object_id = object_id
        self.interface = interface
        self.code = code
        self.message = message
