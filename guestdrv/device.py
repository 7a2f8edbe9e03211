"""Finding the ivshmem device that carries an ivclip region.

Inside a VM the region is BAR2 of an ``ivshmem-plain`` PCI function (vendor
0x1af4, device 0x1110), mapped from userspace through its sysfs ``resource2``
file (root only).  With several such devices, the one whose memory starts
with the ivclip magic wins.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

from shm import layout

log = logging.getLogger(__name__)

PCI_DEVICES = Path("/sys/bus/pci/devices")
IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110


def _hex_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def ivshmem_resources(root: Path = PCI_DEVICES) -> list[Path]:
    """The BAR2 resource files of every ivshmem device, in PCI address order."""
    found = []
    for dev in sorted(root.glob("*")):
        if _hex_file(dev / "vendor") == IVSHMEM_VENDOR and _hex_file(dev / "device") == IVSHMEM_DEVICE:
            bar = dev / "resource2"
            if bar.exists():
                found.append(bar)
    return found


def carries_ivclip(path: Path) -> bool:
    """Whether the file starts with the ivclip magic.

    Mapped, not read: sysfs resource files of memory BARs only support mmap.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ) as view:
            return view[: len(layout.MAGIC)] == layout.MAGIC
    except (OSError, ValueError):
        return False


def pick_device(root: Path = PCI_DEVICES) -> tuple[Path | None, str]:
    """The device to use, or None with the reason why there is none (yet)."""
    bars = ivshmem_resources(root)
    if not bars:
        return None, f"no ivshmem device (vendor 0x1af4, device 0x1110) under {root}"
    for bar in bars:
        if carries_ivclip(bar):
            return bar, ""
    if len(bars) == 1:
        return bars[0], ""  # the broker may simply not be up yet
    return None, f"{len(bars)} ivshmem devices, none holds an ivclip region yet"
