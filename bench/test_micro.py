"""Micro-benchmarks of the ring (one process): ``pytest bench/ --benchmark-only``.

Outside the normal test run (pyproject's testpaths is ["tests"]).  Each
benchmark round pushes and pops through one ring in one process, so what it
measures is the per-call cost of each path and the copy, not a transfer
between cores (``python -m bench`` does that).
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Iterator
from typing import Any

import pytest

from shm import layout
from shm.layout import RingGeometry
from shm.memory import COPY_STRATEGIES, SharedBuffer, copy, set_copy_strategy
from shm.ring import RingConsumer, RingProducer

pytest.importorskip("pytest_benchmark")

SIZES = (64, 4096, 65536, 262144)
GEOMETRY = layout.expected_geometry(layout.DEFAULT_REGION_SIZE)
RING = GEOMETRY.guest_to_host


RingPair = tuple[RingProducer, RingConsumer]


@pytest.fixture
def ring() -> Iterator[RingPair]:
    region = mmap.mmap(-1, GEOMETRY.region_size)
    mem = SharedBuffer(region)
    yield (RingProducer(mem, RING, GEOMETRY.max_record), RingConsumer(mem, RING, GEOMETRY.max_record))
    mem.close()
    region.close()


@pytest.mark.parametrize("size", SIZES)
def test_copy_push_poll_into(benchmark: Any, ring: RingPair, size: int) -> None:
    producer, consumer = ring
    data, dst = bytes(size), bytearray(size)

    def once() -> None:
        producer.try_push(1, (data,))
        consumer.poll_into(dst)

    benchmark(once)


@pytest.mark.parametrize("size", SIZES)
def test_copy_push_poll_bytes(benchmark: Any, ring: RingPair, size: int) -> None:
    producer, consumer = ring
    data = bytes(size)

    def once() -> None:
        producer.try_push(1, (data,))
        consumer.poll()

    benchmark(once)


@pytest.mark.parametrize("size", SIZES)
def test_zero_copy_loan_commit_peek_consume(benchmark: Any, ring: RingPair, size: int) -> None:
    producer, consumer = ring
    data = bytes(size)

    def once() -> None:
        view = producer.loan(size)
        assert view is not None
        copy(view, data)
        producer.commit(1)
        got = consumer.peek()
        assert got is not None
        consumer.consume()

    benchmark(once)


@pytest.mark.parametrize("size", (64, 4096))
def test_batch_of_256_records(benchmark: Any, ring: RingPair, size: int) -> None:
    """push_chunks + drain_into of 256 records per round (per-record cost = time / 256)."""
    producer, consumer = ring
    data = bytes(256 * size)
    dst, meta = bytearray(256 * size), array("I", bytes(8 * 256))

    def once() -> None:
        assert producer.push_chunks(1, data, size) == (256, len(data))
        assert consumer.drain_into(dst, meta) == (256, len(data))

    benchmark(once)


def test_record_parsing_poll_of_an_empty_ring(benchmark: Any, ring: RingPair) -> None:
    """The cost of one idle poll: read the tail, find nothing."""
    _, consumer = ring
    benchmark(consumer.poll_into, bytearray(64))


def test_record_parsing_header_validation(benchmark: Any, ring: RingPair) -> None:
    """Validate one 64-byte record's header and step over it without copying (peek + consume)."""
    producer, consumer = ring
    data = bytes(64)

    def once() -> None:
        producer.try_push(1, (data,))
        consumer.peek()
        consumer.consume()

    benchmark(once)


@pytest.mark.parametrize("strategy", COPY_STRATEGIES)
@pytest.mark.parametrize("size", (4096, 65536, 262144))
def test_copy_strategy_into_a_ring(benchmark: Any, strategy: str, size: int) -> None:
    """The ring's copy-in path under each copy strategy (warm 1 MiB ring, 16 records a call)."""
    capacity = 1 << 20
    mem = SharedBuffer(bytearray(4096 + capacity))
    producer = RingProducer(mem, RingGeometry(4096, capacity, 0, 128), capacity // 4)
    data = bytes(16 * size) if 16 * size < capacity // 2 else bytes(2 * size)
    previous = set_copy_strategy(strategy)
    try:

        def once() -> None:
            mem.store_u64(128, producer.tail)  # the consumer keeps up: always room
            producer.push_chunks(1, data, size, publish=False)

        benchmark(once)
    finally:
        set_copy_strategy(previous)
        mem.close()
