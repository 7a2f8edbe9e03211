"""Typed clipboard content: a small container carried inside the clipboard bytes.

The ring protocol (protocol.messages) moves one opaque byte string per
transfer.  To carry several representations of one copy (UTF-8 text and a PNG
image, say) without touching the wire protocol, the guest drivers put a
container inside those bytes.  The broker never looks inside the items; it
only checks that the container's header is well-formed and its sizes add up
(:func:`check_bounds`), so that a malformed copy is refused when it is made,
not when it is pasted.  The receiving guest parses the container strictly
(:func:`parse`) and applies its text policy (:func:`check_item`).

Layout, version 1 (little-endian)::

    offset  size  field
    ------  ----  ------------------------------------------------------------
         0     4  magic b"IVCT"
         4     1  version, exactly 1
         5     1  item count, 1..MAX_ITEMS
         6     2  reserved, zero
         8     -  count entries, each:
                    u8   MIME type length, 1..MAX_MIME_LEN
                    ...  MIME type, ASCII (see MIME_RE)
                    u64  item size
         -     -  the items' bytes, in entry order, back to back, nothing after

A container holds at least one item: an empty clipboard is not sent as a
container but answered with the EMPTY status.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from protocol.errors import ClipFormatError

MAGIC = b"IVCT"
VERSION = 1
MAX_ITEMS = 16
"""A copy offers a handful of representations; sixteen leaves room without letting
a hostile guest make the receiver walk a huge table."""
MAX_MIME_LEN = 127
"""RFC 6838 allows 127 characters for each of type and subtype; real clipboard types are short."""

TEXT_MIME = "text/plain;charset=utf-8"
"""The canonical type of clipboard text; every backend maps its own text target to this."""
PNG_MIME = "image/png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_HEADER = struct.Struct("<4sBBH")
_SIZE = struct.Struct("<Q")
MAX_OVERHEAD = _HEADER.size + MAX_ITEMS * (1 + MAX_MIME_LEN + _SIZE.size)
"""The most a container adds to its items' bytes: what a limit on content must allow the
wire on top, so that content of exactly the limit still travels."""
_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,62}"
MIME_RE = re.compile(rf"{_TOKEN}/{_TOKEN}(;{_TOKEN}={_TOKEN})?")
"""Lower-case type/subtype with at most one parameter, no spaces, quotes or markup:
a type string from a hostile guest may end up in a log line or a notification."""


@dataclass(frozen=True, slots=True)
class ClipItem:
    """One representation of the clipboard: a MIME type and its bytes."""

    mime: str
    data: bytes | bytearray | memoryview

    def __post_init__(self) -> None:
        check_mime(self.mime)


def check_mime(mime: str) -> None:
    """Raises:
    ClipFormatError: `mime` is not an acceptable MIME type string.
    """
    if not (0 < len(mime) <= MAX_MIME_LEN and MIME_RE.fullmatch(mime)):
        raise ClipFormatError(f"{mime[:40]!r} is not an acceptable MIME type")


def encode(items: Sequence[ClipItem]) -> bytearray:
    """Build a container holding `items`, in their order (the sender's preference).

    Raises:
        ClipFormatError: no items, too many, or a MIME type given twice.
    """
    if not 0 < len(items) <= MAX_ITEMS:
        raise ClipFormatError(f"a clipboard holds 1 to {MAX_ITEMS} items, not {len(items)}")
    mimes = [item.mime for item in items]
    if len(set(mimes)) != len(mimes):
        raise ClipFormatError(f"a MIME type appears twice in {mimes}")
    table = bytearray(_HEADER.pack(MAGIC, VERSION, len(items), 0))
    for item in items:
        name = item.mime.encode("ascii")
        table += bytes([len(name)]) + name + _SIZE.pack(memoryview(item.data).nbytes)
    out = bytearray(len(table) + sum(memoryview(i.data).nbytes for i in items))
    out[: len(table)] = table
    at = len(table)
    for item in items:
        view = memoryview(item.data).cast("B")
        out[at : at + view.nbytes] = view
        at += view.nbytes
    return out


def check_bounds(data: bytes | bytearray | memoryview) -> list[tuple[str, int]]:
    """Validate the container's header, entries and sizes; return (MIME type, size) pairs.

    Reads the header only, never the items: this is all the broker does.

    Raises:
        ClipFormatError: the bytes are not a valid version-1 container.
    """
    view = memoryview(data).cast("B")
    if view.nbytes < _HEADER.size:
        raise ClipFormatError(f"{view.nbytes} bytes are too short for a typed clipboard")
    magic, version, count, reserved = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ClipFormatError("not a typed ivclip clipboard (bad magic; an older driver?)")
    if version != VERSION:
        raise ClipFormatError(f"typed clipboard version {version}, this side understands {VERSION}")
    if reserved:
        raise ClipFormatError("reserved header bits are set")
    if not 0 < count <= MAX_ITEMS:
        raise ClipFormatError(f"item count {count} is not between 1 and {MAX_ITEMS}")
    at = _HEADER.size
    entries: list[tuple[str, int]] = []
    total = 0
    for _ in range(count):
        if at >= view.nbytes:
            raise ClipFormatError("the item table runs past the end")
        length = view[at]
        at += 1
        if not 0 < length <= MAX_MIME_LEN or at + length + _SIZE.size > view.nbytes:
            raise ClipFormatError(f"MIME type length {length} is invalid or runs past the end")
        try:
            mime = bytes(view[at : at + length]).decode("ascii")
        except UnicodeDecodeError:
            raise ClipFormatError("a MIME type is not ASCII") from None
        check_mime(mime)
        at += length
        (size,) = _SIZE.unpack_from(view, at)
        at += _SIZE.size
        total += size
        entries.append((mime, size))
    if len({mime for mime, _ in entries}) != count:
        raise ClipFormatError("a MIME type appears twice")
    if at + total != view.nbytes:
        raise ClipFormatError(
            f"the items declare {total} bytes but {view.nbytes - at} follow the table"
        )
    return entries


def parse(data: bytes | bytearray | memoryview) -> list[ClipItem]:
    """Validate the container and return its items as views into `data` (not copied).

    Raises:
        ClipFormatError: the bytes are not a valid version-1 container.
    """
    entries = check_bounds(data)
    view = memoryview(data).cast("B")
    at = view.nbytes - sum(size for _, size in entries)
    items = []
    for mime, size in entries:
        items.append(ClipItem(mime, view[at : at + size]))
        at += size
    return items


# Paste-side policy -----------------------------------------------------------
class TextPolicy(Enum):
    STRICT = "strict"
    """Text items must be valid UTF-8 with no control characters but tab, newline and CRLF."""
    PERMISSIVE = "permissive"
    """Items are installed as they come."""


# C0 controls but TAB and LF, DEL, and the C1 controls (as code points, after decoding).
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_item(item: ClipItem, policy: TextPolicy) -> str | None:
    """Why `item` may not be pasted under `policy`, or None if it may.

    Strict mode applies to every ``text/*`` item: a lone CR or an escape
    character can drive a terminal, so such text is refused whole (never
    pasted blank or stripped).  It also checks that an ``image/png`` item
    starts with the PNG signature.  Permissive mode accepts everything.
    """
    if policy is TextPolicy.PERMISSIVE:
        return None
    if item.mime.startswith("text/"):
        try:
            text = bytes(item.data).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{item.mime} is not valid UTF-8 (at byte {exc.start})"
        found = _FORBIDDEN.search(text.replace("\r\n", "\n"))
        if found is not None:
            return f"{item.mime} holds the control character U+{ord(found.group()):04X}"
        return None
    if item.mime == PNG_MIME and bytes(item.data[: len(PNG_SIGNATURE)]) != PNG_SIGNATURE:
        return "image/png does not start with the PNG signature"
    return None
