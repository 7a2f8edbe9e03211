"""The file stream: its order, the names and links it may carry, and how a receiver checks it.

Pure code, like the rest of this package: no files are opened here.  The
filesystem side lives in :mod:`filexfer`; the broker uses the same checker to
hold a relayed stream to what the host user approved.

A transfer, after the host user's gesture::

    sender   -> FileEntry(type, path, mode, mtime_ns, size[, target])   one per directory, file, link
                FileChunk(offset, data) ... FileEnd(sha256)             after each regular file only
                ...
                StreamEnd(entries, total_size)                          the explicit end marker
    receiver -> FileResult(code, errno, entries_done, name, detail)    OK only after StreamEnd

Order: depth first, a directory before what it holds, and all of a directory's
entries before anything outside it (so a directory, once left, is finished and
never reopened).  Each regular file's data follows its entry as chunks at
increasing offsets that add up to exactly its declared size (an empty file has
no chunk), then a FileEnd with the SHA-256 of that data.  StreamEnd repeats the
number of entries and data bytes; a stream that stops without it is never
completed.

Paths are relative byte strings, components separated by "/".  Always refused,
whatever the options (a sender that writes these is lying, or broken):

* empty, absolute (leading "/"), an empty component ("a//b"), a trailing "/";
* a "." or ".." component; a NUL byte;
* a component over 255 bytes, a path over 4095 bytes, more than 64 levels;
* an entry whose parent directory is not the one being sent (out of order).

Refused by default, allowed by the receiver's ``allow_unsafe_names`` option
(still without any of the above, so still without any path escape):

* bytes that are not valid UTF-8;
* control characters (C0, DEL, C1), line and paragraph separators (U+2028,
  U+2029) and the bidirectional controls (U+061C, U+200E, U+200F, U+202A-U+202E,
  U+2066-U+2069: "Trojan Source" characters, e.g. U+202E RIGHT-TO-LEFT OVERRIDE).

Letters of every script are fine, and so are spaces, a leading "-" and
look-alikes such as the fullwidth bar (U+FF5C): the receiver never passes a name to
a shell, and every display goes through :func:`display`.

Symbolic links: the target must be relative, with the same component rules
(no ".", no empty component), with ".." only as leading components, and no
more of them than the link's depth inside its top-level entry: a link
``top/a/link`` may point at ``b``, ``../b`` (``top/b``) or ``..`` (``top``), never
at ``../..`` or anything above ``top``.  ".." after a name ("d/../..") is refused because a kernel
resolves it after following "d", which may itself be a link.  A link at the top
level has no tree to point into and is refused.  By induction every link then
resolves inside its tree.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass

from protocol.errors import FileRefused
from protocol.messages import (
    MAX_NAME,
    MAX_OFFER_NAMES,
    MAX_PATH,
    EntryType,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    StreamEnd,
    StreamMessage,
)

MAX_DEPTH = 64
"""Deepest path, in components.  A receiver holds one directory descriptor per level
open at once, so this bounds its descriptors (far below the usual limit of 1024)."""

STAGING_PREFIX = b".ivclip-partial-"
"""A receiver writes a transfer in progress under a hidden directory of this name (plus
the transfer id) and removes any such directory at its start: a top-level entry may
not take such a name, or it would be removed with the leftovers."""

BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""The Unicode Bidi_Control characters: they reorder what a terminal shows."""
_LINE_SEPARATORS = frozenset("\u2028\u2029")


@dataclass(frozen=True, slots=True)
class NamePolicy:
    """What a receiver accepts beyond the rules that always hold."""

    allow_unsafe_names: bool = False


STRICT = NamePolicy()
LENIENT = NamePolicy(allow_unsafe_names=True)


def _name_refused(path: bytes, detail: str) -> FileRefused:
    return FileRefused(FileCode.NAME_REFUSED, path, detail)


def unsafe_reason(component: bytes) -> str | None:
    """Why `component` is refused by default (None if it is fine)."""
    try:
        text = component.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    for char in text:
        if unicodedata.category(char) == "Cc":
            return f"a control character ({_escape_char(char)})"
        if char in BIDI_CONTROLS:
            return f"a bidirectional control character ({_escape_char(char)})"
        if char in _LINE_SEPARATORS:
            return f"a line separator ({_escape_char(char)})"
    return None


