"""The filesystem side: the sender's scan and stream, the receiver's rules (in one process).

The gated path through the broker is tests/test_files_e2e.py; here the sender
feeds the receiver directly, and crafted streams play the lying sender.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from held_flush import HeldFlush

from filexfer import receiver as receiver_module
from filexfer.fsops import exists, open_dir, remove_tree
from filexfer.receiver import STAGING_PREFIX, TreeReceiver, open_receiver, sweep_partials
from filexfer.sender import Scan, TreeSender, delete_sent, scan, sources_from_paths
from protocol.filestream import LENIENT, STRICT, NamePolicy
from protocol.messages import (
    FLAG_MOVE,
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

TID = 0x1234


def send(paths: list[Path], incoming: Path, *, policy: NamePolicy = STRICT, move: bool = False,
         chunk: int = 4096) -> tuple[FileResult, TreeSender, Scan]:
    """One whole transfer, sender straight into receiver."""
    sources = sources_from_paths([os.fsencode(p) for p in paths])
    found = scan(sources, move=move)
    assert not found.problems, found.problems
    sender = TreeSender(sources, TID, chunk_size=chunk, max_entries=found.entries,
                        max_files=found.files, max_bytes=found.total_size, move=move)
    begin = FileBegin(TID, found.entries, found.files, found.total_size, FLAG_MOVE if move else 0, "alice")
    receiver = open_receiver(incoming, begin, policy=policy)
    if isinstance(receiver, FileResult):
        return receiver, sender, found
    result = None
    while result is None:
        message = sender.next_message()
        if message is None:
            assert sender.failure is not None
            receiver.abort()
            return sender.failure, sender, found
        result = receiver.feed(message)  # type: ignore[arg-type]
        while result is None and receiver._sync is not None:
            result = receiver.poll()
    sender.close()
    return result, sender, found


def visible(folder: Path) -> list[str]:
    """Everything under `folder`, relative, hidden staging included."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_same_tree(src: Path, dst: Path) -> None:
    for path in [src, *src.rglob("*")]:
        twin = dst / path.relative_to(src)
        a, b = path.lstat(), twin.lstat()
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), path
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(twin)
        else:
            assert stat.S_IMODE(b.st_mode) == stat.S_IMODE(a.st_mode) & 0o777, path
        if path.is_file() and not path.is_symlink():
            assert path.read_bytes() == twin.read_bytes()
        assert b.st_mtime_ns == a.st_mtime_ns, path


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    return tmp_path / "incoming"


def make(path: Path, data: bytes = b"", mode: int = 0o644, mtime: int = 1_600_000_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (mtime, mtime))
    return path


# Names ----------------------------------------------------------------------------------
NAMES = ["تقرير المبيعات.txt", "שלום עולם.md", "a \uff5c b", "-rf", "--help", "é" * 127 + "x"]


def test_names_of_every_script_and_255_bytes_arrive_intact(tmp_path: Path, incoming: Path) -> None:
    top = tmp_path / "src" / "מסמכים"
    for i, name in enumerate(NAMES):
        make(top / name, f"content {i}\n".encode() * (i + 1))
    assert len(NAMES[-1].encode()) == 255
    make(top / "sub" / ("z" * 255), os.urandom(10_000))
    os.utime(top / "sub", (1_500_000_000, 1_500_000_000))
    os.utime(top, (1_400_000_000, 1_400_000_000))
    result, sender, found = send([top], incoming)
    assert result.code == FileCode.OK, result
    assert (found.entries, found.files) == (9, 7) and sender.entries == 9
    assert_same_tree(top, incoming / "alice" / "מסמכים")
    assert visible(incoming / "alice") == sorted(
        ["מסמכים", *[f"מסמכים/{n}" for n in NAMES], "מסמכים/sub", "מסמכים/sub/" + "z" * 255])


@pytest.mark.parametrize("name", ["line\nbreak.txt", "invoice\u202efdp.exe"])
def test_newline_and_bidi_names_are_refused_by_default_and_allowed_by_the_option(
        tmp_path: Path, incoming: Path, name: str) -> None:
    top = tmp_path / "src" / "top"
    make(top / "fine.txt", b"fine")
    make(top / name, b"tricky")
    result, _, _ = send([top], incoming)
    assert result.code == FileCode.NAME_REFUSED
    assert result.name == f"top/{name}".encode()
    assert b"control character" in result.detail or b"bidirectional" in result.detail
    assert visible(incoming / "alice") == []  # nothing partial, no staging left
    result, _, _ = send([top], incoming, policy=LENIENT)
    assert result.code == FileCode.OK
    assert (incoming / "alice" / "top" / name).read_bytes() == b"tricky"


