"""Bounds-checked access to a mapped buffer through the C layer.

:class:`SharedBuffer` is the only way the rest of ivclip touches shared memory.
Every access is checked against the mapped size here, in Python, so the C
functions can stay a handful of instructions.  Loads of fields a peer writes
use acquire ordering and stores that publish data use release ordering.

Copies go through ``ivc_copy``, whose strategy (:func:`set_copy_strategy`)
is chosen per process: glibc ``memcpy`` by default, since on the machines
measured its ``rep movsb`` path is as fast as anything else at every size;
the alternatives are kept for hosts where it is not (``python -m bench``
prints the comparison).

:class:`GuardedBuffer` is the broker's variant: the same accesses, each of
which turns a SIGBUS (the backing file was truncated under the mapping by
another process) into :class:`~shm.errors.BackingLostError` instead of
killing the process.  Its zero-copy :attr:`~SharedBuffer.view` is not guarded:
whoever reads a view of it must copy through a guarded access instead of reading
it (the broker's file relay copies a chunk from one VM's view into another VM's
ring with :meth:`GuardedBuffer.write`, which guards both mappings).
"""

from __future__ import annotations

import logging
import struct
import weakref
from array import array
from collections.abc import Sequence
from typing import Any, Union

from shm._ivclip_c import ffi, lib
from shm.errors import BackingLostError

log = logging.getLogger(__name__)

_RECORD_HEADER = struct.Struct("<II")  # shm.ring's record header: u32 length, u32 kind

Buffer = bytes | bytearray | memoryview
# Where the consumer's batch writes (kind, length) pairs: anything writable of uint32.
MetaBuffer = Union[bytearray, memoryview, "array[int]"]  # array[int] fails at run time

COPY_STRATEGIES = ("glibc", "pieces", "vector")


def set_copy_strategy(name: str) -> str:
    """Choose how this process copies in and out of rings; returns the previous choice.

    "glibc": memcpy for every size.  "pieces": 16-256 KiB copies in 4 KiB
    memcpy pieces.  "vector": copies of 2 KiB and more by a vector loop that
    never takes glibc's `rep movsb` path.

    Raises:
        ValueError: an unknown strategy name.
    """
    if name not in COPY_STRATEGIES:
        raise ValueError(f"copy strategy {name!r} is not one of {', '.join(COPY_STRATEGIES)}")
    return COPY_STRATEGIES[lib.ivc_set_copy_strategy(COPY_STRATEGIES.index(name))]


