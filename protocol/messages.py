"""Messages carried as ring records, and their exact encoding.

Every message names the transfer it belongs to with a 64-bit id that the
broker draws at random for each gesture, so a late or forged answer to an
older gesture never matches the one in flight.

    kind  message       direction     payload (little-endian)
    ----  ------------  ------------  ----------------------------------------
       1  CopyRequest   host->guest   u64 transfer_id, u64 limit
       2  DataBegin     both          u64 transfer_id, u64 total_size
       3  DataChunk     both          u64 transfer_id, u64 offset, data...
       4  DataEnd       both          u64 transfer_id
       5  Status        both          u64 transfer_id, u32 code, u32 zero, u64 value
                                      (value: size for TOO_LARGE, a RefusedBecause for REFUSED)
       6  Cancel        both          u64 transfer_id

Kind 0 is the ring's padding record and never reaches this module.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from protocol.errors import RemoteProtocolError

_U64 = (1 << 64) - 1
MAX_TRANSFER_SIZE = 1 << 40
"""No transfer can claim more than 1 TiB; real limits are far lower (policy)."""


class Kind(IntEnum):
    COPY_REQUEST = 1
    DATA_BEGIN = 2
    DATA_CHUNK = 3
    DATA_END = 4
    STATUS = 5
    CANCEL = 6


class StatusCode(IntEnum):
    OK = 0
    """The paste was installed as the guest's clipboard."""
    EMPTY = 1
    """The guest's clipboard is empty."""
    TOO_LARGE = 2
    """The content exceeds the receiver's limit; value = its size."""
    BUSY = 3
    """The receiver is in the middle of another transfer."""
    REFUSED = 4
    """The receiver refused the content; value = a :class:`RefusedBecause` code."""


class RefusedBecause(IntEnum):
    """The value of a REFUSED status.  Added after version 1 of the records without
    changing them: an older peer sends 0 (UNSPECIFIED) and ignores the value."""

    UNSPECIFIED = 0
    TEXT_POLICY = 1
    """A text item breaks the receiver's text policy (e.g. strict mode and an escape character)."""
    BAD_FORMAT = 2
    """The content is not a valid typed clipboard (protocol.clipformat)."""
    CLIPBOARD_FAILED = 3
    """The receiver's own clipboard (X11, Wayland) could not take the content."""


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64:
        raise ValueError(f"{name} {value} does not fit in 64 bits")


@dataclass(frozen=True, slots=True)
class CopyRequest:
    KIND: ClassVar[Kind] = Kind.COPY_REQUEST
    transfer_id: int
    limit: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 <= self.limit <= MAX_TRANSFER_SIZE:
            raise ValueError(f"limit {self.limit} out of range")


@dataclass(frozen=True, slots=True)
class DataBegin:
    KIND: ClassVar[Kind] = Kind.DATA_BEGIN
    transfer_id: int
    total_size: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 <= self.total_size <= MAX_TRANSFER_SIZE:
            raise ValueError(f"total size {self.total_size} out of range")


@dataclass(frozen=True, slots=True)
class DataChunk:
    KIND: ClassVar[Kind] = Kind.DATA_CHUNK
    transfer_id: int
    offset: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 <= self.offset <= MAX_TRANSFER_SIZE:
            raise ValueError(f"offset {self.offset} out of range")


@dataclass(frozen=True, slots=True)
class DataEnd:
    KIND: ClassVar[Kind] = Kind.DATA_END
    transfer_id: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)


@dataclass(frozen=True, slots=True)
class Status:
    KIND: ClassVar[Kind] = Kind.STATUS
    transfer_id: int
    code: StatusCode
    value: int = 0

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        _check_u64("value", self.value)
        StatusCode(self.code)


@dataclass(frozen=True, slots=True)
class Cancel:
    KIND: ClassVar[Kind] = Kind.CANCEL
    transfer_id: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)


Message = CopyRequest | DataBegin | DataChunk | DataEnd | Status | Cancel

_QQ = struct.Struct("<QQ")
_Q = struct.Struct("<Q")
_STATUS = struct.Struct("<QIIQ")
CHUNK_HEADER_SIZE = _QQ.size


def encode(message: Message) -> tuple[int, list[bytes | memoryview]]:
    """Return (record kind, payload parts); chunk data is passed through uncopied."""
    match message:
        case CopyRequest(transfer_id, limit):
            return Kind.COPY_REQUEST, [_QQ.pack(transfer_id, limit)]
        case DataBegin(transfer_id, total):
            return Kind.DATA_BEGIN, [_QQ.pack(transfer_id, total)]
        case DataChunk(transfer_id, offset, data):
            return Kind.DATA_CHUNK, [_QQ.pack(transfer_id, offset), data]
        case DataEnd(transfer_id):
            return Kind.DATA_END, [_Q.pack(transfer_id)]
        case Status(transfer_id, code, value):
            return Kind.STATUS, [_STATUS.pack(transfer_id, int(code), 0, value)]
        case Cancel(transfer_id):
            return Kind.CANCEL, [_Q.pack(transfer_id)]
    raise TypeError(f"not a message: {message!r}")


def decode(kind: int, payload: bytes) -> Message:
    """Parse one record (already copied into private memory).

    Raises:
        RemoteProtocolError: unknown kind, wrong payload size or out-of-range field.
    """
    try:
        match kind:
            case Kind.COPY_REQUEST:
                return CopyRequest(*_exact(_QQ, payload))
            case Kind.DATA_BEGIN:
                return DataBegin(*_exact(_QQ, payload))
            case Kind.DATA_CHUNK:
                if len(payload) < _QQ.size:
                    raise RemoteProtocolError(f"data chunk of {len(payload)} bytes has no header")
                transfer_id, offset = _QQ.unpack_from(payload)
                return DataChunk(transfer_id, offset, memoryview(payload)[_QQ.size :])
            case Kind.DATA_END:
                return DataEnd(*_exact(_Q, payload))
            case Kind.STATUS:
                transfer_id, code, zero, value = _exact(_STATUS, payload)
                if zero:
                    raise RemoteProtocolError("status record has non-zero reserved bits")
                return Status(transfer_id, StatusCode(code), value)
            case Kind.CANCEL:
                return Cancel(*_exact(_Q, payload))
    except ValueError as exc:  # a field out of range, an unknown status code
        raise RemoteProtocolError(f"invalid {_kind_name(kind)} record: {exc}") from exc
    raise RemoteProtocolError(f"unknown record kind {kind}")


def _exact(layout: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise RemoteProtocolError(f"record of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind-{kind}"