# Trees ----------------------------------------------------------------------------------
def test_empty_and_read_only_directories_modes_and_mtimes(tmp_path: Path, incoming: Path) -> None:
    top = tmp_path / "src" / "top"
    (top / "empty").mkdir(parents=True)
    make(top / "ro" / "inside.txt", b"kept")
    make(top / "ro" / "deeper" / "x", b"x", mode=0o400)
    make(top / "suid", b"#!/bin/sh\n", mode=0o6755)
    (top / "sticky").mkdir(mode=0o1777)
    (top / "sticky").chmod(0o1777)
    for d in ("ro/deeper", "ro", "empty", "sticky"):
        os.utime(top / d, (1_300_000_000, 1_300_000_000))
    (top / "ro").chmod(0o555)
    try:
        result, _, _ = send([top], incoming)
        assert result.code == FileCode.OK, result
        out = incoming / "alice" / "top"
        assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o555
        assert (out / "ro" / "inside.txt").read_bytes() == b"kept"
        assert stat.S_IMODE((out / "suid").stat().st_mode) == 0o755  # setuid and setgid dropped
        assert stat.S_IMODE((out / "sticky").stat().st_mode) == 0o777  # sticky dropped
        assert list((out / "empty").iterdir()) == []
        for d in ("ro/deeper", "ro", "empty", "sticky"):
            assert (out / d).stat().st_mtime_ns == 1_300_000_000 * 10**9
    finally:
        (top / "ro").chmod(0o755)


def test_links_inside_are_kept_and_the_others_are_refused_with_the_reason(
        tmp_path: Path, incoming: Path) -> None:
    top = tmp_path / "src" / "top"
    make(top / "docs" / "a.txt", b"a")
    (top / "docs" / "to-a").symlink_to("a.txt")
    (top / "docs" / "up").symlink_to("../docs/a.txt")
    (top / "dangling").symlink_to("nowhere")
    result, _, _ = send([top], incoming)
    assert result.code == FileCode.OK
    out = incoming / "alice" / "top"
    assert os.readlink(out / "docs" / "up") == "../docs/a.txt"
    assert (out / "docs" / "to-a").read_bytes() == b"a"
    assert os.readlink(out / "dangling") == "nowhere"

    for target, why in (("/etc/passwd", "absolute"), ("../../outside", "climbs out")):
        bad = tmp_path / f"bad-{why[:3]}" / "top"
        make(bad / "f", b"f")
        (bad / "link").symlink_to(target)
        found = scan(sources_from_paths([os.fsencode(bad)]))
        assert len(found.problems) == 1 and why in found.problems[0] and "top/link" in found.problems[0]


def test_fifo_skipped_with_a_notice_and_hard_links_arrive_separate(tmp_path: Path, incoming: Path) -> None:
    top = tmp_path / "src" / "top"
    make(top / "one", b"shared bytes")
    os.link(top / "one", top / "two")
    os.mkfifo(top / "pipe")
    result, sender, found = send([top], incoming)
    assert result.code == FileCode.OK
    assert found.notices == ["skipped top/pipe: a FIFO"] and sender.skipped == 1
    out = incoming / "alice" / "top"
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    one, two = (out / "one").stat(), (out / "two").stat()
    assert one.st_ino != two.st_ino and one.st_nlink == two.st_nlink == 1
    assert (out / "two").read_bytes() == b"shared bytes"


def test_a_name_clash_stops_the_transfer_and_overwrites_nothing(tmp_path: Path, incoming: Path) -> None:
    make(tmp_path / "src" / "report.txt", b"new")
    make(tmp_path / "src" / "other.txt", b"other")
    make(incoming / "alice" / "report.txt", b"precious")
    result, _, _ = send([tmp_path / "src" / "other.txt", tmp_path / "src" / "report.txt"], incoming)
    assert result.code == FileCode.EXISTS and result.name == b"report.txt"
    assert (incoming / "alice" / "report.txt").read_bytes() == b"precious"
    assert visible(incoming / "alice") == ["report.txt"]  # other.txt did not appear either


