"""The file-stream records, the name and link rules and the stream checker (pure code)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import FileRefused, RemoteProtocolError
from protocol.filestream import (
    LENIENT,
    STRICT,
    StreamChecker,
    check_link,
    display,
    offer_names,
    split_path,
)
from protocol.messages import (
    FLAG_MOVE,
    MAX_OFFER_NAMES,
    EntryType,
    FileBegin,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileOffer,
    FileResult,
    FileStart,
    Kind,
    StreamEnd,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parent.parent
DIGEST = hashlib.sha256(b"").digest()


def roundtrip(message: object) -> object:
    kind, parts = encode(message)  # type: ignore[arg-type]
    return decode(kind, b"".join(bytes(p) for p in parts))


@pytest.mark.parametrize("message", [
    FileOffer(7, 3, 2, 100, FLAG_MOVE, 2, (b"a", "صورة \uff5c b".encode())),
    FileOffer(7, 5, 5, 0, 0, 5, ()),
    FileStart(1, 2),
    FileBegin(1, 10, 4, 1 << 30, 0, "alice"),
    FileEntry(1, EntryType.FILE, 0o644, -5, 12, b"a/b"),
    FileEntry(1, EntryType.SYMLINK, 0o777, 1 << 62, 0, b"a/l", b"../b"),
    FileEntry(1, EntryType.DIRECTORY, 0o555, 0, 0, b"a"),
    FileEnd(3, DIGEST),
    StreamEnd(3, 4, 5),
    FileResult(3, FileCode.EXISTS, 17, 2, b"a/b", b"it exists"),
])
def test_file_records_round_trip(message: object) -> None:
    assert roundtrip(message) == message


def test_chunk_round_trip_keeps_the_bytes() -> None:
    decoded = roundtrip(FileChunk(9, 4, b"data"))
    assert isinstance(decoded, FileChunk) and (decoded.offset, bytes(decoded.data)) == (4, b"data")


@pytest.mark.parametrize(("kind", "payload", "why"), [
    (Kind.FILE_ENTRY, b"\0" * 39, "shorter"),
    (Kind.FILE_ENTRY, encode(FileEntry(1, EntryType.FILE, 0, 0, 0, b"ab"))[1][0] + b"abc", "does not hold"),
    (Kind.FILE_END, b"\0" * 8, "expected"),
    (Kind.FILE_RESULT, b"\0" * 8 + b"\xff" * 4 + b"\0" * 20, "FILE_RESULT"),
    (Kind.FILE_BEGIN, b"\1" + b"\0" * 39 + b"../x", "safe identifier"),
])
def test_malformed_file_records_are_remote_errors(kind: int, payload: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        decode(kind, payload)


def test_entry_fields_are_validated_when_built() -> None:
    with pytest.raises(ValueError, match="size"):
        FileEntry(1, EntryType.DIRECTORY, 0o755, 0, 5, b"d")
    with pytest.raises(ValueError, match="target"):
        FileEntry(1, EntryType.FILE, 0o644, 0, 0, b"f", b"x")
    with pytest.raises(ValueError, match="link target"):
        FileEntry(1, EntryType.SYMLINK, 0o777, 0, 0, b"l")
    with pytest.raises(ValueError, match="single path component"):
        FileOffer(1, 1, 1, 0, 0, 1, (b"a/b",))


# Names -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "تقرير.pdf", "שלום עולם.txt", "a \uff5c b", "-rf", "--help", "x" * 255, "é" * 127,
    "dir/sub/ファイル", "emoji 👍🏽", "a\u200db",  # ZWJ is part of some scripts
    "dir/.ivclip-partial-x", ".ivclip-partial",  # the staging prefix is reserved at the top only
])
def test_names_of_every_script_pass(name: str) -> None:
    raw = name.encode()
    assert b"/".join(split_path(raw)) == raw


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "empty path"),
    (b"/etc/passwd", "absolute"),
    (b"a/../../etc", "'..' component"),
    (b"..", "'..' component"),
    (b"./a", "'.' component"),
    (b"a//b", "empty component"),
    (b"a/", "empty component"),
    (b"a\0b", "NUL"),
    (b"x" * 256, "over 255"),
    (b"a/" * 64 + b"a", "levels"),
    (b"a/" * 2100, "over 4095"),
    (b".ivclip-partial-00000000000000ff", "reserved for transfers in progress"),
    (b".ivclip-partial-x/f", "reserved for transfers in progress"),
])
def test_path_escapes_are_refused_even_leniently(raw: bytes, why: str) -> None:
    for policy in (STRICT, LENIENT):
        with pytest.raises(FileRefused, match=why) as info:
            split_path(raw, policy)
        assert info.value.code == FileCode.NAME_REFUSED and info.value.name == raw


@pytest.mark.parametrize(("raw", "why"), [
    (b"line\nbreak", "control character"),
    (b"tab\there", "control character"),
    (b"esc\x1b[31m", "control character"),
    (b"del\x7f", "control character"),
    ("c1\u0085".encode(), "control character"),
    ("gnp.\u202eexe".encode(), "bidirectional"),
    ("iso\u2067late".encode(), "bidirectional"),
    ("lrm\u200e".encode(), "bidirectional"),
    ("sep\u2028".encode(), "line separator"),
    (b"latin1 \xe9t\xe9", "UTF-8"),
])
def test_unsafe_names_are_refused_by_default_and_allowed_by_the_option(raw: bytes, why: str) -> None:
    with pytest.raises(FileRefused, match=why):
        split_path(raw, STRICT)
    assert split_path(raw, LENIENT) == (raw,)


# Links -------------------------------------------------------------------------------
@pytest.mark.parametrize(("link", "target"), [
    (b"top/l", b"file"),
    (b"top/a/l", b".."),
    (b"top/a/l", b"../b"),
    (b"top/a/b/l", b"../../x/y"),
    (b"top/l", b"sub/dir/f"),
])
def test_links_inside_the_tree_pass(link: bytes, target: bytes) -> None:
    check_link(split_path(link), target)


@pytest.mark.parametrize(("link", "target", "why"), [
    (b"top/l", b"/etc/passwd", "absolute"),
    (b"top/l", b"..", "climbs out"),
    (b"top/l", b"../..", "climbs out"),
    (b"top/a/l", b"../../other", "climbs out"),
    (b"top/l", b"../top2/x", "climbs out"),
    (b"top/a/l", b"d/../..", "after a name"),
    (b"top/l", b"./x", "'.' component"),
    (b"top/l", b"x//y", "empty component"),
    (b"top/l", b"x/", "empty component"),
    (b"l", b"anything", "top level"),
    (b"top/l", "evil\u202e".encode(), "bidirectional"),
])
def test_links_out_of_the_tree_are_refused_with_the_reason(link: bytes, target: bytes, why: str) -> None:
    with pytest.raises(FileRefused, match=why) as info:
        check_link(split_path(link), target)
    assert info.value.code == FileCode.LINK_REFUSED and info.value.name == link


@given(st.lists(st.sampled_from([b"..", b"a", b"b"]), min_size=1, max_size=6),
       st.integers(min_value=2, max_value=5))
def test_an_accepted_link_never_resolves_above_its_top_entry(target: list[bytes], depth: int) -> None:
    parts = tuple([b"top"] + [b"d"] * (depth - 2) + [b"link"])
    try:
        check_link(parts, b"/".join(target))
    except FileRefused:
        return
    where = list(parts[:-1])
    for part in target:  # lexical resolution is exact here: ".." only leads
        if part == b"..":
            where.pop()
        else:
            where.append(part)
        assert where and where[0] == b"top"


# Display -------------------------------------------------------------------------------
def test_display_keeps_scripts_and_escapes_what_a_terminal_would_act_on() -> None:
    assert display("تقرير \uff5c שלום".encode()) == "تقرير \uff5c שלום"
    assert display("a\nb\x1b[2J\u202eexe".encode()) == "a\\nb\\x1b[2J\\u202eexe"
    assert display(b"\xff\xfe ok") == "\\xff\\xfe ok"
    assert display("nb\u00a0sp zw\u200b".encode()) == "nb\\xa0sp zw\\u200b"
    assert display(b"back\\slash") == "back\\\\slash"


def test_offer_names_are_cut_to_the_bound() -> None:
    names = [b"n" * 200] * 100
    kept = offer_names(names)
    assert 0 < len(kept) < 100
    assert sum(len(n) + 1 for n in kept) - 1 <= MAX_OFFER_NAMES


# The checker ------------------------------------------------------------------------------
def entry(path: bytes, etype: EntryType = EntryType.FILE, size: int = 0, target: bytes = b"") -> FileEntry:
    return FileEntry(1, etype, 0o644, 0, size, path, target)


def good_stream() -> list[object]:
    return [
        entry(b"top", EntryType.DIRECTORY),
        entry(b"top/a", size=5), FileChunk(1, 0, b"abc"), FileChunk(1, 3, b"de"), FileEnd(1, DIGEST),
        entry(b"top/sub", EntryType.DIRECTORY),
        entry(b"top/sub/empty"), FileEnd(1, DIGEST),
        entry(b"top/link", EntryType.SYMLINK, target=b"sub/empty"),
        entry(b"second"), FileEnd(1, DIGEST),
        StreamEnd(1, 6, 5),
    ]


def checker(**limits: int) -> StreamChecker:
    return StreamChecker(max_entries=limits.get("entries", 100), max_files=limits.get("files", 100),
                         max_bytes=limits.get("bytes", 100))


def test_a_well_formed_stream_passes_and_reports_closed_directories() -> None:
    check = checker()
    steps = [check.check(m) for m in good_stream()]  # type: ignore[arg-type]
    closed = [s.closed for s in steps if s is not None]
    assert closed == [0, 0, 0, 0, 1, 1]  # "top/link" closes sub, "second" closes top
    assert (check.entries, check.files, check.bytes) == (6, 3, 5)


@pytest.mark.parametrize(("index", "replacement", "why"), [
    (2, FileChunk(1, 0, b"abcdef"), "declared"),  # more data than declared
    (3, FileEnd(1, DIGEST), "ended after 3 of the 5"),  # less data than declared
    (3, FileChunk(1, 2, b"de"), "offset 2"),  # overlapping chunk
    (6, entry(b"top/nosuchdir/empty"), "outside the directory"),
    (9, entry(b"top/sub/late"), "outside the directory"),  # sub was left: never reopened
    (11, StreamEnd(1, 7, 5), "end marker counts"),
    (1, entry(b"top/../escape"), "'..' component"),
])
def test_a_lying_stream_is_refused(index: int, replacement: object, why: str) -> None:
    stream = good_stream()
    stream[index] = replacement
    check = checker()
    with pytest.raises(FileRefused, match=why):
        for message in stream:
            check.check(message)  # type: ignore[arg-type]


def test_counts_over_what_was_announced_are_refused() -> None:
    for limits in ({"entries": 5}, {"files": 2}, {"bytes": 4}):
        check = checker(**limits)
        with pytest.raises(FileRefused) as info:
            for message in good_stream():
                check.check(message)  # type: ignore[arg-type]
        assert info.value.code == FileCode.TOO_LARGE


def test_nothing_after_the_end_marker() -> None:
    check = checker()
    for message in good_stream():
        check.check(message)  # type: ignore[arg-type]
    with pytest.raises(FileRefused, match="ended"):
        check.check(entry(b"more"))


def test_the_protocol_package_stays_pure() -> None:
    forbidden = {"os", "socket", "mmap", "threading", "cffi", "selectors", "subprocess", "shm",
                 "io", "pathlib", "time"}
    for path in (ROOT / "protocol").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "shm.errors":  # the root of the error tree, pure
                    continue
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
