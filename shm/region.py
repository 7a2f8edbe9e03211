"""Regions: creating, locking, mapping and initialising the per-VM shared memory.

Two ways in, kept separate (create is not attach):

* :meth:`Region.create` -- the broker.  Opens ``/dev/shm/<name>`` with
  posix_ipc, creating it if needed, takes an exclusive ``flock`` on it (the
  sign that a live broker owns it), sizes and maps it.  An existing object of
  another size is refused, never resized: a running QEMU may have it mapped,
  and shrinking it under QEMU would kill the VM with SIGBUS.  The broker's
  mapping is a :class:`~shm.memory.GuardedBuffer`: should another process
  truncate the file anyway, an access past the new end raises
  :class:`~shm.errors.BackingLostError` rather than killing the broker, and
  :meth:`Region.backing_problem` notices the change before the next access.
* :meth:`Region.attach` -- a guest driver.  Maps a file as it is: a PCI
  ``resource2`` file inside a VM, or a ``/dev/shm`` file for a guest that runs
  as a host process.

Teardown order: :meth:`Region.close` releases the pointer and views, then
unmaps, then closes the descriptor (which drops the lock); it is safe to call
twice.  Only the broker unlinks, and only when asked to (:meth:`unlink`).

Header helpers: :func:`initialise` (broker; magic last) and
:func:`read_identity` (guest; magic first, every field checked against the
mapped size, session id re-read at the end to catch a concurrent re-init).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import posix_ipc

from shm import layout
from shm.errors import LayoutError, RegionBusyError, RegionError
from shm.memory import GuardedBuffer, SharedBuffer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True, slots=True)
class Identity:
    """The header fields a guest validated when attaching."""

    session_id: bytes
    geometry: layout.RegionGeometry


class Region:
    """One mapped region.  Use :meth:`create` or :meth:`attach`, not the constructor."""

    def __init__(self, fd: int, size: int, path: Path, *, owner: bool) -> None:
        self.path = path
        self.size = size
        self.owner = owner
        self.created = False  # set by create() when this call made the object
        self._fd: int | None = fd
        self._map: mmap.mmap | None = None
        self.mem: SharedBuffer
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # The broker (owner) must survive a truncation from outside; a guest
            # driver maps its own device and keeps the faster unguarded path.
            self.mem = GuardedBuffer(self._map) if owner else SharedBuffer(self._map)
        except (OSError, ValueError) as exc:
            self.close()
            raise RegionError(f"cannot map {path} ({size} bytes): {exc}") from exc

    # Creation and attachment ---------------------------------------------
    @classmethod
    def create(cls, name: str, size: int, *, mode: int = 0o600, group: int | None = None) -> Region:
        """Create or reuse the POSIX shared-memory object `name` (e.g. "/ivclip-alice").

        Raises:
            ValueError: `size` is not a valid region size.
            RegionBusyError: another live process holds its lock.
            RegionError: it exists with another size, is not a regular file of
                ours, or cannot be created or mapped.
        """
        layout.expected_geometry(size)  # validates the size
        path = SHM_DIR / name.lstrip("/")
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT, mode=mode)
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise RegionError(f"cannot open shared memory {path}: {exc}") from exc
        fd = shm.fd
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RegionBusyError(
                        f"{path} is locked by another live ivclip broker; stop it first"
                    ) from exc
                raise RegionError(f"cannot lock {path}: {exc}") from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RegionError(f"{path} is not a regular shared-memory file")
            if st.st_uid != os.geteuid():
                raise RegionError(f"{path} belongs to uid {st.st_uid}, not to us ({os.geteuid()})")
            created = st.st_size == 0
            if not created and st.st_size != size:
                raise RegionError(
                    f"{path} exists with {st.st_size} bytes, not {size}; a VM may still map it. "
                    f"Use --size {st.st_size}, or stop the VMs and remove it"
                )
            try:
                if created:
                    os.ftruncate(fd, size)
                if group is not None:
                    os.fchown(fd, -1, group)
                os.fchmod(fd, mode)
            except OSError as exc:
                if created:  # leave nothing behind that we made
                    with contextlib.suppress(posix_ipc.ExistentialError):
                        posix_ipc.unlink_shared_memory(name)
                raise RegionError(f"cannot set up {path}: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        region = cls(fd, size, path, owner=True)
        region.created = created
        return region

    @classmethod
    def attach(cls, path: Path) -> Region:
        """Map an existing file whole: a PCI BAR resource file or a /dev/shm file.

        Raises:
            RegionError: the file cannot be opened or mapped, or has no valid size.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise RegionError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            size = st.st_size
            if not layout.valid_region_size(size):
                raise RegionError(
                    f"{path} is {size} bytes; an ivclip region is a power of two "
                    f"between {layout.MIN_REGION_SIZE} and {layout.MAX_REGION_SIZE} bytes"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, path, owner=False)

    def claim(self) -> bool:
        """Take the region for this process alone among those that claim it: a guest
        driver does, so that two drivers never produce into the same ring.  False when
        another holds it.  The lock (an open-file-description lock on the first byte,
        independent of the broker's flock) ends when the region is closed or the
        process dies; where the file system has no such locks, the claim is granted.
        """
        if self._fd is None:
            raise RegionError("the region is closed")
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            log.debug("cannot lock %s (%s); going on without the claim", self.path, exc.strerror)
        return True

    # Lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        mem = getattr(self, "mem", None)
        if mem is not None:
            mem.close()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                log.warning("a view into %s is still held; leaving it mapped", self.path)
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def unlink(self) -> None:
        """Remove the shared-memory object (broker only).  Mapped VMs keep their copy."""
        if not self.owner:
            raise RegionError("only the broker that created a region may unlink it")
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + self.path.name)

    def still_backed(self) -> bool:
        """True while the backing file still has our size (a truncated file would SIGBUS us)."""
        if self._fd is None:
            return False
        return os.fstat(self._fd).st_size == self.size

    def size_problem(self) -> str | None:
        """Why the mapped file is unsafe to touch now (its size changed), or None.

        One fstat: cheap enough to run before every service round.
        """
        if self._fd is None:
            return "the region is closed"
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            return f"cannot fstat {self.path}: {exc.strerror}"
        if size != self.size:
            return f"{self.path} was resized from outside to {size} bytes (mapped: {self.size})"
        return None

    def restore_size(self) -> None:
        """(Broker) Give the file its size back after someone truncated or grew it.

        Pages cut off by a truncation come back as zeros, so QEMU's mapping and
        ours are whole again; the caller then re-initialises the region.

        Raises:
            RegionError: the region is closed or ftruncate failed.
        """
        if self._fd is None or not self.owner:
            raise RegionError(f"{self.path}: only an open broker region can be restored")
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise RegionError(f"cannot restore the size of {self.path}: {exc.strerror}") from exc

    def path_problem(self) -> str | None:
        """Whether the name in /dev/shm still leads to the file we mapped, and is ours.

        Our mapping stays valid whatever happens to the name; but a VM started
        later maps whatever the name leads to.
        """
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return f"{self.path} was removed; a VM started now would not find its region"
        except OSError as exc:
            return f"cannot stat {self.path}: {exc.strerror}"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"{self.path} was replaced by another file; a VM started now would not reach us"
        if st.st_uid != os.geteuid():
            return f"{self.path} now belongs to uid {st.st_uid}, not to us ({os.geteuid()})"
        return None

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Header --------------------------------------------------------------------
def initialise(mem: SharedBuffer, session_id: bytes) -> layout.RegionGeometry:
    """(Broker) Write a fresh header and empty rings.  The magic goes last.

    Everything but the header is zeroed too, so no byte of an earlier session
    (clipboard content included) survives a re-initialisation.
    """
    if len(session_id) != layout.SESSION_ID_SIZE:
        raise ValueError("session id must be 16 bytes")
    geometry = layout.expected_geometry(mem.size)
    mem.store_u64(layout.MAGIC_OFF, 0)  # readers stop trusting the header first
    mem.zero(8, mem.size - 8)
    mem.write(layout.LAYOUT_VERSION_OFF, struct.pack("<I", layout.LAYOUT_VERSION))
    mem.write(layout.HEADER_SIZE_OFF, struct.pack("<I", layout.HEADER_SIZE))
    mem.write(layout.REGION_SIZE_OFF, struct.pack("<Q", mem.size))
    mem.write(layout.SESSION_ID_OFF, session_id)
    mem.write(layout.MAX_RECORD_OFF, struct.pack("<I", geometry.max_record))
    for off, value in (
        (layout.G2H_OFFSET_OFF, geometry.guest_to_host.data_offset),
        (layout.G2H_CAPACITY_OFF, geometry.guest_to_host.capacity),
        (layout.H2G_OFFSET_OFF, geometry.host_to_guest.data_offset),
        (layout.H2G_CAPACITY_OFF, geometry.host_to_guest.capacity),
    ):
        mem.write(off, struct.pack("<Q", value))
    mem.store_u64(layout.MAGIC_OFF, int.from_bytes(layout.MAGIC, "little"))
    return geometry


