"""Tests for control.framing: one JSON header line, an optional body, and strict limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.errors import ControlError, FrameError
from control.framing import MAX_HEADER, Frame, FrameDecoder, encode_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k != "body_size"), json_values, max_size=6
)


def decode_all(data: bytes, max_body: int = 1 << 20, step: int | None = None) -> list[Frame]:
    decoder = FrameDecoder(max_body)
    frames = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.pending == 0
    return frames


def test_encoding_is_one_compact_line_then_the_body():
    assert encode_frame({"op": "copy"}, b"hello") == b'{"op":"copy","body_size":5}\nhello'
    assert encode_frame({"op": "status"}) == b'{"op":"status"}\n'
    # A stale body_size in the header never disagrees with the body.
    assert encode_frame({"op": "x", "body_size": 99}) == b'{"op":"x"}\n'
    assert encode_frame({"op": "x", "body_size": 99}, b"ab") == b'{"op":"x","body_size":2}\nab'
    assert encode_frame({"text": "é\n"}) == b'{"text":"\\u00e9\\n"}\n'  # ASCII, one line


@settings(max_examples=150, deadline=None)
@given(header=headers, body=st.binary(max_size=200), step=st.integers(1, 50))
def test_round_trip_in_any_pieces(header, body, step):
    data = encode_frame(header, body)
    expected = dict(header, body_size=len(body)) if body else header
    assert decode_all(data) == [Frame(expected, body)]
    assert decode_all(data, step=step) == [Frame(expected, body)]


def test_byte_by_byte_and_back_to_back():
    data = encode_frame({"op": "a"}, b"xyz") + encode_frame({"op": "b"}) + encode_frame({}, b"\n")
    frames = decode_all(data, step=1)
    assert [(f.header.get("op"), f.body) for f in frames] == [("a", b"xyz"), ("b", b""), (None, b"\n")]


def test_incomplete_frames_wait_for_more():
    decoder = FrameDecoder(100)
    decoder.feed(b'{"op":"copy","body_size":3}')
    assert decoder.next_frame() is None
    decoder.feed(b"\nab")
    assert decoder.next_frame() is None
    decoder.feed(b"c")
    assert decoder.next_frame() == Frame({"op": "copy", "body_size": 3}, b"abc")
    assert decoder.next_frame() is None


def test_body_limit():
    decoder = FrameDecoder(4)
    decoder.feed(encode_frame({"op": "x"}, b"1234"))
    assert decoder.next_frame() == Frame({"op": "x", "body_size": 4}, b"1234")
    decoder = FrameDecoder(4)
    decoder.feed(b'{"op":"x","body_size":5}\n')  # refused from the header, before the body
    with pytest.raises(FrameError, match="exceeds"):
        decoder.next_frame()
    decoder = FrameDecoder(0)
    decoder.feed(b'{"op":"x","body_size":1}\n')
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_header_limit():
    decoder = FrameDecoder(10)
    decoder.feed(b" " * MAX_HEADER)
    assert decoder.next_frame() is None  # could still end in a newline
    decoder.feed(b" ")
    with pytest.raises(FrameError, match="longer than"):
        decoder.next_frame()
    decoder = FrameDecoder(10)
    decoder.feed(b"{" + b" " * (2 * MAX_HEADER))
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_largest_header_the_encoder_makes_is_accepted():
    filler = "x" * (MAX_HEADER - len('{"k":""}\n'))
    data = encode_frame({"k": filler})
    assert len(data) == MAX_HEADER
    assert decode_all(data, max_body=0) == [Frame({"k": filler})]
    with pytest.raises(FrameError):
        encode_frame({"k": filler + "x"})


@pytest.mark.parametrize(
    "line",
    [b'{"op":"a","op":"b"}', b'{"a":{"x":1,"x":2}}', b'{"body_size":1,"body_size":0}'],
)
def test_duplicate_keys(line):
    decoder = FrameDecoder(10)
    decoder.feed(line + b"\n")
    with pytest.raises(FrameError, match="duplicate"):
        decoder.next_frame()


@pytest.mark.parametrize("line", [b"[]", b"[1]", b"1", b'"op"', b"null", b"true"])
def test_non_object_json(line):
    decoder = FrameDecoder(10)
    decoder.feed(line + b"\n")
    with pytest.raises(FrameError, match="object"):
        decoder.next_frame()


@pytest.mark.parametrize("line", [b"", b"{", b"{op: 1}", b"\xff\xfe", b'{"a":1} x', b"{'a':1}"])
def test_invalid_json(line):
    decoder = FrameDecoder(10)
    decoder.feed(line + b"\n")
    with pytest.raises(FrameError):
        decoder.next_frame()


@pytest.mark.parametrize(
    "size", [b"-1", b"1.0", b"1e3", b'"3"', b"true", b"false", b"null", b"[3]", b"{}"]
)
def test_bad_body_size(size):
    decoder = FrameDecoder(10)
    decoder.feed(b'{"body_size":' + size + b"}\n")
    with pytest.raises(FrameError, match="body_size"):
        decoder.next_frame()


def test_frame_errors_are_control_errors():
    assert issubclass(FrameError, ControlError)


@pytest.mark.parametrize(
    "line",
    [b'{"n":' + b"1" * 5000 + b"}", b'{"a":' + b"[" * 20000 + b"]" * 20000 + b"}"],
    ids=["huge-int", "deep-nesting"],
)
def test_pathological_json_is_a_frame_error(line):
    assert len(line) < MAX_HEADER
    decoder = FrameDecoder(10)
    decoder.feed(line + b"\n")
    with pytest.raises(FrameError):
        decoder.next_frame()
