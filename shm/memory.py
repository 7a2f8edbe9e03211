"""Bounds-checked access to a mapped buffer through the C layer.

:class:`SharedBuffer` is the only way the rest of ivclip touches shared memory.
Every access is checked against the mapped size here, in Python, so the C
functions can stay a handful of instructions.  Loads of fields a peer writes
use acquire ordering and stores that publish data use release ordering.

:class:`GuardedBuffer` is the broker's variant: the same accesses, each of
which turns a SIGBUS (the backing file was truncated under the mapping by
another process) into :class:`~shm.errors.BackingLostError` instead of
killing the process.  Its zero-copy :attr:`~SharedBuffer.view` is not guarded:
the broker does not use it.
"""

from __future__ import annotations

import logging
from typing import Any

from shm._ivclip_c import ffi, lib
from shm.errors import BackingLostError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class SharedBuffer:
    """A writable buffer (an mmap, or a bytearray in tests) seen through the C layer.

    The buffer must stay alive and unresized while this object is open.
    :meth:`close` releases the exported pointer so that an mmap can be closed.
    """

    __slots__ = ("_buffer", "_ptr", "size", "view")

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self._ptr: Any = ffi.from_buffer("char[]", buffer, require_writable=True)
        self.size: int = len(self._ptr)
        self.view: memoryview = memoryview(buffer).cast("B")

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Release the pointer and the view; safe to call twice."""
        if self._ptr is None:
            return
        self.view.release()
        ffi.release(self._ptr)
        self._ptr = None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IndexError(f"access [{offset}, {offset + length}) outside a buffer of {self.size}")

    # Atomic fields -------------------------------------------------------
    def load_u64(self, offset: int) -> int:
        """Acquire-load an aligned little-endian u64."""
        self._check(offset, 8)
        return int(lib.ivc_load_acquire_u64(self._ptr, offset))

    def load_u32(self, offset: int) -> int:
        self._check(offset, 4)
        return int(lib.ivc_load_acquire_u32(self._ptr, offset))

    def store_u64(self, offset: int, value: int) -> None:
        """Release-store an aligned u64: everything written before it is visible first."""
        self._check(offset, 8)
        lib.ivc_store_release_u64(self._ptr, offset, value)

    def store_u32(self, offset: int, value: int) -> None:
        self._check(offset, 4)
        lib.ivc_store_release_u32(self._ptr, offset, value)

    # Bulk data -----------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Copy `length` bytes out into private memory (one fetch of peer data)."""
        self._check(offset, length)
        out = bytearray(length)
        if length:
            lib.ivc_copy(ffi.from_buffer(out), self._ptr + offset, length)
        return bytes(out)

    def read_into(self, offset: int, dst: Buffer, dst_offset: int = 0, length: int | None = None) -> int:
        """Copy from shared memory into a private writable buffer; returns the count."""
        target = ffi.from_buffer(dst, require_writable=True)
        if length is None:
            length = len(target) - dst_offset
        self._check(offset, length)
        if dst_offset < 0 or dst_offset + length > len(target):
            raise IndexError("destination too small")
        if length:
            lib.ivc_copy(target + dst_offset, self._ptr + offset, length)
        return length

    def write(self, offset: int, data: Buffer) -> None:
        """Copy private bytes into shared memory."""
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check(offset, length)
        if length:
            lib.ivc_copy(self._ptr + offset, ffi.from_buffer(data), length)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length:
            lib.ivc_zero(self._ptr + offset, length)


class GuardedBuffer(SharedBuffer):
    """A :class:`SharedBuffer` whose every access survives a truncated backing file.

    Raises (every access method):
        IndexError: the access lies outside the buffer.
        BackingLostError: the pages under the access are gone (SIGBUS caught).
    """

    __slots__ = ("_u32", "_u64")

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        if lib.ivc_guard_install() != 0:
            raise OSError("cannot install the SIGBUS guard (sigaction failed)")
        # One result slot each, reused: a buffer is used by one thread at a time.
        self._u64: Any = ffi.new("uint64_t *")
        self._u32: Any = ffi.new("uint32_t *")

    def _lost(self, what: str, offset: int, length: int) -> BackingLostError:
        return BackingLostError(
            f"{what} of [{offset}, {offset + length}) hit a page past the end of the backing file "
            f"(it was truncated under a {self.size}-byte mapping)"
        )

    def load_u64(self, offset: int) -> int:
        self._check(offset, 8)
        if lib.ivc_g_load_u64(self._ptr, self.size, offset, self._u64):
            raise self._lost("load", offset, 8)
        return int(self._u64[0])

    def load_u32(self, offset: int) -> int:
        self._check(offset, 4)
        if lib.ivc_g_load_u32(self._ptr, self.size, offset, self._u32):
            raise self._lost("load", offset, 4)
        return int(self._u32[0])

    def store_u64(self, offset: int, value: int) -> None:
        self._check(offset, 8)
        if lib.ivc_g_store_u64(self._ptr, self.size, offset, value):
            raise self._lost("store", offset, 8)

    def store_u32(self, offset: int, value: int) -> None:
        self._check(offset, 4)
        if lib.ivc_g_store_u32(self._ptr, self.size, offset, value):
            raise self._lost("store", offset, 4)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray(length)
        if length and lib.ivc_g_copy(ffi.from_buffer(out), self._ptr + offset, length, self._ptr, self.size):
            raise self._lost("read", offset, length)
        return bytes(out)

    def read_into(self, offset: int, dst: Buffer, dst_offset: int = 0, length: int | None = None) -> int:
        target = ffi.from_buffer(dst, require_writable=True)
        if length is None:
            length = len(target) - dst_offset
        self._check(offset, length)
        if dst_offset < 0 or dst_offset + length > len(target):
            raise IndexError("destination too small")
        if length and lib.ivc_g_copy(target + dst_offset, self._ptr + offset, length, self._ptr, self.size):
            raise self._lost("read", offset, length)
        return length

    def write(self, offset: int, data: Buffer) -> None:
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check(offset, length)
        if length and lib.ivc_g_copy(self._ptr + offset, ffi.from_buffer(data), length, self._ptr, self.size):
            raise self._lost("write", offset, length)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length and lib.ivc_g_zero(self._ptr + offset, length, self._ptr, self.size):
            raise self._lost("zero", offset, length)


def fence() -> None:
    """A full memory fence."""
    lib.ivc_fence()
