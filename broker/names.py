"""VM names and the names of everything derived from them, in one place.

A VM name becomes part of a shared-memory object name, a file name and a
QEMU option value, so it is restricted to a safe identifier.
"""

from __future__ import annotations

import re
from pathlib import Path

from broker.errors import ConfigError
from shm.region import SHM_DIR

_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
HOST = "host"
"""Reserved: the host itself as a source or target (file transfers)."""
GLOBAL_CLIPBOARD = "clipboard"
"""Reserved: the global clipboard as a source or target in the audit log."""


def check_vm_name(name: str) -> str:
    """Return `name` if it is a safe VM identifier.

    Raises:
        ConfigError: it is empty, too long, reserved, or has characters outside [A-Za-z0-9_-].
    """
    if not _VM_NAME.fullmatch(name):
        raise ConfigError(
            f"VM name {name!r} is not a safe identifier: use 1-48 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    if name == HOST:
        raise ConfigError(f"VM name {name!r} is reserved for the host")
    if name == GLOBAL_CLIPBOARD:
        raise ConfigError(f"VM name {name!r} is reserved for the global clipboard (in the audit log)")
    return name


def shm_name(vm: str, prefix: str = "ivclip-") -> str:
    """POSIX shared-memory name of a VM's region (posix_ipc form, leading slash)."""
    return "/" + prefix + check_vm_name(vm)


def shm_path(vm: str, prefix: str = "ivclip-") -> Path:
    return SHM_DIR / shm_name(vm, prefix).lstrip("/")


def memdev_id(vm: str) -> str:
    return f"ivclip-{check_vm_name(vm)}"
