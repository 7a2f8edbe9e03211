"""Receiving: write one incoming stream under ``<incoming>/<source>/``, trusting nothing.

Every record is checked by protocol.filestream's :class:`StreamChecker` (order,
sizes, counts, the name and link rules, the receiver's name policy) before
anything is done with it.  Then:

* Staging: the whole transfer is written inside a hidden directory
  ``<incoming>/<source>/.ivclip-partial-<transfer id>/`` (mode 0700).  That is
  every file's temporary name: a file appears under its real name only after
  the end marker arrived and every file's SHA-256 matched, when each top-level
  entry is renamed into place with RENAME_NOREPLACE.  On any failure the
  staging directory is removed, so nothing partial stays visible (a driver
  killed mid-way leaves a hidden staging directory, removed at its next start).
* Never overwrite: a top-level name that exists in the incoming folder stops
  the transfer with EXISTS and that name (checked when the entry arrives, and
  again atomically by the final rename).  No numbered suffixes: a user who
  sends the same folder twice learns it, rather than finding "photos (2)".
* Every directory is created by us (mkdirat, mode 0700 while writing) and
  opened with O_DIRECTORY | O_NOFOLLOW relative to its parent descriptor;
  files are created with O_CREAT | O_EXCL | O_NOFOLLOW, links with symlinkat.
  So nothing is ever written through a link, even one the stream itself made.
* Modes are kept without the setuid, setgid and sticky bits (``mode & 0o777``);
  mtimes are kept (files and links when complete, directories when left, since
  writing into a directory changes its mtime).
* Free space: checked when the transfer starts (data plus one block per entry,
  and free inodes); running out later (ENOSPC, EDQUOT) stops it with NO_SPACE
  and the name, and the staging directory is removed.
* ``--move`` transfers (FLAG_MOVE): the files are flushed to disk (syncfs, in a
  helper thread so the driver keeps its heartbeat) before OK is sent, since
  the sender deletes its copy on OK.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from filexfer.fsops import chmod_dir, exists, open_dir, remove_tree, rename_noreplace, syncfs
from protocol.errors import FileRefused
from protocol.filestream import STAGING_PREFIX, NamePolicy, StreamChecker, display
from protocol.messages import (
    FLAG_MOVE,
    MAX_DETAIL,
    EntryType,
    FileBegin,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileResult,
    StreamEnd,
    StreamMessage,
)

log = logging.getLogger(__name__)

CLEANUP_WAIT_S = 1.0
"""How long an abort waits for the partial transfer to be removed before it lets the
removal finish in the background."""


@dataclass(slots=True)
class _OpenDir:
    fd: int
    mode: int
    mtime_ns: int


@dataclass(slots=True)
class _OpenFile:
    fd: int
    mode: int
    mtime_ns: int
    path: bytes
    digest: hashlib._Hash


def default_incoming() -> Path:
    return Path.home() / "ivclip-incoming"


def _result(begin: FileBegin, code: FileCode, name: bytes = b"", detail: str = "", err: int = 0,
            done: int = 0) -> FileResult:
    return FileResult(begin.transfer_id, code, err, done, name[:4095], detail.encode()[:MAX_DETAIL])


def _os_code(exc: OSError) -> FileCode:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileCode.NO_SPACE
    if exc.errno == errno.EEXIST:
        return FileCode.EXISTS
    return FileCode.WRITE_ERROR


def open_receiver(incoming: Path, begin: FileBegin, *, policy: NamePolicy) -> TreeReceiver | FileResult:
    """Get ready to write `begin`'s stream, or refuse it with a result saying why.

    The incoming folder itself is local configuration and may be reached
    through links; below it nothing is followed.  Never raises.
    """
    source = begin.source.encode("ascii")
    base_fd = src_fd = -1
    try:
        os.makedirs(incoming, mode=0o700, exist_ok=True)
        base_fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with contextlib.suppress(FileExistsError):
            os.mkdir(source, 0o700, dir_fd=base_fd)
        try:
            src_fd = open_dir(source, base_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return _result(begin, FileCode.WRITE_ERROR, source,
                               f"{incoming}/{begin.source} is not a directory (a link?); refusing it")
            raise
        shortfall = _space_shortfall(src_fd, begin)
        if shortfall:
            return _result(begin, FileCode.NO_SPACE, b"", shortfall)
        return TreeReceiver(src_fd, begin, policy=policy, where=incoming / begin.source)
    except OSError as exc:
        if src_fd >= 0:
            os.close(src_fd)
        return _result(begin, _os_code(exc), b"", f"cannot use the incoming folder {incoming}: "
                       f"{exc.strerror}", exc.errno or 0)
    finally:
        if base_fd >= 0:
            os.close(base_fd)


def _space_shortfall(fd: int, begin: FileBegin) -> str:
    """Why the filesystem under `fd` cannot hold the transfer ("" if it can, as far as we know)."""
    vfs = os.fstatvfs(fd)
    block = vfs.f_frsize or 4096
    need = begin.total_size + (begin.entries + 1) * block  # a partial block per entry, at worst
    free = vfs.f_bavail * block
    if need > free:
        return f"{begin.total_size} bytes in {begin.entries} entries need about {need} bytes; {free} are free"
    if vfs.f_files and vfs.f_favail < begin.entries + 1:
        return f"{begin.entries} entries need as many inodes; {vfs.f_favail} are free"
    return ""


def sweep_partials(incoming: Path) -> int:
    """Remove staging directories left by a receiver that was killed; returns how many.

    Never raises: what cannot be removed is logged.
    """
    removed = 0
    try:
        base_fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0  # no incoming folder yet: nothing to sweep
    try:
        for source in os.listdir(base_fd):
            try:
                src_fd = open_dir(os.fsencode(source), base_fd)
            except OSError:
                continue  # not a directory, or a link: not ours to sweep
            try:
                for name in os.listdir(src_fd):
                    raw = os.fsencode(name)
                    if raw.startswith(STAGING_PREFIX):
                        remove_tree(raw, src_fd)
                        removed += 1
            except OSError as exc:
                log.warning("cannot remove a partial transfer in %s/%s: %s", incoming, source, exc.strerror)
            finally:
                os.close(src_fd)
    finally:
        os.close(base_fd)
    if removed:
        log.info("removed %d partial transfer(s) left in %s", removed, incoming)
    return removed


class TreeReceiver:
    """Writes one stream.  Feed it every stream record in order; it answers with a FileResult
    once (OK after the end marker, or the first failure), and cleans up after itself."""

    def __init__(self, src_fd: int, begin: FileBegin, *, policy: NamePolicy, where: Path) -> None:
        self.begin = begin
        self.where = where
        self.entries_done = 0
        self.bytes_done = 0
        self.result: FileResult | None = None
        self._src_fd = src_fd
        self._checker = StreamChecker(max_entries=begin.entries, max_files=begin.files,
                                      max_bytes=begin.total_size, policy=policy)
        self._stack: list[_OpenDir] = []
        self._file: _OpenFile | None = None
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None
        self.placed = False
        """Every file is complete and in place under its real name (only the flush of a
        ``--move`` transfer may still be running): an abort from here on removes nothing."""
        self._staging = STAGING_PREFIX + b"%016x" % begin.transfer_id
        self._staging_fd = -1
        os.mkdir(self._staging, 0o700, dir_fd=src_fd)  # on failure the caller closes src_fd
        self._staging_fd = open_dir(self._staging, src_fd)

    @property
    def done(self) -> bool:
        return self.result is not None

    # Feeding ------------------------------------------------------------------------
    def feed(self, message: StreamMessage) -> FileResult | None:
        """Take the next record.  Returns the result when the transfer ended (either way),
        None while it goes on (or while a ``--move`` transfer is being flushed: see :meth:`poll`).

        Never raises for what the stream holds.
        """
        if self.result is not None or self._sync is not None:
            return None
        try:
            step = self._checker.check(message)
        except FileRefused as exc:
            log.warning("refused %s from %s: %s", display(exc.name), self.begin.source, exc.detail)
            return self._fail(FileCode(exc.code), exc.name, exc.detail)
        try:
            match message:
                case FileEntry():
                    assert step is not None
                    return self._entry(message, step.parts, step.closed)
                case FileChunk(_, _, data):
                    self._write(data)
                case FileEnd(_, digest):
                    return self._end_file(digest)
                case StreamEnd():
                    return self._finish()
        except OSError as exc:
            name = self._file.path if self._file else self._checker.current
            log.warning("writing %s from %s failed: %s", display(name), self.begin.source, exc.strerror)
            return self._fail(_os_code(exc), name, exc.strerror or str(exc), exc.errno or 0)
        return None

    def _entry(self, entry: FileEntry, parts: tuple[bytes, ...], closed: int) -> FileResult | None:
        for _ in range(closed):
            self._close_dir()
        parent = self._stack[-1].fd if self._stack else self._staging_fd
        name = parts[-1]
        if len(parts) == 1 and exists(name, self._src_fd):
            return self._fail(FileCode.EXISTS, entry.path,
                              f"'{display(name)}' already exists in {self.where}")
        if entry.type == EntryType.DIRECTORY:
            os.mkdir(name, 0o700, dir_fd=parent)
            self._stack.append(_OpenDir(open_dir(name, parent), entry.mode & 0o777, entry.mtime_ns))
        elif entry.type == EntryType.SYMLINK:
            os.symlink(entry.target, name, dir_fd=parent)
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
            self._file = _OpenFile(fd, entry.mode & 0o777, entry.mtime_ns, entry.path, hashlib.sha256())
        self.entries_done += 1
        return None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None
        view = memoryview(data)
        self._file.digest.update(view)
        while view.nbytes:
            written = os.write(self._file.fd, view)
            view = view[written:]
        self.bytes_done += len(data)

    def _end_file(self, digest: bytes) -> FileResult | None:
        current = self._file
        assert current is not None
        if current.digest.digest() != digest:
            return self._fail(FileCode.CHECKSUM, current.path, "the data does not match its SHA-256")
        os.fchmod(current.fd, current.mode)
        os.utime(current.fd, ns=(current.mtime_ns, current.mtime_ns))
        self._file = None
        os.close(current.fd)
        return None

    def _close_dir(self) -> None:
        opened = self._stack.pop()
        try:
            os.fchmod(opened.fd, opened.mode)
            os.utime(opened.fd, ns=(opened.mtime_ns, opened.mtime_ns))
        finally:
            os.close(opened.fd)

    def _finish(self) -> FileResult | None:
        while self._stack:
            self._close_dir()
        moved: list[bytes] = []
        for name in sorted(os.fsencode(n) for n in os.listdir(self._staging_fd)):
            try:
                self._move_into_place(name)
            except FileExistsError:
                self._roll_back(moved)
                return self._fail(FileCode.EXISTS, name, f"'{display(name)}' appeared in {self.where} "
                                  "during the transfer")
            except OSError:
                self._roll_back(moved)
                raise
            moved.append(name)
        os.rmdir(self._staging, dir_fd=self._src_fd)
        os.close(self._staging_fd)
        self._staging_fd = -1
        self.placed = True
        if self.begin.flags & FLAG_MOVE:
            # The sender deletes its copy on OK: flush first, off the loop (the heartbeat goes
            # on), through a descriptor of its own, which it closes: an abort meanwhile
            # neither waits for it nor pulls the descriptor from under it.
            flush_fd = os.dup(self._src_fd)
            self._sync = threading.Thread(target=self._flush, args=(flush_fd,), name="ivclip-syncfs",
                                          daemon=True)
            self._sync.start()
            return None
        return self._succeed()

    def _move_into_place(self, name: bytes) -> None:
        st = os.stat(name, dir_fd=self._staging_fd, follow_symlinks=False)
        # Moving a directory to another parent rewrites its "..": it must be writable.
        unlock = stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IWUSR and os.geteuid() != 0
        if unlock:
            os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IWUSR, dir_fd=self._staging_fd)
        moved = False
        try:
            rename_noreplace(self._staging_fd, name, self._src_fd, name)
            moved = True
        finally:
            if unlock:  # on the entry we moved, wherever it is now (never through a link)
                chmod_dir(name, self._src_fd if moved else self._staging_fd, stat.S_IMODE(st.st_mode))

    def _roll_back(self, moved: list[bytes]) -> None:
        for name in moved:
            try:
                rename_noreplace(self._src_fd, name, self._staging_fd, name)
            except OSError as exc:
                log.error("cannot take %s back out of %s after a failure: %s", display(name), self.where,
                          exc.strerror)

    def _flush(self, fd: int) -> None:
        try:
            syncfs(fd)
        except OSError as exc:
            self._sync_error = exc
        finally:
            os.close(fd)

    def poll(self) -> FileResult | None:
        """The result of a ``--move`` transfer once it is on disk (None until then)."""
        if self._sync is None or self._sync.is_alive() or self.result is not None or self._src_fd < 0:
            return None  # not flushing, still flushing, ended, or aborted
        self._sync.join()
        if self._sync_error is not None:
            err = self._sync_error
            return self._fail(FileCode.WRITE_ERROR, b"", f"flushing to disk failed: {err.strerror}",
                              err.errno or 0)
        return self._succeed()

    def _succeed(self) -> FileResult:
        self._close_all()
        self.result = _result(self.begin, FileCode.OK, done=self.entries_done)
        log.info("received %d entries (%d bytes) from %s into %s", self.entries_done, self.bytes_done,
                 self.begin.source, self.where)
        return self.result

    # Failing ----------------------------------------------------------------------
    def _fail(self, code: FileCode, name: bytes, detail: str, err: int = 0) -> FileResult:
        self.abort()
        self.result = _result(self.begin, code, name, detail, err, self.entries_done)
        return self.result

    def abort(self) -> None:
        """Stop and remove everything written so far, unless it is already in place (see
        :attr:`placed`); safe to call twice, never blocks on a flush, never raises."""
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None
        for opened in self._stack:
            os.close(opened.fd)
        self._stack.clear()
        if self._staging_fd >= 0:
            os.close(self._staging_fd)
            self._staging_fd = -1
            # A big tree takes a while to remove: the rest goes on in the background, so
            # the caller's loop (and the heartbeat) goes on; a leftover is swept at start.
            cleanup = threading.Thread(target=self._remove_staging, args=(os.dup(self._src_fd),),
                                       name="ivclip-cleanup", daemon=True)
            cleanup.start()
            cleanup.join(CLEANUP_WAIT_S)
        self._close_all()

    def _remove_staging(self, fd: int) -> None:
        try:
            remove_tree(self._staging, fd)
        except OSError as exc:
            log.error("cannot remove the partial transfer %s/%s: %s", self.where,
                      display(self._staging), exc.strerror)
        finally:
            os.close(fd)

    def _close_all(self) -> None:
        if self._src_fd >= 0:
            os.close(self._src_fd)
            self._src_fd = -1