def test_move_deletes_exactly_what_was_sent_after_success(tmp_path: Path, incoming: Path) -> None:
    top = tmp_path / "src" / "top"
    make(top / "a" / "b" / "c.txt", b"c")
    make(top / "d.txt", b"d")
    (top / "l").symlink_to("d.txt")
    os.mkfifo(top / "a" / "pipe")  # skipped: so a/ is not empty and stays
    result, sender, _ = send([top], incoming, move=True)
    assert result.code == FileCode.OK
    report = delete_sent(sender)
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "src").rglob("*")) == [
        "src/top", "src/top/a", "src/top/a/pipe"]
    assert report.deleted == 4 and report.kept_count == 2  # a and top hold the FIFO
    assert (incoming / "alice" / "top" / "a" / "b" / "c.txt").read_bytes() == b"c"


def test_move_keeps_a_file_that_changed_after_it_was_sent(tmp_path: Path, incoming: Path) -> None:
    f = make(tmp_path / "src" / "f.txt", b"before")
    result, sender, _ = send([f], incoming, move=True)
    assert result.code == FileCode.OK
    make(f, b"after!", mtime=1_700_000_000)
    report = delete_sent(sender)
    assert f.read_bytes() == b"after!" and report.kept == ["kept f.txt: it changed after it was sent"]


def test_a_failed_transfer_deletes_nothing(tmp_path: Path, incoming: Path) -> None:
    f = make(tmp_path / "src" / "f.txt", b"x")
    make(incoming / "alice" / "f.txt", b"clash")
    result, sender, _ = send([f], incoming, move=True)
    assert result.code == FileCode.EXISTS
    # The drivers call delete_sent only on OK; even if one did, an unfinished stream deletes nothing.
    assert delete_sent(sender).deleted == 0
    assert f.read_bytes() == b"x"


def test_a_move_cancelled_while_flushing_returns_at_once_and_keeps_the_placed_files(
        incoming: Path, held_flush: HeldFlush) -> None:
    data = b"moved"
    receiver = open_receiver(incoming, FileBegin(TID, 1, 1, len(data), FLAG_MOVE, "alice"), policy=STRICT)
    assert isinstance(receiver, TreeReceiver)
    for message in (file_entry(b"f.txt", len(data)), FileChunk(TID, 0, data), FileEnd(TID, digest(data)),
                    StreamEnd(TID, 1, len(data))):
        assert receiver.feed(message) is None
    assert held_flush.flushing.wait(5) and receiver.placed and not receiver.done
    started = time.monotonic()
    receiver.abort()  # the sender cancelled: nothing to remove, nothing to wait for
    assert time.monotonic() - started < 5
    assert (incoming / "alice" / "f.txt").read_bytes() == data
    held_flush.release.set()
    receiver._sync.join(5)  # type: ignore[union-attr]
    assert receiver.poll() is None and not receiver.done  # aborted: no late verdict