def copy(dst: Buffer, src: Buffer) -> int:
    """Copy all of `src` to the start of the writable buffer `dst` (a loaned view, say).

    Uses the process's copy strategy, unlike ``dst[:n] = src``.  Returns the count.

    Raises:
        ValueError: `dst` is shorter than `src`.
        TypeError: `dst` is not writable.
    """
    source = ffi.from_buffer(src)
    target = ffi.from_buffer(dst, require_writable=True)
    length = len(source)
    if length > len(target):
        raise ValueError(f"cannot copy {length} bytes into a buffer of {len(target)}")
    if length:
        lib.ivc_copy(target, source, length)
    return length


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
        if self._ptr is None:
            raise ValueError("the shared buffer is closed")

    def pointer(self, offset: int, length: int) -> Any:
        """A C pointer to `length` bytes at `offset`, for one call into the C layer.

        Never keep it: it dangles once the buffer is closed and unmapped.
        """
        self._check(offset, length)
        return self._ptr + offset

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
    def offset_of(self, view: memoryview) -> int:
        """Where a view into this buffer (from peek, say) starts: an offset for :meth:`read`.

        Raises:
            IndexError: the view does not lie inside this buffer.
        """
        if self._ptr is None:
            raise ValueError("the shared buffer is closed")
        start = int(ffi.cast("uintptr_t", ffi.from_buffer(view))) - int(ffi.cast("uintptr_t", self._ptr))
        self._check(start, view.nbytes)
        return start

    def read(self, offset: int, length: int) -> bytes:
        """Copy `length` bytes out into private memory (one fetch of peer data)."""
        self._check(offset, length)
        # One copy straight into the new bytes object; a bytearray filled by
        # ivc_copy and then turned into bytes would copy twice.
        return ffi.buffer(self._ptr + offset, length)[:]  # type: ignore[no-any-return]

    def read_into(self, offset: int, dst: Buffer, dst_offset: int = 0, length: int | None = None) -> int:
        """Copy from shared memory into a private writable buffer; returns the count."""
        target = ffi.from_buffer(dst, require_writable=True)
        room = len(target)
        if length is None:
            length = room - dst_offset
        self._check(offset, length)
        if dst_offset < 0 or dst_offset + length > room:
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

    # Records (for shm.ring, which owns the ring logic) ----------------------
    def put_header(self, offset: int, length: int, kind: int) -> None:
        """Write a record header (u32 length, u32 kind) at `offset`."""
        self._check(offset, 8)
        lib.ivc_put_record(self._ptr + offset, length, kind, ffi.NULL, 0)

    def put_record(self, offset: int, kind: int, length: int, parts: Sequence[Buffer]) -> None:
        """Write a record header (`length`, `kind`) at `offset` and its payload `parts` after it.

        Raises:
            ValueError: the parts do not add up to `length` (one was resized meanwhile).
        """
        self._check(offset, 8 + length)
        at = self._ptr + offset
        if len(parts) == 1:
            source = ffi.from_buffer(parts[0])
            if len(source) != length:
                raise ValueError("the payload changed size while being written")
            lib.ivc_put_record(at, length, kind, source, length)
            return
        sources = [ffi.from_buffer(part) for part in parts]
        if sum(len(source) for source in sources) != length:
            raise ValueError("the payload changed size while being written")
        lib.ivc_put_record(at, length, kind, ffi.NULL, 0)
        at += 8
        for source in sources:
            lib.ivc_copy(at, source, len(source))
            at += len(source)

    def put_records(
        self,
        offset: int,
        capacity: int,
        tail: int,
        head: int,
        kind: int,
        data: Buffer,
        lengths: Any,
        each: int,
        count: int,
    ) -> tuple[int, int, int]:
        """Append up to `count` records to the ring at [offset, offset+capacity) in one C call.

        Payloads are consecutive slices of `data`: `lengths` (a private cffi
        uint32 array the caller validated) or `each` bytes apiece.  Returns
        (records written, new tail, bytes of data used).
        """
        self._check(offset, capacity)
        source = ffi.from_buffer(data)
        out = ffi.new("uint64_t[2]")
        done = lib.ivc_ring_put(
            self._ptr + offset, capacity, tail, head, kind, source, len(source),
            ffi.NULL if lengths is None else lengths, count, each, out,
        )
        return int(done), int(out[0]), int(out[1])

    def get_records(
        self,
        offset: int,
        capacity: int,
        max_record: int,
        head: int,
        tail: int,
        dst: Buffer,
        dst_offset: int,
        meta: MetaBuffer,
        meta_index: int,
    ) -> tuple[int, int, int, int, tuple[int, int, int]]:
        """Copy records out of the ring at [offset, offset+capacity) in one C call.

        Returns (status, new head, records, bytes, (pos, length, kind) of a bad
        header when status is 1).  `meta` (uint32, 2 per record) is filled from
        record `meta_index` on; payloads go to `dst` from `dst_offset` on.

        Raises:
            ValueError: `dst_offset` or `meta_index` is outside its buffer.
        """
        self._check(offset, capacity)
        target = ffi.from_buffer(dst, require_writable=True)
        slots = ffi.from_buffer("uint32_t[]", meta, require_writable=True)
        room = len(slots) // 2 - meta_index
        if not 0 <= dst_offset <= len(target) or room < 0:
            raise ValueError("destination offset or metadata index outside its buffer")
        out = ffi.new("uint64_t[6]")
        status = lib.ivc_ring_get(
            self._ptr + offset, capacity, max_record, head, tail,
            target + dst_offset, len(target) - dst_offset, slots + 2 * meta_index, room, out,
        )
        return (
            int(status), int(out[0]), int(out[1]), int(out[2]),
            (int(out[3]), int(out[4]), int(out[5])),
        )

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length:
            lib.ivc_zero(self._ptr + offset, length)


def lengths_array(lengths: Sequence[int] | Buffer) -> tuple[Any, int, int, int]:
    """A private uint32 copy of `lengths`: (array, count, largest, total).

    Private so that a caller's thread cannot change a length after it was
    checked and before C uses it.

    Raises:
        OverflowError: a length is negative or does not fit 32 bits.
    """
    if isinstance(lengths, bytes | bytearray | memoryview):
        view = memoryview(lengths).cast("B").cast("I")
        array = ffi.new("uint32_t[]", len(view))
        ffi.memmove(array, view, view.nbytes)
    else:
        array = ffi.new("uint32_t[]", list(lengths))
    count = len(array)
    if count == 0:
        return array, 0, 0, 0
    values = memoryview(ffi.buffer(array)).cast("I")
    return array, count, max(values), sum(values)


