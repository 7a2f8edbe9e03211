"""Sending: scan the sources, stream them, and delete them after a confirmed ``--move``.

Sources are the paths the user named.  Each arrives under its own last
component (``send /a/photos`` arrives as ``photos``).  A named path that is a
symbolic link is followed (the user named it); below it, nothing is followed:
every directory is opened with O_NOFOLLOW relative to its parent, and links
travel as links.  FIFOs, sockets and devices are skipped with a notice; hard
links are read once per name, so they arrive as separate files.

:func:`scan` runs in the command-line process before anything is offered: it
counts what the host user will approve and finds every problem the receiver
would refuse anyway (unreadable files, links out of the tree, over-long
paths), so they are reported before the gesture, not after.  Its memory is
bounded (a few notices, counters).

:class:`TreeSender` then streams the same tree lazily, one record per call, as
the ring takes them: at most one chunk buffer whatever the sizes.  If the tree
changed since the scan so that it no longer fits what was announced, it stops
with SOURCE_CHANGED rather than break the announced counts.

With ``--move`` it keeps a ledger of what it sent (name, device, inode, size,
mtime: memory proportional to the number of entries, the only part that is),
and :func:`delete_sent` removes exactly those, only if each is unchanged, and
only once the receiver confirmed every file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from filexfer.errors import SourceError
from filexfer.fsops import open_dir
from protocol.errors import FileRefused
from protocol.filestream import (
    LENIENT,
    MAX_DEPTH,
    check_link,
    display,
    offer_names,
    split_path,
    unsafe_reason,
)
from protocol.messages import (
    FLAG_MOVE,
    MAX_ENTRIES,
    MAX_TRANSFER_SIZE,
    EntryType,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileOffer,
    FileResult,
    Message,
    StreamEnd,
)

log = logging.getLogger(__name__)

MAX_NOTICES = 20
"""Notices and problems listed one by one; beyond this only their number is kept."""


@dataclass(frozen=True, slots=True)
class Source:
    """A path the user named: the folder it is in, and its name there (its name on arrival)."""

    parent: bytes
    name: bytes

    @property
    def path(self) -> bytes:
        return os.path.join(self.parent, self.name)


def sources_from_paths(paths: list[bytes]) -> list[Source]:
    """Turn the user's paths into sources (absolute, each with its arrival name).

    Raises:
        SourceError: no path, a path with no name of its own ("/"), or two with one name.
    """
    if not paths:
        raise SourceError("nothing to send: name at least one file or directory")
    sources: list[Source] = []
    seen: dict[bytes, bytes] = {}
    for raw in paths:
        absolute = os.path.abspath(raw)  # lexical: "a/.." is the current directory's parent
        parent, name = os.path.split(absolute)
        if not name:
            raise SourceError(f"cannot send {display(raw)}: it has no name to arrive under")
        if name in seen:
            raise SourceError(f"two sources would arrive as '{display(name)}': "
                              f"{display(seen[name])} and {display(raw)}")
        seen[name] = raw
        sources.append(Source(parent, name))
    return sources


# Walking ---------------------------------------------------------------------------
class WalkError(Exception):
    """An OSError while walking, with the relative path it happened on."""

    def __init__(self, path: bytes, error: OSError) -> None:
        super().__init__(f"{display(path)}: {error.strerror or error}")
        self.path = path
        self.error = error


@dataclass(slots=True)
class _Item:
    path: bytes  # relative, starting with the source's name
    name: bytes  # its name in dir_fd
    dir_fd: int  # valid until the walk moves on
    st: os.stat_result  # lstat, except for the named source itself (followed)
    root: bool


def _kind(mode: int) -> EntryType | None:
    if stat.S_ISREG(mode):
        return EntryType.FILE
    if stat.S_ISDIR(mode):
        return EntryType.DIRECTORY
    if stat.S_ISLNK(mode):
        return EntryType.SYMLINK
    return None


def _what(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file, directory or link"


def _walk(source: Source) -> Iterator[_Item]:
    """Depth first, a directory before its entries; O(depth) descriptors and memory."""
    try:
        parent_fd = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WalkError(source.parent, exc) from exc
    try:
        try:
            st = os.stat(source.name, dir_fd=parent_fd)  # followed: the user named it
        except OSError as exc:
            raise WalkError(source.path, exc) from exc
        yield _Item(source.name, source.name, parent_fd, st, True)
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(source.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as exc:
                raise WalkError(source.name, exc) from exc
            try:
                yield from _walk_dir(fd, source.name, 1)
            finally:
                os.close(fd)
    finally:
        os.close(parent_fd)


def _walk_dir(fd: int, prefix: bytes, depth: int) -> Iterator[_Item]:
    if depth >= MAX_DEPTH:
        raise WalkError(prefix, OSError(0, f"deeper than {MAX_DEPTH} levels"))
    try:
        entries = os.scandir(fd)
    except OSError as exc:
        raise WalkError(prefix, exc) from exc
    with entries:
        while True:
            try:
                entry = next(entries, None)
            except OSError as exc:
                raise WalkError(prefix, exc) from exc
            if entry is None:
                return
            name = os.fsencode(entry.name)
            path = prefix + b"/" + name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise WalkError(path, exc) from exc
            yield _Item(path, name, fd, st, False)
            if stat.S_ISDIR(st.st_mode):
                try:
                    child = open_dir(name, fd)
                except OSError as exc:
                    raise WalkError(path, exc) from exc
                try:
                    yield from _walk_dir(child, path, depth + 1)
                finally:
                    os.close(child)


# Scanning --------------------------------------------------------------------------
@dataclass(slots=True)
class Scan:
    """What a send would carry, and what stands in its way."""

    sources: list[Source]
    move: bool = False
    entries: int = 0
    files: int = 0
    dirs: int = 0
    links: int = 0
    total_size: int = 0
    notices: list[str] = field(default_factory=list)
    notice_count: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    def _note(self, text: str) -> None:
        self.notice_count += 1
        if len(self.notices) < MAX_NOTICES:
            self.notices.append(text)

    def _problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_NOTICES:
            self.problems.append(text)

    def offer(self, offer_id: int) -> FileOffer:
        """The announcement for the host user."""
        roots = [s.name for s in self.sources]
        return FileOffer(offer_id, self.entries, self.files, self.total_size,
                         FLAG_MOVE if self.move else 0, len(roots), offer_names(roots))


def scan(sources: list[Source], *, move: bool = False) -> Scan:
    """Walk the sources once: counts, notices (skipped entries) and problems.

    Never raises for what it finds: every problem is recorded with its path.
    """
    result = Scan(sources, move)
    for source in sources:
        try:
            for item in _walk(source):
                _scan_item(result, item, move)
        except WalkError as exc:
            result._problem(f"cannot read {exc}")
    return result


def _scan_item(result: Scan, item: _Item, move: bool) -> None:
    kind = _kind(item.st.st_mode)

    def shown() -> str:  # only notices and problems show a name: escape it only then
        return display(item.path)

    if kind is None:
        if item.root:
            result._problem(f"{shown()}: {_what(item.st.st_mode)}; only files, directories and links "
                            "are sent")
        else:
            result._note(f"skipped {shown()}: {_what(item.st.st_mode)}")
        return
    if item.root and move and stat.S_ISLNK(
            os.stat(item.name, dir_fd=item.dir_fd, follow_symlinks=False).st_mode):
        result._problem(f"{shown()} is a symbolic link: name the real path to move it")
        return
    try:
        parts = split_path(item.path, LENIENT)
        if kind is EntryType.SYMLINK:
            check_link(parts, os.readlink(item.name, dir_fd=item.dir_fd), LENIENT)
    except FileRefused as exc:
        result._problem(f"{shown()}: the receiver would refuse it: {exc.detail}")
        return
    except OSError as exc:
        result._problem(f"{shown()}: {exc.strerror}")
        return
    unsafe = unsafe_reason(parts[-1])
    if unsafe:  # the receiver's own policy decides: say so before the user approves
        result._note(f"{shown()} has {unsafe}: a receiver refuses it unless it allows unsafe names")
    result.entries += 1
    if kind is EntryType.FILE:
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if item.root else os.O_NOFOLLOW)
        try:
            os.close(os.open(item.name, flags, dir_fd=item.dir_fd))
        except OSError as exc:
            result._problem(f"cannot read {shown()}: {exc.strerror}")
            return
        result.files += 1
        result.total_size += item.st.st_size
    elif kind is EntryType.DIRECTORY:
        result.dirs += 1
    else:
        result.links += 1


# Streaming -------------------------------------------------------------------------
class _Changed(Exception):
    def __init__(self, path: bytes, detail: str) -> None:
        super().__init__(detail)
        self.path = path
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Sent:
    source: int
    path: bytes
    kind: EntryType
    dev: int
    ino: int
    size: int
    mtime_ns: int


class TreeSender:
    """Streams the sources as protocol.filestream records, one per :meth:`next_message`.

    A chunk's data is a view of one reused buffer: it is valid until the next
    call (the ring takes each record before the next is asked for).  When
    reading fails, the stream stops (:meth:`next_message` returns None) and
    :attr:`failure` says why.
    """

    def __init__(
        self,
        sources: list[Source],
        transfer_id: int,
        *,
        chunk_size: int,
        max_entries: int,
        max_files: int,
        max_bytes: int,
        move: bool = False,
    ) -> None:
        self.sources = sources
        self.transfer_id = transfer_id
        self.limits = (max_entries, max_files, max_bytes)
        self.entries = 0
        self.files = 0
        self.bytes = 0
        self.skipped = 0
        self.failure: FileResult | None = None
        self.finished = False
        self.ledger: list[_Sent] | None = [] if move else None
        self.chunk_size = chunk_size
        self._buffer = bytearray(chunk_size)
        self._stream: Generator[Message, None, None] | None = self._records()

    def next_message(self) -> Message | None:
        """The next record, or None at the end (or after a failure)."""
        if self._stream is None:
            return None
        message = next(self._stream, None)
        if message is None:
            self._stream = None
        return message

    def close(self) -> None:
        """Stop early (a cancel): every descriptor the walk holds is closed."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _fail(self, code: FileCode, err: int, path: bytes, detail: str) -> None:
        self.failure = FileResult(self.transfer_id, code, err, self.entries, path[:4095],
                                  detail.encode()[:512])
        log.info("sending stopped at %s: %s", display(path), detail)

    def _count(self, kind: EntryType, size: int, path: bytes) -> None:
        max_entries, max_files, max_bytes = self.limits
        self.entries += 1
        if kind is EntryType.FILE:
            self.files += 1
            self.bytes += size
        if self.entries > max_entries or self.files > max_files or self.bytes > max_bytes:
            raise _Changed(path, "the sources grew since they were announced")

    def _records(self) -> Generator[Message, None, None]:
        tid = self.transfer_id
        try:
            for index, source in enumerate(self.sources):
                for item in _walk(source):
                    kind = _kind(item.st.st_mode)
                    if kind is None:
                        self.skipped += 1
                        continue
                    if kind is EntryType.FILE:
                        yield from self._file(index, item)
                        continue
                    self._count(kind, 0, item.path)
                    target = os.readlink(item.name, dir_fd=item.dir_fd) if kind is EntryType.SYMLINK else b""
                    mode = 0o777 if kind is EntryType.SYMLINK else stat.S_IMODE(item.st.st_mode)
                    yield FileEntry(tid, kind, mode, item.st.st_mtime_ns, 0, item.path, target)
                    self._record(index, item.path, kind, item.st)
            self.finished = True  # set first: the caller need not ask past the end marker
            yield StreamEnd(tid, self.entries, self.bytes)
        except WalkError as exc:
            self._fail(FileCode.READ_ERROR, exc.error.errno or 0, exc.path, exc.error.strerror or str(exc))
        except _Changed as exc:
            self._fail(FileCode.SOURCE_CHANGED, 0, exc.path, exc.detail)

    def _file(self, index: int, item: _Item) -> Iterator[Message]:
        tid = self.transfer_id
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if item.root else os.O_NOFOLLOW)
        try:
            fd = os.open(item.name, flags, dir_fd=item.dir_fd)
        except OSError as exc:
            raise WalkError(item.path, exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (item.st.st_dev, item.st.st_ino):
                raise _Changed(item.path, "it was replaced while being sent")
            size = st.st_size
            self._count(EntryType.FILE, size, item.path)
            yield FileEntry(tid, EntryType.FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size, item.path)
            digest = hashlib.sha256()
            view = memoryview(self._buffer)
            offset = 0
            while True:
                # Ask for one byte more than should remain: the end of the file shows as a
                # short read, with no extra call for most files (a small file is one read).
                remaining = size - offset
                want = min(len(view), remaining + 1)
                try:
                    got = os.readv(fd, [view[:want]])
                except OSError as exc:
                    raise WalkError(item.path, exc) from exc
                if got > remaining:
                    raise _Changed(item.path, "it grew while being sent")
                if got:
                    digest.update(view[:got])
                    yield FileChunk(tid, offset, view[:got])
                    offset += got
                if got < want:
                    if offset < size:
                        raise _Changed(item.path, f"it shrank to {offset} bytes while being sent")
                    break
            if os.fstat(fd).st_mtime_ns != st.st_mtime_ns:
                raise _Changed(item.path, "it was written to while being sent")
            yield FileEnd(tid, digest.digest())
            self._record(index, item.path, EntryType.FILE, st)
        finally:
            os.close(fd)

    def _record(self, index: int, path: bytes, kind: EntryType, st: os.stat_result) -> None:
        if self.ledger is not None:
            self.ledger.append(_Sent(index, path, kind, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


# Deleting after a confirmed move ---------------------------------------------------------
@dataclass(slots=True)
class MoveReport:
    deleted: int = 0
    kept: list[str] = field(default_factory=list)
    kept_count: int = 0

    def keep(self, text: str) -> None:
        self.kept_count += 1
        if len(self.kept) < MAX_NOTICES:
            self.kept.append(text)

    def summary(self) -> str:
        """'deleted 3 source entries; kept 1: <why>' for an outcome line."""
        text = f"deleted {self.deleted} source entr{'y' if self.deleted == 1 else 'ies'}"
        if self.kept_count:
            text += f"; kept {self.kept_count}: " + "; ".join(self.kept)
        return text


def delete_sent(sender: TreeSender) -> MoveReport:
    """Delete what `sender` sent, children first; keep (and say so) anything that changed.

    Call it only after the receiver confirmed every file.  Directories on the
    way are opened without following links; an entry is removed only if it is
    still the same (device, inode; and size and mtime for files), and a
    directory only if it is empty (it may hold skipped entries or new ones).
    Never raises: what cannot be deleted is reported.
    """
    report = MoveReport()
    if sender.ledger is None or not sender.finished:
        return report
    chain: list[tuple[bytes, int]] = []  # open directories: (relative path, fd)
    parents: dict[int, int] = {}
    try:
        for index, source in enumerate(sender.sources):
            try:
                parents[index] = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                report.keep(f"kept everything under {display(source.path)}: {exc.strerror}")
        for sent in reversed(sender.ledger):
            if sent.source not in parents:
                continue
            head, _, name = sent.path.rpartition(b"/")
            try:
                fd = _dir_fd(chain, parents[sent.source], head)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == (sent.dev, sent.ino)
                if sent.kind is EntryType.FILE:
                    same = same and (st.st_size, st.st_mtime_ns) == (sent.size, sent.mtime_ns)
                if not same:
                    report.keep(f"kept {display(sent.path)}: it changed after it was sent")
                    continue
                if sent.kind is EntryType.DIRECTORY:
                    _close_below(chain, sent.path)
                    os.rmdir(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
                report.deleted += 1
            except OSError as exc:
                why = "it holds entries that were not sent" if exc.errno == errno.ENOTEMPTY else exc.strerror
                report.keep(f"kept {display(sent.path)}: {why}")
    finally:
        _close_below(chain, b"")
        for fd in parents.values():
            os.close(fd)
    return report


def _close_below(chain: list[tuple[bytes, int]], path: bytes) -> None:
    """Close the open directories at or below `path` (b"" closes them all)."""
    while chain and (not path or chain[-1][0] == path or chain[-1][0].startswith(path + b"/")):
        os.close(chain.pop()[1])


def _dir_fd(chain: list[tuple[bytes, int]], parent_fd: int, path: bytes) -> int:
    """The descriptor of directory `path` (relative to the source's parent), reusing the chain.

    Every level is opened with O_NOFOLLOW (a moved source is never a link itself).
    """
    if not path:
        return parent_fd
    while chain and not (path == chain[-1][0] or path.startswith(chain[-1][0] + b"/")):
        os.close(chain.pop()[1])
    if chain and chain[-1][0] == path:
        return chain[-1][1]
    built, fd = chain[-1] if chain else (b"", parent_fd)
    for part in path[len(built) :].lstrip(b"/").split(b"/"):
        built = built + b"/" + part if built else part
        fd = open_dir(part, fd)
        chain.append((built, fd))
    return fd


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A `send` request from a local command, checked: what to stream and the counts it announced."""

    sources: list[Source]
    entries: int
    files: int
    total_size: int
    move: bool


def parse_send_request(header: dict[str, object], body: bytes) -> SendRequest:
    """Check the counts and paths of a `send` request (broker send, guestdrv send).

    Raises:
        SourceError: a count is missing, not an integer or out of range, or a path is unusable.
    """
    counts = [header.get(k) for k in ("entries", "files", "total_size")]
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise SourceError("bad request: send needs entries, files and total_size")
    entries, files, total = (int(c) for c in counts)  # type: ignore[call-overload]
    if not (0 < entries <= MAX_ENTRIES and 0 <= files <= entries and 0 <= total <= MAX_TRANSFER_SIZE):
        raise SourceError("bad request: counts out of range")
    sources = sources_from_paths([p for p in body.split(b"\0") if p])
    return SendRequest(sources, entries, files, total, header.get("move") is True)
