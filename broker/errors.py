"""Errors of the broker (see shm.errors for the whole tree)."""

from shm.errors import IvclipError


class ConfigError(IvclipError):
    """A command-line option, VM name or setting is invalid."""