def wipe(mem: SharedBuffer) -> None:
    """(Broker) Clear the magic, then every byte: guests see no region and no old data."""
    mem.store_u64(layout.MAGIC_OFF, 0)
    mem.zero(8, mem.size - 8)


_IDENTITY = struct.Struct("<8sIIQ16sI20xQQQQ")


def read_identity(mem: SharedBuffer) -> Identity:
    """(Guest) Validate the header against the mapped size and return it.

    Raises:
        LayoutError: no magic (no broker yet), another layout version, or any
            field that differs from the only valid geometry for this size.
    """
    if mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little") != layout.MAGIC:
        raise LayoutError("no ivclip region here (magic missing): is the broker running?")
    (magic, version, header_size, region_size, session_id, max_record,
     g2h_off, g2h_cap, h2g_off, h2g_cap) = _IDENTITY.unpack(mem.read(0, _IDENTITY.size))
    if version != layout.LAYOUT_VERSION:
        raise LayoutError(f"layout version {version}; this driver speaks {layout.LAYOUT_VERSION}")
    try:
        geometry = layout.expected_geometry(mem.size)
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc
    found = (magic, header_size, region_size, max_record, g2h_off, g2h_cap, h2g_off, h2g_cap)
    wanted = (
        layout.MAGIC, layout.HEADER_SIZE, mem.size, geometry.max_record,
        geometry.guest_to_host.data_offset, geometry.guest_to_host.capacity,
        geometry.host_to_guest.data_offset, geometry.host_to_guest.capacity,
    )
    if found != wanted:
        raise LayoutError(f"header {found} does not match a {mem.size}-byte region {wanted}")
    if read_session_id(mem) != session_id:
        raise LayoutError("the broker re-initialised the region while we read it")
    return Identity(session_id=session_id, geometry=geometry)


def read_session_id(mem: SharedBuffer) -> bytes:
    return mem.read(layout.SESSION_ID_OFF, layout.SESSION_ID_SIZE)
