"""The typed clipboard container and the paste-side text policy (protocol.clipformat)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import clipformat
from protocol.clipformat import PNG_SIGNATURE, TEXT_MIME, ClipItem, TextPolicy
from protocol.errors import ClipFormatError

mimes = st.sampled_from([TEXT_MIME, "image/png", "text/html", "application/octet-stream",
                         "text/uri-list", "image/jpeg"])
item_lists = st.lists(st.tuples(mimes, st.binary(max_size=200)), min_size=1, max_size=6,
                      unique_by=lambda pair: pair[0])


@given(item_lists)
def test_encode_then_parse_returns_the_same_items_in_order(pairs: list[tuple[str, bytes]]) -> None:
    data = clipformat.encode([ClipItem(m, d) for m, d in pairs])
    assert [(i.mime, bytes(i.data)) for i in clipformat.parse(data)] == pairs
    assert clipformat.check_bounds(data) == [(m, len(d)) for m, d in pairs]


@given(item_lists, st.data())
def test_any_truncation_or_extension_is_refused(pairs: list[tuple[str, bytes]], data: st.DataObject) -> None:
    encoded = bytes(clipformat.encode([ClipItem(m, d) for m, d in pairs]))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ClipFormatError):
        clipformat.parse(encoded[:cut])
    with pytest.raises(ClipFormatError):
        clipformat.parse(encoded + b"\0")


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_a_format_error(garbage: bytes) -> None:
    with contextlib.suppress(ClipFormatError):
        clipformat.parse(clipformat.MAGIC + b"\x01" + garbage)


def _header(count: int, version: int = 1, reserved: int = 0) -> bytes:
    return struct.pack("<4sBBH", b"IVCT", version, count, reserved)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "too short"),
    (b"hello, world", "bad magic"),
    (_header(1, version=2), "version 2"),
    (_header(1, reserved=1), "reserved"),
    (_header(0), "item count 0"),
    (_header(17), "item count 17"),
    (_header(1) + b"\x00", "length 0"),
    (_header(1) + b"\x05TEXT/" + struct.pack("<Q", 0), "not an acceptable MIME type"),
    (_header(1) + b"\x09a/b;x=<i>" + struct.pack("<Q", 0), "not an acceptable MIME type"),
    (_header(1) + b"\x03a/b" + struct.pack("<Q", 1 << 62), "declare"),
    (_header(2) + (b"\x03a/b" + struct.pack("<Q", 0)) * 2, "appears twice"),
    (_header(1) + b"\x03a/\xff" + struct.pack("<Q", 0), "not ASCII"),
])
def test_malformed_containers_are_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(ClipFormatError, match=why):
        clipformat.check_bounds(data)


def test_encode_refuses_bad_item_lists() -> None:
    with pytest.raises(ClipFormatError, match="1 to 16"):
        clipformat.encode([])
    with pytest.raises(ClipFormatError, match="twice"):
        clipformat.encode([ClipItem(TEXT_MIME, b"a"), ClipItem(TEXT_MIME, b"b")])
    with pytest.raises(ClipFormatError, match="MIME"):
        ClipItem("not a type", b"")


GOOD_TEXT = [
    "plain ascii",
    "tab\tand newline\n",
    "CRLF line\r\nanother\r\n",
    "em dash — block █ emoji 🦊 ünïcødé",
]
BAD_TEXT = [
    (b"escape \x1b[31m red", "U+001B"),
    (b"lone CR\roverwrites", "U+000D"),
    (b"nul \x00", "U+0000"),
    (b"del \x7f", "U+007F"),
    ("C1 \u009b csi".encode(), "U+009B"),
    (b"\xff\xfe not utf-8", "not valid UTF-8"),
    (b"truncated \xe2\x80", "not valid UTF-8"),
]


@pytest.mark.parametrize("text", GOOD_TEXT)
def test_strict_and_permissive_accept_ordinary_text(text: str) -> None:
    for policy in TextPolicy:
        assert clipformat.check_item(ClipItem(TEXT_MIME, text.encode()), policy) is None


@pytest.mark.parametrize(("data", "why"), BAD_TEXT)
def test_strict_refuses_control_characters_and_bad_utf8_permissive_accepts(data: bytes, why: str) -> None:
    reason = clipformat.check_item(ClipItem(TEXT_MIME, data), TextPolicy.STRICT)
    assert reason is not None and why in reason
    assert clipformat.check_item(ClipItem("text/html", data), TextPolicy.STRICT) is not None
    assert clipformat.check_item(ClipItem(TEXT_MIME, data), TextPolicy.PERMISSIVE) is None


def test_strict_checks_the_png_signature_and_leaves_other_binary_alone() -> None:
    assert clipformat.check_item(ClipItem("image/png", PNG_SIGNATURE + b"..."), TextPolicy.STRICT) is None
    assert "signature" in str(clipformat.check_item(ClipItem("image/png", b"GIF89a"), TextPolicy.STRICT))
    assert clipformat.check_item(ClipItem("application/octet-stream", b"\x1b\x00"), TextPolicy.STRICT) is None
