"""Fixtures shared by the unit tests: unique POSIX shared-memory names that are always removed."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import posix_ipc
import pytest


def unique_shm_name() -> str:
    return f"/ivclip-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh "/ivclip-test-..." name; whatever the test left under it is unlinked."""
    name = unique_shm_name()
    yield name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)