def test_a_name_planted_before_the_final_rename_is_left_as_it_was(
        tmp_path: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder is made writable to be moved into place (as a user, not root) and
    its mode put back: on the entry itself, never through a link planted under its name."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the receiver's non-root path
    receiver = open_receiver(incoming, FileBegin(TID, 1, 0, 0, 0, "alice"), policy=STRICT)
    assert isinstance(receiver, TreeReceiver)
    assert receiver.feed(FileEntry(TID, EntryType.DIRECTORY, 0o555, 0, 0, b"top")) is None
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (incoming / "alice" / "top").symlink_to(victim)  # someone else, during the transfer
    result = receiver.feed(StreamEnd(TID, 1, 0))
    assert result is not None and result.code == FileCode.EXISTS
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert visible(incoming / "alice") == ["top"]  # the link, and nothing of ours


def test_an_abort_lets_a_slow_removal_finish_in_the_background(
        incoming: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_remove_tree = receiver_module.remove_tree

    def slow_remove_tree(name: bytes, dir_fd: int) -> None:
        release.wait(10)  # a tree of many files
        real_remove_tree(name, dir_fd)
    monkeypatch.setattr(receiver_module, "remove_tree", slow_remove_tree)
    receiver = open_receiver(incoming, FileBegin(TID, 1, 1, 1, 0, "alice"), policy=STRICT)
    assert isinstance(receiver, TreeReceiver)
    assert receiver.feed(file_entry(b"f", 1)) is None
    receiver.abort()  # returns after CLEANUP_WAIT_S, the removal still held
    assert visible(incoming / "alice") != []
    release.set()
    deadline = time.monotonic() + 10
    while os.listdir(incoming / "alice"):  # (not rglob: the tree is going away under it)
        assert time.monotonic() < deadline, "the partial transfer was never removed"
        time.sleep(0.01)


def test_leftover_staging_is_swept(tmp_path: Path, incoming: Path) -> None:
    stale = incoming / "alice" / (STAGING_PREFIX.decode() + "00000000000000ff")
    make(stale / "ro" / "f", b"partial")
    (stale / "ro").chmod(0o500)
    assert sweep_partials(incoming) == 1
    assert visible(incoming / "alice") == []


def as_nobody(tmp_path: Path, work: Callable[[int], None]) -> None:
    """Run `work(dir_fd)` without root's override of permissions (forked and setuid when we
    are root), in a directory of its own; fails the test with what went wrong."""
    base = tmp_path / "nobody"
    base.mkdir()
    if os.geteuid() != 0:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            work(fd)
        finally:
            os.close(fd)
        return
    os.chown(base, 65534, 65534)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            work(fd)
        except BaseException as exc:
            os.write(write_end, repr(exc).encode()[:4000])
            code = 1
        os._exit(code)
    os.close(write_end)
    os.close(fd)
    with os.fdopen(read_end, "rb") as pipe:
        error = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, error


@pytest.mark.parametrize("mode", [0o300, 0o100, 0o500, 0o000], ids=oct)
def test_a_partial_tree_with_modes_that_lock_us_out_is_still_removed(tmp_path: Path, mode: int) -> None:
    def work(dir_fd: int) -> None:
        os.mkdir(b"partial", 0o700, dir_fd=dir_fd)
        inner = open_dir(b"partial", dir_fd)
        os.mkdir(b"locked", 0o700, dir_fd=inner)
        locked = open_dir(b"locked", inner)
        os.close(os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=locked))
        os.mkdir(b"sub", 0o700, dir_fd=locked)
        os.fchmod(locked, mode)  # as a stream may set it
        os.close(locked)
        os.close(inner)
        remove_tree(b"partial", dir_fd)
        assert not exists(b"partial", dir_fd)
    as_nobody(tmp_path, work)


# The disk fills up --------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "ivclip-test", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_refused_before_anything_is_written(tmp_path: Path, small_disk: Path) -> None:
    big = make(tmp_path / "src" / "big.bin", os.urandom(2 << 20))
    result, _, _ = send([big], small_disk)
    assert result.code == FileCode.NO_SPACE and b"free" in result.detail
    assert visible(small_disk / "alice") == []
    assert hashlib.sha256(big.read_bytes()).digest()  # the source is untouched


def test_disk_full_during_the_transfer_aborts_cleanly(tmp_path: Path, small_disk: Path) -> None:
    data = os.urandom(600 << 10)
    begin = FileBegin(TID, 1, 1, len(data), 0, "alice")
    receiver = open_receiver(small_disk, begin, policy=STRICT)
    assert isinstance(receiver, TreeReceiver)  # the space check passed
    filler = small_disk / "filler"  # then someone else takes the space
    with contextlib.suppress(OSError):
        filler.write_bytes(b"\0" * (700 << 10))
    assert receiver.feed(FileEntry(TID, EntryType.FILE, 0o644, 0, len(data), b"big.bin")) is None
    result = None
    for offset in range(0, len(data), 64 << 10):
        result = receiver.feed(FileChunk(TID, offset, data[offset : offset + (64 << 10)]))
        if result is not None:
            break
    assert result is not None and result.code == FileCode.NO_SPACE and result.name == b"big.bin"
    assert visible(small_disk / "alice") == []


# A lying sender --------------------------------------------------------------------------
def crafted(incoming: Path, messages: list[StreamMessage], *, entries: int = 10, files: int = 10,
            total: int = 1000) -> FileResult | None:
    receiver = open_receiver(incoming, FileBegin(TID, entries, files, total, 0, "eve"), policy=STRICT)
    assert isinstance(receiver, TreeReceiver)
    result = None
    for message in messages:
        result = receiver.feed(message)
        if result is not None:
            return result
    receiver.abort()  # the stream stopped without its end marker: the driver aborts
    return None


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def file_entry(path: bytes, size: int) -> FileEntry:
    return FileEntry(TID, EntryType.FILE, 0o644, 0, size, path)


@pytest.mark.parametrize(("stream", "code", "detail"), [
    ([file_entry(b"f", 3), FileChunk(TID, 0, b"abcd")], FileCode.BAD_STREAM, b"declared"),
    ([file_entry(b"f", 5), FileChunk(TID, 0, b"abc"), FileEnd(TID, digest(b"abc"))],
     FileCode.BAD_STREAM, b"ended after 3 of the 5"),
    ([file_entry(b"../escape", 1)], FileCode.NAME_REFUSED, b"'..' component"),
    ([FileEntry(TID, EntryType.DIRECTORY, 0o755, 0, 0, b"d"), file_entry(b"d/../../x", 1)],
     FileCode.NAME_REFUSED, b"'..' component"),
    ([file_entry(b"/etc/cron.d/x", 1)], FileCode.NAME_REFUSED, b"absolute"),
    ([file_entry(b"f", 2), FileChunk(TID, 0, b"ab"), FileEnd(TID, digest(b"xx"))],
     FileCode.CHECKSUM, b"SHA-256"),
    ([FileEntry(TID, EntryType.DIRECTORY, 0o755, 0, 0, b"d"),
      FileEntry(TID, EntryType.SYMLINK, 0o777, 0, 0, b"d/l", b"../../etc")], FileCode.LINK_REFUSED,
     b"climbs out"),
    ([FileEntry(TID, EntryType.DIRECTORY, 0o755, 0, 0, b"d"),
      FileEntry(TID, EntryType.SYMLINK, 0o777, 0, 0, b"d/l", b"."),
      file_entry(b"d/l/x", 1)], FileCode.LINK_REFUSED, b"'.' component"),
    ([file_entry(b"f", 0), FileEnd(TID, digest(b"")), file_entry(b"f", 0)], FileCode.EXISTS, b"exists"),
    ([file_entry(b"f", 0), FileEnd(TID, digest(b"")), StreamEnd(TID, 2, 0)], FileCode.BAD_STREAM,
     b"end marker"),
    ([file_entry(b"f", 2000)], FileCode.TOO_LARGE, b"announced"),
])
def test_a_lying_sender_is_refused_and_leaves_nothing(
        incoming: Path, stream: list[StreamMessage], code: FileCode, detail: bytes) -> None:
    result = crafted(incoming, stream)
    assert result is not None and result.code == code, result
    assert detail in result.detail
    assert visible(incoming / "eve") == []


def test_a_stream_without_its_end_marker_leaves_nothing(incoming: Path) -> None:
    data = b"complete file, but no end marker follows"
    stream: list[StreamMessage] = [file_entry(b"f", len(data)), FileChunk(TID, 0, data),
                                   FileEnd(TID, digest(data))]
    assert crafted(incoming, stream) is None
    assert visible(incoming / "eve") == []


def test_the_incoming_source_folder_may_not_be_a_link(tmp_path: Path, incoming: Path) -> None:
    incoming.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (incoming / "eve").symlink_to(tmp_path / "elsewhere")
    result = open_receiver(incoming, FileBegin(TID, 1, 1, 1, 0, "eve"), policy=STRICT)
    assert isinstance(result, FileResult) and result.code == FileCode.WRITE_ERROR
    assert b"not a directory (a link?)" in result.detail
    assert list((tmp_path / "elsewhere").iterdir()) == []


# A source that changes while it is sent --------------------------------------------------------
@pytest.mark.parametrize(("change", "why"), [("shrink", b"shrank"), ("grow", b"grew"), ("touch", b"written")])
def test_a_file_changed_while_being_sent_stops_the_stream(tmp_path: Path, change: str, why: bytes) -> None:
    f = make(tmp_path / "src" / "f.bin", os.urandom(10_000))
    sources = sources_from_paths([os.fsencode(f)])
    sender = TreeSender(sources, TID, chunk_size=4096, max_entries=1, max_files=1, max_bytes=20_000)
    first = sender.next_message()
    assert isinstance(first, FileEntry) and first.size == 10_000
    if change == "shrink":
        os.truncate(f, 3000)
    elif change == "grow":
        with f.open("ab") as fh:
            fh.write(b"more")
    else:
        os.utime(f, (1, 1))
    while sender.next_message() is not None:
        pass
    assert sender.failure is not None and sender.failure.code == FileCode.SOURCE_CHANGED
    assert why in sender.failure.detail and sender.failure.name == b"f.bin"
    assert not sender.finished


def test_sources_grown_past_the_announcement_stop_the_stream(tmp_path: Path) -> None:
    top = tmp_path / "src" / "top"
    make(top / "a", b"a")
    found = scan(sources_from_paths([os.fsencode(top)]))
    make(top / "b", b"b")  # appears after the scan: more than the host user approved
    sender = TreeSender(found.sources, TID, chunk_size=4096, max_entries=found.entries,
                        max_files=found.files, max_bytes=found.total_size)
    while sender.next_message() is not None:
        pass
    assert sender.failure is not None and sender.failure.code == FileCode.SOURCE_CHANGED
    assert b"grew since they were announced" in sender.failure.detail
