"""Tests for shm.memory: bounds, closed buffers, the copy strategies and the record helpers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm.memory import (
    COPY_STRATEGIES,
    SharedBuffer,
    copy,
    lengths_array,
    set_copy_strategy,
)


@pytest.fixture
def strategy_restored():
    previous = set_copy_strategy("glibc")
    yield
    set_copy_strategy(previous)


@pytest.mark.usefixtures("strategy_restored")
@settings(max_examples=150, deadline=None)
@given(
    strategy=st.sampled_from(COPY_STRATEGIES),
    length=st.one_of(
        st.integers(0, 300),
        st.integers(2000, 5000),
        st.sampled_from([4095, 4096, 16383, 16384, 65536, 131072 + 7, 262143, 262144]),
    ),
    src_off=st.integers(0, 63),
    dst_off=st.integers(0, 63),
)
def test_every_copy_strategy_copies_exactly_the_bytes_asked(strategy, length, src_off, dst_off):
    set_copy_strategy(strategy)
    source = bytes((i * 7 + 3) & 0xFF for i in range(length + 64))
    mem = SharedBuffer(bytearray(length + 192))
    mem.write(dst_off + 8, memoryview(source)[src_off : src_off + length])
    data = mem.read(0, length + 192)
    assert data[: dst_off + 8] == bytes(dst_off + 8)  # nothing before
    assert data[dst_off + 8 : dst_off + 8 + length] == source[src_off : src_off + length]
    assert data[dst_off + 8 + length :] == bytes(len(data) - dst_off - 8 - length)  # nor after


def test_set_copy_strategy_returns_the_previous_one_and_refuses_unknown_names(strategy_restored):
    assert set_copy_strategy("vector") == "glibc"
    assert set_copy_strategy("pieces") == "vector"
    with pytest.raises(ValueError, match="copy strategy"):
        set_copy_strategy("rep-movsb")
    assert set_copy_strategy("glibc") == "pieces"


def test_copy_fills_a_writable_view_and_refuses_short_or_read_only_targets():
    target = bytearray(10)
    assert copy(memoryview(target)[2:8], b"abcdef") == 6
    assert target == b"\0\0abcdef\0\0"
    with pytest.raises(ValueError, match="cannot copy"):
        copy(bytearray(3), b"abcd")
    with pytest.raises(BufferError):
        copy(b"read-only", b"x")
    assert copy(bytearray(0), b"") == 0


def test_accesses_outside_the_buffer_raise_index_error():
    mem = SharedBuffer(bytearray(64))
    for bad in (lambda: mem.read(60, 8), lambda: mem.load_u64(64), lambda: mem.store_u64(-8, 1),
                lambda: mem.write(57, b"12345678"), lambda: mem.zero(0, 65),
                lambda: mem.pointer(0, 65), lambda: mem.put_header(60, 0, 1),
                lambda: mem.put_record(40, 1, 20, (bytes(20),))):
        with pytest.raises(IndexError):
            bad()
    with pytest.raises(IndexError, match="destination"):
        mem.read_into(0, bytearray(4), 0, 8)


def test_a_closed_buffer_refuses_every_access_and_closes_twice():
    mem = SharedBuffer(bytearray(64))
    mem.close()
    mem.close()
    assert mem.closed
    for op in (lambda: mem.read(0, 8), lambda: mem.load_u64(0), lambda: mem.store_u64(0, 1),
               lambda: mem.pointer(0, 8), lambda: mem.put_header(0, 0, 1)):
        with pytest.raises(ValueError, match="closed"):
            op()


def test_records_are_laid_out_length_then_kind_then_payload():
    mem = SharedBuffer(bytearray(64))
    mem.put_record(8, 7, 5, (b"ab", b"cde"))
    assert mem.read(8, 13) == struct.pack("<II", 5, 7) + b"abcde"
    mem.put_header(32, 0xFFFFFFFF, 0xFFFFFFFE)
    assert mem.load_u64(32) == 0xFFFFFFFE_FFFFFFFF
    with pytest.raises(ValueError, match="changed size"):
        mem.put_record(8, 7, 6, (b"ab", b"cde"))


def test_lengths_array_is_a_private_checked_copy():
    lengths = [3, 0, 70000]
    array, count, largest, total = lengths_array(lengths)
    lengths[0] = 10**6  # the caller changing its list changes nothing
    assert (list(array), count, largest, total) == ([3, 0, 70000], 3, 70000, 70003)
    assert lengths_array(struct.pack("<3I", 1, 2, 3))[1:] == (3, 3, 6)
    assert lengths_array([])[1:] == (0, 0, 0)
    with pytest.raises(OverflowError):
        lengths_array([1, -1])
    with pytest.raises(OverflowError):
        lengths_array([1 << 32])


def test_offset_of_a_view_inside_the_buffer_and_not_outside() -> None:
    buf = bytearray(8192)
    mem = SharedBuffer(buf)
    try:
        assert mem.offset_of(mem.view[4096:4100]) == 4096
        assert mem.read(mem.offset_of(mem.view[10:12]), 2) == b"\0\0"
        with pytest.raises(IndexError):
            mem.offset_of(memoryview(bytearray(16)))
    finally:
        mem.close()
