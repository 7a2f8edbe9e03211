"""Fixtures shared by the tests: unique POSIX shared-memory names that are always removed,
and a private headless Wayland compositor."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import posix_ipc
import pytest

from broker.lab import WaylandCompositor


def unique_shm_name() -> str:
    return f"/ivclip-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh "/ivclip-test-..." name; whatever the test left under it is unlinked."""
    name = unique_shm_name()
    yield name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


@pytest.fixture(scope="module")
def compositor() -> Iterator[WaylandCompositor]:
    """A headless sway of the module's own (about 0.1 s to start); skips if sway or wl-clipboard
    is missing."""
    missing = [tool for tool in ("sway", "wl-copy", "wl-paste") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed "
                    "(apt-get install --no-install-recommends sway wl-clipboard)")
    with WaylandCompositor() as running:
        yield running
