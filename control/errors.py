"""Errors of the local control sockets (see shm.errors for the whole tree)."""

from shm.errors import IvclipError


class ControlError(IvclipError):
    """A control request could not be sent, read or understood."""


class FrameError(ControlError):
    """The peer sent a malformed, oversized or ambiguous frame."""


class NotRunningError(ControlError):
    """Nobody listens on the control socket."""
