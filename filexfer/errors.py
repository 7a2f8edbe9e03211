"""Errors of the filesystem side of file transfers (see shm.errors for the whole tree)."""

from shm.errors import IvclipError


class SourceError(IvclipError):
    """A path given to send cannot be sent (missing, unnamed, two with one name...)."""
