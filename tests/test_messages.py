"""Tests for protocol.messages: the exact encoding of each message and refusal of bad records."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.messages import (
    CHUNK_HEADER_SIZE,
    MAX_TRANSFER_SIZE,
    Cancel,
    CopyRequest,
    DataBegin,
    DataChunk,
    DataEnd,
    Kind,
    Status,
    StatusCode,
    decode,
    encode,
)

U64 = (1 << 64) - 1
ids = st.integers(0, U64)
sizes = st.integers(0, MAX_TRANSFER_SIZE)

messages = st.one_of(
    st.builds(CopyRequest, ids, sizes),
    st.builds(DataBegin, ids, sizes),
    st.builds(DataChunk, ids, sizes, st.binary(max_size=300)),
    st.builds(DataEnd, ids),
    st.builds(Status, ids, st.sampled_from(StatusCode), ids),
    st.builds(Cancel, ids),
)


def wire(message) -> tuple[int, bytes]:
    kind, parts = encode(message)
    return kind, b"".join(bytes(p) for p in parts)


@settings(max_examples=400, deadline=None)
@given(messages)
def test_round_trip(message):
    kind, payload = wire(message)
    assert kind == message.KIND
    decoded = decode(kind, payload)
    assert type(decoded) is type(message)
    assert decoded == message
    if isinstance(message, DataChunk):
        assert bytes(decoded.data) == bytes(message.data)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_decode_of_encode_is_stable_on_reencode(message):
    kind, payload = wire(message)
    assert wire(decode(kind, payload)) == (kind, payload)


def test_exact_encodings():
    """The documented wire format, byte for byte."""
    assert wire(CopyRequest(1, 2)) == (1, struct.pack("<QQ", 1, 2))
    assert wire(DataBegin(3, 4)) == (2, struct.pack("<QQ", 3, 4))
    assert wire(DataChunk(5, 6, b"xyz")) == (3, struct.pack("<QQ", 5, 6) + b"xyz")
    assert wire(DataEnd(7)) == (4, struct.pack("<Q", 7))
    assert wire(Status(8, StatusCode.TOO_LARGE, 9)) == (5, struct.pack("<QIIQ", 8, 2, 0, 9))
    assert wire(Cancel(U64)) == (6, b"\xff" * 8)
    assert [int(k) for k in Kind] == list(range(1, 15))  # 7-14: file transfers (filestream)
    assert [int(c) for c in StatusCode] == [0, 1, 2, 3, 4]
    assert CHUNK_HEADER_SIZE == 16


def test_chunk_data_is_not_copied_on_encode():
    data = bytearray(b"payload")
    _, parts = encode(DataChunk(1, 0, data))
    assert parts[1] is data


def test_chunk_with_no_data():
    assert decode(Kind.DATA_CHUNK, struct.pack("<QQ", 1, 0)) == DataChunk(1, 0, b"")


@pytest.mark.parametrize("kind", [0, 15, 16, 255, 0xFFFFFFFF])
def test_unknown_kind(kind):
    with pytest.raises(RemoteProtocolError, match="unknown record kind"):
        decode(kind, bytes(16))


FIXED_SIZES = {
    Kind.COPY_REQUEST: 16,
    Kind.DATA_BEGIN: 16,
    Kind.DATA_END: 8,
    Kind.STATUS: 24,
    Kind.CANCEL: 8,
}


@pytest.mark.parametrize("kind", list(FIXED_SIZES), ids=lambda k: k.name)
def test_wrong_sizes(kind):
    size = FIXED_SIZES[kind]
    decode(kind, bytes(size))  # the right size decodes
    for wrong in (0, 1, size - 1, size + 1, size + 8, 2 * size):
        with pytest.raises(RemoteProtocolError):
            decode(kind, bytes(wrong))


@pytest.mark.parametrize("size", [0, 1, 8, 15])
def test_chunk_without_header(size):
    with pytest.raises(RemoteProtocolError, match="no header"):
        decode(Kind.DATA_CHUNK, bytes(size))


@pytest.mark.parametrize("code", [5, 6, 0x7FFFFFFF, 0xFFFFFFFF])
def test_bad_status_code(code):
    with pytest.raises(RemoteProtocolError):
        decode(Kind.STATUS, struct.pack("<QIIQ", 1, code, 0, 0))


@pytest.mark.parametrize("reserved", [1, 0x80000000, 0xFFFFFFFF])
def test_status_reserved_bits(reserved):
    with pytest.raises(RemoteProtocolError, match="reserved"):
        decode(Kind.STATUS, struct.pack("<QIIQ", 1, 0, reserved, 0))


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (Kind.COPY_REQUEST, struct.pack("<QQ", 1, MAX_TRANSFER_SIZE + 1)),
        (Kind.COPY_REQUEST, struct.pack("<QQ", 1, U64)),
        (Kind.DATA_BEGIN, struct.pack("<QQ", 1, MAX_TRANSFER_SIZE + 1)),
        (Kind.DATA_BEGIN, struct.pack("<QQ", 1, U64)),
        (Kind.DATA_CHUNK, struct.pack("<QQ", 1, MAX_TRANSFER_SIZE + 1) + b"x"),
        (Kind.DATA_CHUNK, struct.pack("<QQ", 1, U64)),
    ],
)
def test_out_of_range_values(kind, payload):
    with pytest.raises(RemoteProtocolError, match="out of range"):
        decode(kind, payload)


def test_limits_are_inclusive():
    assert decode(Kind.COPY_REQUEST, struct.pack("<QQ", U64, MAX_TRANSFER_SIZE)).limit == (
        MAX_TRANSFER_SIZE
    )
    assert decode(Kind.DATA_BEGIN, struct.pack("<QQ", 0, MAX_TRANSFER_SIZE)).total_size == (
        MAX_TRANSFER_SIZE
    )
    assert decode(Kind.STATUS, struct.pack("<QIIQ", U64, 4, 0, U64)) == Status(
        U64, StatusCode.REFUSED, U64
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: CopyRequest(-1, 0),
        lambda: CopyRequest(1 << 64, 0),
        lambda: CopyRequest(1, -1),
        lambda: CopyRequest(1, MAX_TRANSFER_SIZE + 1),
        lambda: DataBegin(1, -1),
        lambda: DataBegin(1, MAX_TRANSFER_SIZE + 1),
        lambda: DataChunk(1 << 64, 0, b""),
        lambda: DataChunk(1, -1, b""),
        lambda: DataEnd(-1),
        lambda: Status(1, 9),
        lambda: Status(1, StatusCode.OK, -1),
        lambda: Status(1, StatusCode.OK, 1 << 64),
        lambda: Cancel(1 << 64),
    ],
)
def test_messages_validate_themselves(build):
    with pytest.raises(ValueError):
        build()


def test_messages_are_frozen():
    message = DataEnd(1)
    with pytest.raises(AttributeError):
        message.transfer_id = 2  # type: ignore[misc]


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode("not a message")  # type: ignore[arg-type]


def test_decode_errors_are_not_value_errors():
    """Callers catch RemoteProtocolError alone: nothing else may escape decode."""
    bad = [
        (Kind.STATUS, struct.pack("<QIIQ", 1, 77, 0, 0)),
        (Kind.DATA_BEGIN, struct.pack("<QQ", 1, U64)),
        (Kind.CANCEL, b""),
        (99, b""),
    ]
    for kind, payload in bad:
        with pytest.raises(RemoteProtocolError) as info:
            decode(kind, payload)
        assert not isinstance(info.value, ValueError)
