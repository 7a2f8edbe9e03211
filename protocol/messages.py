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
       7  FileOffer     guest->host   u64 offer_id, u64 entries, u64 files, u64 total_size,
                                      u32 flags, u32 roots, root names (NUL-separated, may be cut short)
       8  FileStart     host->guest   u64 transfer_id, u64 offer_id
       9  FileBegin     host->guest   u64 transfer_id, u64 entries, u64 files, u64 total_size,
                                      u32 flags, u32 zero, source name (ASCII)
      10  FileEntry     both          u64 transfer_id, u32 type, u32 mode, i64 mtime_ns, u64 size,
                                      u16 path_len, u16 target_len, u32 zero, path, link target
      11  FileChunk     both          u64 transfer_id, u64 offset, data...
      12  FileEnd       both          u64 transfer_id, 32-byte SHA-256 of the file's data
      13  StreamEnd     both          u64 transfer_id, u64 entries, u64 total_size (the end marker)
      14  FileResult    both          u64 transfer_id, u32 code, u32 errno, u64 entries_done,
                                      u16 name_len, u16 detail_len, u32 zero, name, detail

Kinds 7-14 carry files; what they mean together (order, names, links, the
receiver's rules) is :mod:`protocol.filestream`.

Kind 0 is the ring's padding record and never reaches this module.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

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
    FILE_OFFER = 7
    FILE_START = 8
    FILE_BEGIN = 9
    FILE_ENTRY = 10
    FILE_CHUNK = 11
    FILE_END = 12
    STREAM_END = 13
    FILE_RESULT = 14


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


class EntryType(IntEnum):
    """What a FileEntry describes.  Nothing else travels: FIFOs, sockets and devices stay behind."""

    DIRECTORY = 1
    FILE = 2
    SYMLINK = 3


class FileCode(IntEnum):
    """The outcome of a file transfer, in a FileResult.  The text is what a user reads."""

    OK = 0
    NAME_REFUSED = 1
    LINK_REFUSED = 2
    EXISTS = 3
    NO_SPACE = 4
    CHECKSUM = 5
    BAD_STREAM = 6
    WRITE_ERROR = 7
    READ_ERROR = 8
    SOURCE_CHANGED = 9
    BUSY = 10
    CANCELLED = 11
    TIMEOUT = 12
    REFUSED = 13
    TOO_LARGE = 14

    @property
    def text(self) -> str:
        return _FILE_CODE_TEXT[self]


_FILE_CODE_TEXT = {
    FileCode.OK: "every file arrived intact",
    FileCode.NAME_REFUSED: "the receiver refuses this name",
    FileCode.LINK_REFUSED: "the receiver refuses this symbolic link",
    FileCode.EXISTS: "the name already exists in the incoming folder (nothing is ever overwritten)",
    FileCode.NO_SPACE: "not enough free space on the receiver",
    FileCode.CHECKSUM: "the data does not match the sender's checksum",
    FileCode.BAD_STREAM: "the sender's stream is malformed",
    FileCode.WRITE_ERROR: "the receiver could not write",
    FileCode.READ_ERROR: "the sender could not read",
    FileCode.SOURCE_CHANGED: "the file changed while it was being sent",
    FileCode.BUSY: "the receiver is busy with another transfer",
    FileCode.CANCELLED: "the transfer was cancelled",
    FileCode.TIMEOUT: "no progress in time",
    FileCode.REFUSED: "the transfer was refused",
    FileCode.TOO_LARGE: "the transfer is over a size limit",
}

FLAG_MOVE = 1
"""FileOffer/FileBegin flag: the sender deletes its sources after success, so the receiver
makes the files durable (syncs) before it confirms."""
KNOWN_FILE_FLAGS = FLAG_MOVE
MAX_ENTRIES = 10_000_000
"""No file transfer can claim more entries; the user sees and approves the real count."""
MAX_PATH = 4095
"""Longest relative path or symbolic-link target, in bytes (Linux PATH_MAX less the NUL)."""
MAX_NAME = 255
"""Longest path component, in bytes (Linux NAME_MAX)."""
MAX_OFFER_NAMES = 4096
"""Bytes of root names an offer may carry for the host user to read; more are cut, not sent."""
DIGEST_SIZE = 32
MAX_DETAIL = 512
"""Longest reason text in a FileResult."""
"""FileEnd carries the SHA-256 of the file's data."""
_SOURCE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")


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


def _check_name_list(names: tuple[bytes, ...]) -> None:
    size = sum(len(n) for n in names) + max(0, len(names) - 1)
    if size > MAX_OFFER_NAMES:
        raise ValueError(f"offer names take {size} bytes, over {MAX_OFFER_NAMES}")
    for name in names:
        if not 0 < len(name) <= MAX_NAME or b"\0" in name or b"/" in name:
            raise ValueError(f"offer name {name[:40]!r} is not a single path component")


@dataclass(frozen=True, slots=True)
class FileOffer:
    """A guest announces files it would send; nothing moves before the host user approves it."""

    KIND: ClassVar[Kind] = Kind.FILE_OFFER
    offer_id: int
    entries: int
    files: int
    total_size: int
    flags: int
    roots: int
    names: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_u64("offer_id", self.offer_id)
        if not 0 < self.entries <= MAX_ENTRIES or not 0 <= self.files <= self.entries:
            raise ValueError(f"{self.entries} entries and {self.files} files are out of range")
        if not 0 <= self.total_size <= MAX_TRANSFER_SIZE:
            raise ValueError(f"total size {self.total_size} out of range")
        if self.flags & ~KNOWN_FILE_FLAGS:
            raise ValueError(f"unknown flags {self.flags:#x}")
        if not len(self.names) <= self.roots <= self.entries or self.roots == 0:
            raise ValueError(f"{self.roots} roots with {len(self.names)} names and {self.entries} entries")
        _check_name_list(self.names)


@dataclass(frozen=True, slots=True)
class FileStart:
    """The host user approved the offer: stream it under this transfer id."""

    KIND: ClassVar[Kind] = Kind.FILE_START
    transfer_id: int
    offer_id: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        _check_u64("offer_id", self.offer_id)


@dataclass(frozen=True, slots=True)
class FileBegin:
    """A stream of files from `source` follows; at most these counts (the approved ones)."""

    KIND: ClassVar[Kind] = Kind.FILE_BEGIN
    transfer_id: int
    entries: int
    files: int
    total_size: int
    flags: int
    source: str

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 < self.entries <= MAX_ENTRIES or not 0 <= self.files <= self.entries:
            raise ValueError(f"{self.entries} entries and {self.files} files are out of range")
        if not 0 <= self.total_size <= MAX_TRANSFER_SIZE:
            raise ValueError(f"total size {self.total_size} out of range")
        if self.flags & ~KNOWN_FILE_FLAGS:
            raise ValueError(f"unknown flags {self.flags:#x}")
        if not _SOURCE.fullmatch(self.source.encode("ascii", "replace")):
            raise ValueError(f"source name {self.source!r} is not a safe identifier")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One directory, regular file or symbolic link; a file's data follows in FileChunks."""

    KIND: ClassVar[Kind] = Kind.FILE_ENTRY
    transfer_id: int
    type: EntryType
    mode: int
    mtime_ns: int
    size: int
    path: bytes
    target: bytes = b""

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        EntryType(self.type)
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"mode {self.mode:o} out of range")
        if not -(1 << 63) <= self.mtime_ns < 1 << 63:
            raise ValueError("mtime out of range")
        if not 0 <= self.size <= MAX_TRANSFER_SIZE or (self.size and self.type != EntryType.FILE):
            raise ValueError(f"size {self.size} out of range for a {EntryType(self.type).name.lower()}")
        if not 0 < len(self.path) <= MAX_PATH:
            raise ValueError(f"path of {len(self.path)} bytes (1 to {MAX_PATH})")
        if self.type == EntryType.SYMLINK:
            if not 0 < len(self.target) <= MAX_PATH:
                raise ValueError(f"link target of {len(self.target)} bytes (1 to {MAX_PATH})")
        elif self.target:
            raise ValueError("only a symbolic link has a target")