def split_path(path: bytes, policy: NamePolicy = STRICT) -> tuple[bytes, ...]:
    """Check a relative path and return its components.

    Raises:
        FileRefused: (NAME_REFUSED) the path breaks a rule; `detail` says which.
    """
    if not path:
        raise _name_refused(path, "an empty path")
    if len(path) > MAX_PATH:
        raise _name_refused(path, f"a path over {MAX_PATH} bytes")
    if b"\0" in path:
        raise _name_refused(path, "a NUL byte")
    if path.startswith(b"/"):
        raise _name_refused(path, "an absolute path")
    parts = tuple(path.split(b"/"))
    if parts[0].startswith(STAGING_PREFIX):
        raise _name_refused(path, f"a top-level name starting with '{STAGING_PREFIX.decode()}' "
                            "(reserved for transfers in progress)")
    if len(parts) > MAX_DEPTH:
        raise _name_refused(path, f"more than {MAX_DEPTH} levels")
    for part in parts:
        if not part:
            raise _name_refused(path, "an empty component (a doubled or trailing '/')")
        if part in (b".", b".."):
            raise _name_refused(path, f"a '{part.decode()}' component")
        if len(part) > MAX_NAME:
            raise _name_refused(path, f"a component over {MAX_NAME} bytes")
        if not policy.allow_unsafe_names:
            reason = unsafe_reason(part)
            if reason:
                raise _name_refused(path, reason)
    return parts


def check_link(parts: tuple[bytes, ...], target: bytes, policy: NamePolicy = STRICT) -> None:
    """Check that the link at `parts` (from :func:`split_path`) points inside its tree.

    Raises:
        FileRefused: (LINK_REFUSED) the target is absolute, climbs out of the
            link's top-level entry, or has a component the name rules refuse.
    """
    path = b"/".join(parts)

    def refused(detail: str) -> FileRefused:
        return FileRefused(FileCode.LINK_REFUSED, path, detail)

    if not target or len(target) > MAX_PATH:
        raise refused(f"a link target of {len(target)} bytes")
    if b"\0" in target:
        raise refused("a NUL byte in its target")
    if target.startswith(b"/"):
        raise refused("its target is an absolute path")
    if len(parts) < 2:
        raise refused("a link at the top level has no tree to point into")
    climbs = 0
    named = False
    for part in target.split(b"/"):
        if not part:
            raise refused("an empty component in its target (a doubled or trailing '/')")
        if part == b".":
            raise refused("a '.' component in its target")
        if part == b"..":
            if named:
                raise refused("'..' after a name in its target (it may resolve through a link)")
            climbs += 1
            continue
        named = True
        if len(part) > MAX_NAME:
            raise refused(f"a target component over {MAX_NAME} bytes")
        if not policy.allow_unsafe_names:
            reason = unsafe_reason(part)
            if reason:
                raise refused(f"its target holds {reason}")
    # The link's directory is parts[:-1]; going up len(parts) - 2 levels reaches the top entry.
    if climbs > len(parts) - 2:
        raise refused("its target climbs out of the copied tree")


# Display ---------------------------------------------------------------------
def _escape_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named:
        return named
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def display(raw: bytes | str) -> str:
    """A name made safe to print: letters of every script stay, anything a terminal would
    act on or that hides (controls, bidi controls, invisible format characters, odd spaces,
    bytes that are not UTF-8) becomes a visible escape such as ``\\u202e`` or ``\\xff``."""
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == " " or unicodedata.category(char) not in _HIDDEN_CATEGORIES:
            out.append(char)
        else:
            out.append(_escape_char(char))
    return "".join(out)


_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def offer_names(roots: list[bytes]) -> tuple[bytes, ...]:
    """The first root names that fit in an offer (the count says how many there are)."""
    kept: list[bytes] = []
    size = 0
    for name in roots:
        cost = len(name) + (1 if kept else 0)
        if size + cost > MAX_OFFER_NAMES:
            break
        kept.append(name)
        size += cost
    return tuple(kept)


# The checker -----------------------------------------------------------------
class Phase(enum.Enum):
    ENTRIES = "between entries"
    DATA = "inside a file's data"
    DIGEST = "expecting a file's checksum"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class EntryStep:
    """What a FileEntry means once checked: its components and how many open
    directories it closed (the innermost first) before it."""

    parts: tuple[bytes, ...]
    closed: int


