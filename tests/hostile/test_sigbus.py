"""The SIGBUS guard: a truncated backing file raises BackingLostError in the broker, never kills it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import vm as vm_module
from broker.vm import VmLink
from shm import layout
from shm.errors import BackingLostError
from shm.memory import GuardedBuffer
from shm.region import Region, initialise

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def region() -> Iterator[Region]:
    region = Region.create(f"/ivclip-t{os.getpid()}-{secrets.token_hex(3)}-sigbus", 1 << 20)
    try:
        yield region
    finally:
        region.unlink()
        region.close()


def test_the_broker_maps_through_the_guard(region: Region) -> None:
    assert isinstance(region.mem, GuardedBuffer)
    assert not isinstance(Region.attach(region.path).mem, GuardedBuffer)  # a guest keeps the fast path


@pytest.mark.parametrize("access", ["load_u64", "load_u32", "store_u64", "store_u32", "read", "read_into",
                                    "write", "zero"])
def test_every_access_past_the_end_raises_instead_of_dying(region: Region, access: str) -> None:
    initialise(region.mem, secrets.token_bytes(16))
    os.truncate(region.path, 4096)
    assert "resized from outside to 4096 bytes" in (region.size_problem() or "")
    mem = region.mem
    at = 1 << 19
    calls = {
        "load_u64": lambda: mem.load_u64(at),
        "load_u32": lambda: mem.load_u32(at),
        "store_u64": lambda: mem.store_u64(at, 1),
        "store_u32": lambda: mem.store_u32(at, 1),
        "read": lambda: mem.read(at, 64),
        "read_into": lambda: mem.read_into(at, bytearray(64)),
        "write": lambda: mem.write(at, b"x" * 64),
        "zero": lambda: mem.zero(8192, mem.size - 8192),
    }
    with pytest.raises(BackingLostError, match="past the end of the backing file"):
        calls[access]()
    assert mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little") == layout.MAGIC  # page 0 is still there
    region.restore_size()
    assert region.size_problem() is None
    assert mem.load_u64(at) == 0  # the lost pages come back as zeros


def test_without_the_guard_the_same_access_kills_the_process() -> None:
    """The control experiment: the guard is what saves us, and it does not swallow
    a SIGBUS elsewhere (that one still kills, as it would without us)."""
    code = (
        "import os, secrets\n"
        "from shm.region import Region\n"
        "from shm.memory import SharedBuffer\n"
        f"r = Region.create('/ivclip-t{os.getpid()}-unguarded', 1 << 20)\n"
        "r.unlink()\n"
        "os.ftruncate(r._fd, 0)\n"
        "SharedBuffer(r._map).load_u64(8192)\n"
        "print('survived')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGBUS and "survived" not in proc.stdout


def test_a_truncation_between_the_size_check_and_the_access_is_a_fault(
    region: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm_module, "REINIT_INTERVAL_S", 0.0)
    link = VmLink("zed", region, timeout_s=1.0)
    real_check = region.size_problem
    monkeypatch.setattr(region, "size_problem", lambda: None)  # as if it happened just after the check
    os.truncate(region.path, 0)
    _, events = link.service(1.0)
    assert events == [] and link.attachment(1.0).value == "faulty"
    assert "past the end of the backing file" in link.last_fault
    link.beat()  # the heartbeat store is guarded too
    monkeypatch.setattr(region, "size_problem", real_check)
    link.service(2.0)  # restores the size, re-initialises
    assert region.size_problem() is None and link.attachment(2.0).value == "never attached"
    assert region.mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little") == layout.MAGIC
    os.truncate(region.path, 0)
    link.shutdown(unlink=False)  # the wipe on a truncated region is logged, not fatal
