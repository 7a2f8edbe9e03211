"""Fixtures shared by the unit tests: unique POSIX shared-memory names that are always removed,
a private X display with xclip to look at its clipboard, a private headless sway with
wl-clipboard to look at a Wayland clipboard, and a receivers' flush to disk held at will."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator

import posix_ipc
import pytest
from held_flush import HeldFlush

from broker.lab import SwaySession, XServer
from filexfer import receiver as receiver_module


def unique_shm_name() -> str:
    return f"/ivclip-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh "/ivclip-test-..." name; whatever the test left under it is unlinked."""
    name = unique_shm_name()
    yield name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


X_MISSING = [tool for tool in ("Xvfb", "xclip") if shutil.which(tool) is None]


@pytest.fixture(scope="module")
def xserver() -> Iterator[XServer]:
    """A private Xvfb display for the test module; skips, saying why, without Xvfb or xclip."""
    if X_MISSING:
        pytest.skip(f"{' and '.join(X_MISSING)} not installed (apt-get install xvfb xclip)")
    with XServer() as server:
        yield server


@pytest.fixture
def xclip_out(xserver: XServer) -> Callable[[str], bytes | None]:
    """What an application asking `xserver`'s clipboard for a target gets (None: refused or no owner)."""
    def read(target: str) -> bytes | None:
        result = subprocess.run(["xclip", "-display", xserver.display, "-selection", "clipboard", "-o",
                                 "-t", target], capture_output=True, timeout=30)
        return result.stdout if result.returncode == 0 else None

    return read


WAYLAND_MISSING = [tool for tool in ("sway", "wl-copy", "wl-paste") if shutil.which(tool) is None]


@pytest.fixture(scope="module")
def compositor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwaySession]:
    """A headless sway for the test module (about 0.1 s to start); skips, saying why, without
    sway or wl-clipboard."""
    if WAYLAND_MISSING:
        pytest.skip(f"{' and '.join(WAYLAND_MISSING)} not installed "
                    "(apt-get install --no-install-recommends sway wl-clipboard)")
    with SwaySession(tmp_path_factory.mktemp("sway"), "xwayland disable\n") as session:
        yield session



@pytest.fixture
def held_flush(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldFlush]:
    """Every receiver's flush to disk (filexfer.receiver's syncfs) waits until the test releases it."""
    held = HeldFlush(threading.Event(), threading.Event())
    monkeypatch.setattr(receiver_module, "syncfs", held.syncfs)
    yield held
    held.release.set()