_GUARDED: weakref.WeakSet[GuardedBuffer] = weakref.WeakSet()
"""Every open GuardedBuffer: a copy from one of them into another is guarded on both sides."""


def _address(pointer: Any) -> int:
    return int(ffi.cast("uintptr_t", pointer))


class GuardedBuffer(SharedBuffer):
    """A :class:`SharedBuffer` whose every access survives a truncated backing file.

    A :meth:`write` or :meth:`read_into` whose other side lies in another open
    GuardedBuffer (a view of it) is guarded on that side too, and a fault there
    is reported as that buffer's.

    Raises (every access method):
        IndexError: the access lies outside the buffer.
        BackingLostError: the pages under the access are gone (SIGBUS caught).
    """

    __slots__ = ("__weakref__", "_base", "_u32", "_u64")

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        if lib.ivc_guard_install() != 0:
            raise OSError("cannot install the SIGBUS guard (sigaction failed)")
        # One result slot each, reused: a buffer is used by one thread at a time.
        self._u64: Any = ffi.new("uint64_t *")
        self._u32: Any = ffi.new("uint32_t *")
        self._base = _address(self._ptr)
        _GUARDED.add(self)

    def close(self) -> None:
        _GUARDED.discard(self)
        super().close()

    def _other_holding(self, pointer: Any, length: int) -> GuardedBuffer | None:
        """The other open GuardedBuffer whose mapping holds [pointer, pointer + length), if any."""
        start = _address(pointer)
        for other in _GUARDED:
            if other is not self and other._ptr is not None \
                    and other._base <= start and start + length <= other._base + other.size:
                return other
        return None

    def _copy(self, dst: Any, src: Any, length: int, other: Any, what: str, offset: int) -> None:
        """Copy with this mapping guarded, and `other`'s mapping (the far side's) if it is a guarded one."""
        holder = self._other_holding(other, length)
        if holder is None:
            status = lib.ivc_g_copy(dst, src, length, self._ptr, self.size)
        else:
            status = lib.ivc_g_copy2(dst, src, length, self._ptr, self.size, holder._ptr, holder.size)
        if status == -1:
            raise self._lost(what, offset, length)
        if status == -2:
            assert holder is not None
            far = _address(other) - holder._base
            raise holder._lost("read" if what == "write" else "write", far, length)

    def _lost(self, what: str, offset: int, length: int) -> BackingLostError:
        return BackingLostError(
            f"{what} of [{offset}, {offset + length}) hit a page past the end of the backing file "
            f"(it was truncated under a {self.size}-byte mapping)",
            self,
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
        if length:
            self._copy(target + dst_offset, self._ptr + offset, length, target + dst_offset, "read", offset)
        return length

    def write(self, offset: int, data: Buffer) -> None:
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check(offset, length)
        if length:
            source = ffi.from_buffer(data)
            self._copy(self._ptr + offset, source, length, source, "write", offset)

    def put_header(self, offset: int, length: int, kind: int) -> None:
        self.write(offset, _RECORD_HEADER.pack(length, kind))

    def put_record(self, offset: int, kind: int, length: int, parts: Sequence[Buffer]) -> None:
        self._check(offset, 8 + length)
        if sum(memoryview(part).nbytes for part in parts) != length:
            raise ValueError("the payload changed size while being written")
        self.put_header(offset, length, kind)
        at = offset + 8
        for part in parts:
            self.write(at, part)
            at += memoryview(part).nbytes

    def put_records(self, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        """Not available: the batch routines are not SIGBUS-guarded (the broker does not batch).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("batch ring writes are not SIGBUS-guarded")

    def get_records(self, *args: Any, **kwargs: Any) -> tuple[int, int, int, int, tuple[int, int, int]]:
        """Not available: the batch routines are not SIGBUS-guarded (the broker does not batch).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("batch ring reads are not SIGBUS-guarded")

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length and lib.ivc_g_zero(self._ptr + offset, length, self._ptr, self.size):
            raise self._lost("zero", offset, length)


def fence() -> None:
    """A full memory fence."""
    lib.ivc_fence()