@dataclass(frozen=True, slots=True)
class FileChunk:
    KIND: ClassVar[Kind] = Kind.FILE_CHUNK
    transfer_id: int
    offset: int
    data: bytes | bytearray | memoryview

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 <= self.offset <= MAX_TRANSFER_SIZE:
            raise ValueError(f"offset {self.offset} out of range")


@dataclass(frozen=True, slots=True)
class FileEnd:
    """The current file's data is complete; `digest` is its SHA-256."""

    KIND: ClassVar[Kind] = Kind.FILE_END
    transfer_id: int
    digest: bytes

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest of {len(self.digest)} bytes, expected {DIGEST_SIZE}")


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The explicit end marker: how many entries and data bytes the stream held."""

    KIND: ClassVar[Kind] = Kind.STREAM_END
    transfer_id: int
    entries: int
    total_size: int

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        if not 0 <= self.entries <= MAX_ENTRIES or not 0 <= self.total_size <= MAX_TRANSFER_SIZE:
            raise ValueError("entry count or total size out of range")


@dataclass(frozen=True, slots=True)
class FileResult:
    """How a file transfer ended: OK, or a code with the relative name it failed on.

    `detail` is a short reason for people (e.g. "a '..' component"); whoever shows
    it escapes it first, since a hostile peer may have written it.
    """

    KIND: ClassVar[Kind] = Kind.FILE_RESULT
    transfer_id: int
    code: FileCode
    errno: int = 0
    entries_done: int = 0
    name: bytes = b""
    detail: bytes = b""

    def __post_init__(self) -> None:
        _check_u64("transfer_id", self.transfer_id)
        FileCode(self.code)
        if not 0 <= self.errno <= 0xFFFFFFFF:
            raise ValueError(f"errno {self.errno} out of range")
        _check_u64("entries_done", self.entries_done)
        if len(self.name) > MAX_PATH or len(self.detail) > MAX_DETAIL:
            raise ValueError(f"name of {len(self.name)} or detail of {len(self.detail)} bytes")


StreamMessage = FileEntry | FileChunk | FileEnd | StreamEnd
"""What a sender streams after FileStart, in the order protocol.filestream checks."""
STREAM_KINDS = frozenset({Kind.FILE_ENTRY, Kind.FILE_CHUNK, Kind.FILE_END, Kind.STREAM_END})

Message = (
    CopyRequest | DataBegin | DataChunk | DataEnd | Status | Cancel
    | FileOffer | FileStart | FileBegin | FileEntry | FileChunk | FileEnd | StreamEnd | FileResult
)

_QQ = struct.Struct("<QQ")
_Q = struct.Struct("<Q")
_STATUS = struct.Struct("<QIIQ")
_COUNTS = struct.Struct("<QQQQII")  # FileOffer and FileBegin heads
_ENTRY = struct.Struct("<QIIqQHHI")
_END = struct.Struct(f"<Q{DIGEST_SIZE}s")
_STREAM_END = struct.Struct("<QQQ")
_RESULT = struct.Struct("<QIIQHHI")
CHUNK_HEADER_SIZE = _QQ.size
FILE_ENTRY_HEADER_SIZE = _ENTRY.size


def encode(message: Message) -> tuple[int, list[bytes | bytearray | memoryview]]:
    """Return (record kind, payload parts); chunk data is passed through uncopied."""
    if type(message) is FileChunk:  # the most frequent record by far
        return Kind.FILE_CHUNK, [_QQ.pack(message.transfer_id, message.offset), message.data]
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
        case FileOffer(offer_id, entries, files, total, flags, roots, names):
            return Kind.FILE_OFFER, [_COUNTS.pack(offer_id, entries, files, total, flags, roots),
                                     b"\0".join(names)]
        case FileStart(transfer_id, offer_id):
            return Kind.FILE_START, [_QQ.pack(transfer_id, offer_id)]
        case FileBegin(transfer_id, entries, files, total, flags, source):
            return Kind.FILE_BEGIN, [_COUNTS.pack(transfer_id, entries, files, total, flags, 0),
                                     source.encode("ascii")]
        case FileEntry(transfer_id, etype, mode, mtime_ns, size, path, target):
            head = _ENTRY.pack(transfer_id, int(etype), mode, mtime_ns, size, len(path), len(target), 0)
            return Kind.FILE_ENTRY, [head, path, target]
        case FileChunk(transfer_id, offset, data):
            return Kind.FILE_CHUNK, [_QQ.pack(transfer_id, offset), data]
        case FileEnd(transfer_id, digest):
            return Kind.FILE_END, [_END.pack(transfer_id, digest)]
        case StreamEnd(transfer_id, entries, total):
            return Kind.STREAM_END, [_STREAM_END.pack(transfer_id, entries, total)]
        case FileResult(transfer_id, code, err, done, name, detail):
            head = _RESULT.pack(transfer_id, int(code), err, done, len(name), len(detail), 0)
            return Kind.FILE_RESULT, [head, name, detail]
    raise TypeError(f"not a message: {message!r}")


def encode_stream(
    message: StreamMessage, transfer_id: int
) -> tuple[int, list[bytes | bytearray | memoryview]]:
    """Encode a stream record under another transfer id (the relay re-tags every record).

    The hot path of a relay: no new message object, chunk data passed through uncopied.
    """
    if type(message) is FileChunk:
        return Kind.FILE_CHUNK, [_QQ.pack(transfer_id, message.offset), message.data]
    kind, parts = encode(message)
    head = parts[0]
    parts[0] = _Q.pack(transfer_id) + bytes(head[_Q.size :])  # every stream head starts with the id
    return kind, parts


def decode(kind: int, payload: bytes | memoryview) -> Message:
    """Parse one record.  `payload` may be a view into shared memory: each field is
    read once into private memory, and only a chunk's data stays a view.

    Raises:
        RemoteProtocolError: unknown kind, wrong payload size or out-of-range field.
    """
    try:
        if kind == Kind.FILE_CHUNK:  # the most frequent record by far
            transfer_id, offset = _head(_QQ, payload)
            return FileChunk(transfer_id, offset, memoryview(payload)[_QQ.size :])
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
            case Kind.FILE_OFFER:
                offer_id, entries, files, total, flags, roots = _head(_COUNTS, payload)
                rest = bytes(payload[_COUNTS.size :])
                names = tuple(rest.split(b"\0")) if rest else ()
                return FileOffer(offer_id, entries, files, total, flags, roots, names)
            case Kind.FILE_START:
                return FileStart(*_exact(_QQ, payload))
            case Kind.FILE_BEGIN:
                transfer_id, entries, files, total, flags, zero = _head(_COUNTS, payload)
                if zero:
                    raise RemoteProtocolError("file begin record has non-zero reserved bits")
                source = bytes(payload[_COUNTS.size :])
                if not _SOURCE.fullmatch(source):
                    raise RemoteProtocolError(f"source name {source[:60]!r} is not a safe identifier")
                return FileBegin(transfer_id, entries, files, total, flags, source.decode("ascii"))
            case Kind.FILE_ENTRY:
                return decode_entry(payload)
            case Kind.FILE_CHUNK:
                transfer_id, offset = _head(_QQ, payload)
                return FileChunk(transfer_id, offset, memoryview(payload)[_QQ.size :])
            case Kind.FILE_END:
                return FileEnd(*_exact(_END, payload))
            case Kind.STREAM_END:
                return StreamEnd(*_exact(_STREAM_END, payload))
            case Kind.FILE_RESULT:
                transfer_id, code, err, done, name_len, detail_len, zero = _head(_RESULT, payload)
                if zero or len(payload) != _RESULT.size + name_len + detail_len:
                    raise RemoteProtocolError("file result record has bad lengths or reserved bits")
                body = bytes(payload[_RESULT.size :])
                return FileResult(transfer_id, FileCode(code), err, done, body[:name_len], body[name_len:])
    except ValueError as exc:  # a field out of range, an unknown status code
        raise RemoteProtocolError(f"invalid {_kind_name(kind)} record: {exc}") from exc
    raise RemoteProtocolError(f"unknown record kind {kind}")


def decode_entry(payload: bytes | memoryview) -> FileEntry:
    """Parse a FileEntry record (copied into private memory first: its fields are checked).

    Raises:
        RemoteProtocolError: the lengths do not add up or a field is out of range.
    """
    try:
        transfer_id, etype, mode, mtime_ns, size, path_len, target_len, zero = _head(_ENTRY, payload)
        if zero:
            raise RemoteProtocolError("file entry record has non-zero reserved bits")
        if len(payload) != _ENTRY.size + path_len + target_len:
            raise RemoteProtocolError(
                f"file entry of {len(payload)} bytes does not hold a {path_len}-byte path "
                f"and a {target_len}-byte target"
            )
        body = bytes(payload[_ENTRY.size :])
        return FileEntry(transfer_id, EntryType(etype), mode, mtime_ns, size,
                         body[:path_len], body[path_len:])
    except ValueError as exc:
        raise RemoteProtocolError(f"invalid FILE_ENTRY record: {exc}") from exc


def _exact(layout: struct.Struct, payload: bytes | memoryview) -> tuple[Any, ...]:
    if len(payload) != layout.size:
        raise RemoteProtocolError(f"record of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def _head(layout: struct.Struct, payload: bytes | memoryview) -> tuple[Any, ...]:
    if len(payload) < layout.size:
        raise RemoteProtocolError(
            f"record of {len(payload)} bytes is shorter than its {layout.size}-byte head"
        )
    return layout.unpack_from(payload)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind-{kind}"
