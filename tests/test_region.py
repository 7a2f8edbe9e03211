"""Tests for shm.region: creating, locking, attaching, initialising and validating regions."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from shm import layout
from shm.errors import LayoutError, RegionBusyError, RegionError
from shm.memory import SharedBuffer
from shm.region import SHM_DIR, Region, initialise, read_identity, read_session_id, wipe

MIB = 1 << 20
SESSION = bytes(range(16))


def shm_path(name: str) -> Path:
    return SHM_DIR / name.lstrip("/")


# Create, attach, close, unlink ------------------------------------------------
def test_create_maps_a_private_object_of_the_size(shm_name):
    region = Region.create(shm_name, MIB)
    try:
        st = os.stat(shm_path(shm_name))
        assert st.st_size == MIB and region.size == MIB and region.mem.size == MIB
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert region.owner and region.path == shm_path(shm_name)
        assert region.still_backed()
        region.mem.write(100, b"hello")
    finally:
        region.close()
    with open(shm_path(shm_name), "rb") as f:  # the object outlives the mapping
        assert f.read(105)[100:] == b"hello"


def test_create_applies_the_requested_mode(shm_name):
    with Region.create(shm_name, MIB, mode=0o660):
        assert stat.S_IMODE(os.stat(shm_path(shm_name)).st_mode) == 0o660


def test_close_twice_and_context_manager(shm_name):
    with Region.create(shm_name, MIB) as region:
        assert not region.mem.closed
    assert region.mem.closed and not region.still_backed()
    region.close()  # harmless


def test_unlink_removes_the_object_and_is_idempotent(shm_name):
    region = Region.create(shm_name, MIB)
    region.close()
    region.unlink()
    assert not shm_path(shm_name).exists()
    region.unlink()  # already gone: no error


def test_attach_sees_the_creators_memory(shm_name):
    with Region.create(shm_name, 2 * MIB) as owner:
        with Region.attach(shm_path(shm_name)) as guest:
            assert not guest.owner and guest.size == 2 * MIB
            owner.mem.store_u64(layout.G2H_TAIL_OFF, 0x1122334455667788)
            assert guest.mem.load_u64(layout.G2H_TAIL_OFF) == 0x1122334455667788
            guest.mem.write(2 * MIB - 3, b"end")
            assert owner.mem.read(2 * MIB - 3, 3) == b"end"
            with pytest.raises(RegionError, match="only the broker"):
                guest.unlink()
        assert shm_path(shm_name).exists()


def test_second_create_is_busy_while_the_first_is_open(shm_name):
    first = Region.create(shm_name, MIB)
    try:
        with pytest.raises(RegionBusyError):
            Region.create(shm_name, MIB)
        # An attach (a guest) is not a broker and is not locked out.
        Region.attach(shm_path(shm_name)).close()
    finally:
        first.close()
    again = Region.create(shm_name, MIB)  # the lock went with the descriptor
    again.close()


def test_one_claim_at_a_time_beside_the_brokers_lock(shm_name):
    with Region.create(shm_name, MIB):  # the broker's flock does not stand in the way
        first = Region.attach(shm_path(shm_name))
        second = Region.attach(shm_path(shm_name))
        try:
            assert first.claim()
            assert first.claim()  # again, by the same holder
            assert not second.claim()
            first.close()
            assert second.claim()  # the claim went with the first descriptor
        finally:
            first.close()
            second.close()
        with pytest.raises(RegionError, match="closed"):
            second.claim()


def test_busy_error_is_a_region_error():
    assert issubclass(RegionBusyError, RegionError)


def test_create_refuses_an_existing_object_of_another_size(shm_name):
    Region.create(shm_name, MIB).close()
    with pytest.raises(RegionError, match="exists with") as info:
        Region.create(shm_name, 2 * MIB)
    assert not isinstance(info.value, RegionBusyError)
    assert os.stat(shm_path(shm_name)).st_size == MIB  # never resized
    Region.create(shm_name, MIB).close()  # the failed attempt released its lock


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the object away")
def test_create_refuses_an_object_of_another_user(shm_name):
    Region.create(shm_name, MIB).close()
    os.chown(shm_path(shm_name), 65534, -1)
    with pytest.raises(RegionError, match="belongs to uid 65534"):
        Region.create(shm_name, MIB)


def test_create_reuses_an_object_of_the_same_size(shm_name):
    with Region.create(shm_name, MIB) as region:
        region.mem.write(0, b"kept")
    with Region.create(shm_name, MIB) as region:
        assert region.mem.read(0, 4) == b"kept"  # initialising is the caller's job


@pytest.mark.parametrize("size", [0, MIB + 4096, 3 * MIB, MIB // 2])
def test_create_refuses_an_invalid_size_before_touching_anything(shm_name, size):
    with pytest.raises(ValueError):
        Region.create(shm_name, size)
    assert not shm_path(shm_name).exists()


def test_create_refuses_a_name_it_cannot_open():
    with pytest.raises(RegionError):
        Region.create("/ivclip-test-no/slash-allowed", MIB)


def test_create_reports_a_failed_chown_as_region_error(shm_name, monkeypatch):
    def refuse(*_: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(RegionError):
        Region.create(shm_name, MIB, group=12345)


def test_attach_refuses_files_of_invalid_size(tmp_path):
    for size in (0, 4096, MIB + 4096, 3 * MIB, MIB // 2):
        path = tmp_path / f"bar-{size}"
        with open(path, "wb") as f:
            f.truncate(size)
        with pytest.raises(RegionError, match="power of two"):
            Region.attach(path)


def test_attach_maps_a_plain_file_of_valid_size(tmp_path):
    path = tmp_path / "resource2"
    with open(path, "wb") as f:
        f.truncate(MIB)
    with Region.attach(path) as region:
        region.mem.write(0, b"x")
    assert path.read_bytes()[:1] == b"x"


def test_attach_refuses_missing_files_and_symlinks(tmp_path):
    with pytest.raises(RegionError):
        Region.attach(tmp_path / "missing")
    target = tmp_path / "real"
    with open(target, "wb") as f:
        f.truncate(MIB)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(RegionError):
        Region.attach(link)


def test_still_backed_notices_a_truncated_object(shm_name):
    region = Region.create(shm_name, MIB)
    try:
        assert region.still_backed()
        os.truncate(shm_path(shm_name), MIB // 2)  # someone else shrank it: we must not touch it
        assert not region.still_backed()
    finally:
        region.close()


def test_no_object_left_behind_by_the_tests(shm_name):
    """Sanity check of the fixture contract: the name is fresh and not yet taken."""
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(shm_name)


# Header -----------------------------------------------------------------------
def fresh(size: int = MIB) -> tuple[bytearray, SharedBuffer]:
    buf = bytearray(b"\xa5" * size)
    return buf, SharedBuffer(buf)


def test_initialise_then_read_identity():
    _, mem = fresh(2 * MIB)
    geometry = initialise(mem, SESSION)
    identity = read_identity(mem)
    assert identity.session_id == SESSION == read_session_id(mem)
    assert identity.geometry == geometry == layout.expected_geometry(2 * MIB)


def test_initialise_writes_every_field_and_zeroes_the_rest():
    buf, mem = fresh()
    initialise(mem, SESSION)
    g = layout.expected_geometry(MIB)
    assert buf[0:8] == layout.MAGIC
    assert struct.unpack_from("<IIQ", buf, 8) == (layout.LAYOUT_VERSION, layout.HEADER_SIZE, MIB)
    assert buf[24:40] == SESSION
    assert struct.unpack_from("<I", buf, 40) == (g.max_record,)
    assert struct.unpack_from("<QQQQ", buf, 64) == (
        g.guest_to_host.data_offset, g.guest_to_host.capacity,
        g.host_to_guest.data_offset, g.host_to_guest.capacity,
    )
    header_end = 96
    assert buf[44:64] == bytes(20)
    assert buf[header_end:] == bytes(MIB - header_end)  # indices, guest fields, ring data


def test_initialise_stores_the_magic_last_and_clears_it_first():
    class Recorder(SharedBuffer):
        def __init__(self, buffer: Any) -> None:
            super().__init__(buffer)
            self.log: list[tuple[str, int]] = []

        def store_u64(self, offset: int, value: int) -> None:
            self.log.append(("store", offset))
            super().store_u64(offset, value)

        def write(self, offset: int, data: Any) -> None:
            self.log.append(("write", offset))
            super().write(offset, data)

        def zero(self, offset: int, length: int) -> None:
            self.log.append(("zero", offset))
            super().zero(offset, length)

    mem = Recorder(bytearray(MIB))
    initialise(mem, SESSION)
    assert mem.log[0] == ("store", layout.MAGIC_OFF)
    assert mem.log[-1] == ("store", layout.MAGIC_OFF)
    assert all(offset != layout.MAGIC_OFF for _, offset in mem.log[1:-1])


def test_initialise_refuses_a_bad_session_id():
    _, mem = fresh()
    for session in (b"", b"x" * 15, b"x" * 17):
        with pytest.raises(ValueError):
            initialise(mem, session)


def test_reinitialise_changes_the_session_and_erases_old_data():
    buf, mem = fresh()
    initialise(mem, SESSION)
    mem.write(layout.HEADER_SIZE + 10, b"secret clipboard")
    mem.store_u64(layout.G2H_TAIL_OFF, 4096)
    initialise(mem, b"n" * 16)
    assert read_identity(mem).session_id == b"n" * 16
    assert b"secret" not in buf
    assert mem.load_u64(layout.G2H_TAIL_OFF) == 0


def test_wipe_clears_every_byte():
    buf, mem = fresh()
    initialise(mem, SESSION)
    mem.write(layout.HEADER_SIZE, b"clipboard")
    mem.write(MIB - 8, b"lastword")
    wipe(mem)
    assert buf == bytes(MIB)
    with pytest.raises(LayoutError, match="magic"):
        read_identity(mem)


def test_read_identity_without_magic():
    _, mem = fresh()
    with pytest.raises(LayoutError, match="magic"):
        read_identity(mem)
    initialise(mem, SESSION)
    mem.write(7, b"\x02")  # one byte of the magic off
    with pytest.raises(LayoutError, match="magic"):
        read_identity(mem)


@pytest.mark.parametrize("version", [0, layout.LAYOUT_VERSION + 1, 0xFFFFFFFF])
def test_read_identity_refuses_another_version(version):
    _, mem = fresh()
    initialise(mem, SESSION)
    mem.write(layout.LAYOUT_VERSION_OFF, struct.pack("<I", version))
    with pytest.raises(LayoutError, match="version"):
        read_identity(mem)


GEOMETRY_FIELDS = [
    ("header_size", "<I"),
    ("region_size", "<Q"),
    ("max_record", "<I"),
    ("g2h_offset", "<Q"),
    ("g2h_capacity", "<Q"),
    ("h2g_offset", "<Q"),
    ("h2g_capacity", "<Q"),
]


@pytest.mark.parametrize(("name", "fmt"), GEOMETRY_FIELDS, ids=[n for n, _ in GEOMETRY_FIELDS])
@pytest.mark.parametrize("change", ["plus-8", "minus-4096", "zero", "huge"])
def test_read_identity_refuses_each_altered_geometry_field(name, fmt, change):
    _, mem = fresh()
    initialise(mem, SESSION)
    offset = layout.OFF[name]
    (value,) = struct.unpack(fmt, mem.read(offset, struct.calcsize(fmt)))
    bits = 8 * struct.calcsize(fmt)
    new = {"plus-8": value + 8, "minus-4096": value - 4096, "zero": 0, "huge": (1 << bits) - 1}
    mem.write(offset, struct.pack(fmt, new[change] % (1 << bits)))
    with pytest.raises(LayoutError, match="does not match"):
        read_identity(mem)


def test_read_identity_refuses_a_mapping_of_invalid_size():
    buf = bytearray(3 * MIB)
    good = SharedBuffer(bytearray(MIB))
    initialise(good, SESSION)
    buf[: layout.HEADER_SIZE] = good.read(0, layout.HEADER_SIZE)
    with pytest.raises(LayoutError):
        read_identity(SharedBuffer(buf))


def test_read_identity_notices_a_reinitialisation_during_the_read():
    class Racing(SharedBuffer):
        """Re-initialises the region right after the header was copied out."""

        def read(self, offset: int, length: int) -> bytes:
            data = super().read(offset, length)
            if offset == 0 and length > layout.SESSION_ID_OFF:
                initialise(self, b"r" * 16)
            return data

    mem = Racing(bytearray(MIB))
    initialise(mem, SESSION)
    with pytest.raises(LayoutError, match="re-initialised"):
        read_identity(mem)


def test_read_identity_on_a_real_region(shm_name):
    with Region.create(shm_name, MIB) as owner:
        initialise(owner.mem, SESSION)
        with Region.attach(shm_path(shm_name)) as guest:
            assert read_identity(guest.mem).session_id == SESSION
            wipe(owner.mem)
            with pytest.raises(LayoutError):
                read_identity(guest.mem)