class StreamChecker:
    """Checks one stream against the rules above and against the counts it may hold.

    Feed every stream message in order to :meth:`check`.  It raises on the first
    violation; after that the stream is dead.  Memory is bounded by MAX_DEPTH.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_files: int,
        max_bytes: int,
        policy: NamePolicy = STRICT,
        offered: tuple[int, tuple[bytes, ...]] | None = None,
    ) -> None:
        """`offered`: the offer's count of top-level entries and the names it showed (the
        first ones, in order); the stream's top-level entries must be exactly those."""
        self.max_entries = max_entries
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.policy = policy
        self.phase = Phase.ENTRIES
        self.entries = 0
        self.files = 0
        self.bytes = 0
        self.stack: list[bytes] = []
        self.current: bytes = b""
        self._size = 0
        self._received = 0
        self._offered = offered
        self.roots = 0  # top-level entries so far

    @property
    def open_dirs(self) -> int:
        return len(self.stack)

    def _bad(self, detail: str, name: bytes | None = None) -> FileRefused:
        return FileRefused(FileCode.BAD_STREAM, self.current if name is None else name, detail)

    def check(self, message: StreamMessage) -> EntryStep | None:
        """Check the next message; for a FileEntry return what it means.

        Raises:
            FileRefused: the message breaks the order, a count, a size or a name rule.
        """
        match message:
            case FileEntry():
                return self._entry(message)
            case FileChunk(_, offset, data):
                size = len(data)
                if self.phase is not Phase.DATA:
                    raise self._bad(f"a data chunk {self.phase.value}")
                if offset != self._received or size == 0 or size > self._size - self._received:
                    raise self._bad(
                        f"a chunk of {size} bytes at offset {offset} after {self._received} "
                        f"of the {self._size} bytes declared"
                    )
                self._received += size
                if self._received == self._size:
                    self.phase = Phase.DIGEST
                return None
            case FileEnd():
                if self.phase is Phase.DATA:
                    raise self._bad(f"the file ended after {self._received} of the {self._size} "
                                    "bytes declared")
                if self.phase is not Phase.DIGEST:
                    raise self._bad(f"a file checksum {self.phase.value}")
                self.phase = Phase.ENTRIES
                return None
            case StreamEnd(_, entries, total):
                if self.phase is not Phase.ENTRIES:
                    raise self._bad(f"the end marker {self.phase.value}")
                if (entries, total) != (self.entries, self.bytes):
                    raise self._bad(
                        f"the end marker counts {entries} entries and {total} bytes, "
                        f"the stream held {self.entries} and {self.bytes}", b"")
                if self._offered is not None and self.roots != self._offered[0]:
                    raise self._bad(f"the stream held {self.roots} top-level entries, the offer "
                                    f"{self._offered[0]}", b"")
                self.phase = Phase.ENDED
                self.stack.clear()
                return None
        raise TypeError(f"not a stream message: {message!r}")

    def _entry(self, entry: FileEntry) -> EntryStep:
        if self.phase is not Phase.ENTRIES:
            raise self._bad(f"a new entry {self.phase.value}", entry.path)
        self.current = entry.path
        parts = split_path(entry.path, self.policy)
        parent = list(parts[:-1])
        if parent != self.stack[: len(parent)]:
            raise self._bad("an entry outside the directory being sent (or its directory was "
                            "not sent first)")
        closed = len(self.stack) - len(parent)
        if self.entries + 1 > self.max_entries:
            raise FileRefused(FileCode.TOO_LARGE, entry.path,
                              f"more than the {self.max_entries} entries announced")
        if entry.type == EntryType.SYMLINK:
            check_link(parts, entry.target, self.policy)
        if len(parts) == 1 and self._offered is not None:
            self._check_root(parts[0])
        del self.stack[len(parent) :]
        self.entries += 1
        if entry.type == EntryType.DIRECTORY:
            self.stack.append(parts[-1])
        elif entry.type == EntryType.FILE:
            if self.files + 1 > self.max_files or self.bytes + entry.size > self.max_bytes:
                raise FileRefused(FileCode.TOO_LARGE, entry.path,
                                  f"more than the {self.max_files} files or {self.max_bytes} bytes "
                                  "announced")
            self.files += 1
            self.bytes += entry.size
            self._size = entry.size
            self._received = 0
            self.phase = Phase.DATA if entry.size else Phase.DIGEST
        return EntryStep(parts, closed)

    def _check_root(self, name: bytes) -> None:
        assert self._offered is not None
        count, names = self._offered
        if self.roots >= count:
            raise self._bad(f"more top-level entries than the {count} offered")
        if self.roots < len(names) and name != names[self.roots]:
            raise self._bad(f"a top-level entry where the offer named '{display(names[self.roots])}'")
        self.roots += 1
