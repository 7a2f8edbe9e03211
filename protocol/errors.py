"""Errors of the clipboard protocol (see shm.errors for the whole tree)."""

from shm.errors import IvclipError


class ProtocolError(IvclipError):
    """The clipboard protocol cannot go on as asked."""


class LocalProtocolError(ProtocolError):
    """We asked for something the current state does not allow (our bug or a busy channel)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a record that is malformed or breaks the protocol."""


class ClipFormatError(ProtocolError):
    """Typed clipboard content (protocol.clipformat) is malformed or cannot be built.

    Not a RemoteProtocolError: the ring protocol was followed, only the content
    is bad, so the transfer is refused but the VM is not marked faulty.
    """


class FileRefused(RemoteProtocolError):
    """A file stream breaks a rule of the receiver (a name, a link, a size, the order).

    `code` is the messages.FileCode to answer with, `name` the relative path (raw
    bytes, as sent) and `detail` the reason, for people.
    """

    def __init__(self, code: int, name: bytes, detail: str) -> None:
        super().__init__(f"{detail} ({name[:200]!r})" if name else detail)
        self.code = code
        self.name = name
        self.detail = detail
