"""guestdrv.device: finding the ivshmem function that carries an ivclip region."""

from __future__ import annotations

import os
from pathlib import Path

from guestdrv.device import carries_ivclip, ivshmem_resources, pick_device
from shm import layout


def fake_pci(root: Path, address: str, vendor: int, device: int, bar: bytes | None) -> Path:
    dev = root / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(f"0x{vendor:04x}\n")
    (dev / "device").write_text(f"0x{device:04x}\n")
    if bar is not None:
        (dev / "resource2").write_bytes(bar.ljust(1 << 20, b"\0"))
    return dev / "resource2"


def test_only_ivshmem_functions_with_a_bar2_are_listed(tmp_path: Path) -> None:
    fake_pci(tmp_path, "0000:00:01.0", 0x8086, 0x1237, b"")  # a host bridge
    fake_pci(tmp_path, "0000:00:02.0", 0x1AF4, 0x1000, b"")  # virtio-net: same vendor
    fake_pci(tmp_path, "0000:00:03.0", 0x1AF4, 0x1110, None)  # no BAR2 file
    bar = fake_pci(tmp_path, "0000:00:04.0", 0x1AF4, 0x1110, b"")
    assert ivshmem_resources(tmp_path) == [bar]


def test_the_device_carrying_the_magic_wins(tmp_path: Path) -> None:
    fake_pci(tmp_path, "0000:00:03.0", 0x1AF4, 0x1110, b"someone else's ivshmem")
    ours = fake_pci(tmp_path, "0000:00:04.0", 0x1AF4, 0x1110, layout.MAGIC)
    assert carries_ivclip(ours)
    assert pick_device(tmp_path) == (ours, "")


def test_a_single_device_is_used_before_the_broker_initialises_it(tmp_path: Path) -> None:
    only = fake_pci(tmp_path, "0000:00:04.0", 0x1AF4, 0x1110, b"")
    assert pick_device(tmp_path) == (only, "")


def test_several_devices_without_magic_or_none_at_all_say_why(tmp_path: Path) -> None:
    path, why = pick_device(tmp_path)
    assert path is None and "no ivshmem device" in why
    fake_pci(tmp_path, "0000:00:03.0", 0x1AF4, 0x1110, b"")
    fake_pci(tmp_path, "0000:00:04.0", 0x1AF4, 0x1110, b"")
    path, why = pick_device(tmp_path)
    assert path is None and "2 ivshmem devices, none holds an ivclip region" in why


def test_unreadable_or_short_files_do_not_carry_ivclip(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert not carries_ivclip(empty)
    assert not carries_ivclip(tmp_path / "missing")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(layout.MAGIC.ljust(4096, b"\0"))
        locked.chmod(0)
        assert not carries_ivclip(locked)
