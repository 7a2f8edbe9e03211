"""The broker's consumer against every kind of producer index, with its own index about to wrap.

A broker's free-running head starts at 0 with each session, so a live guest
cannot take it to the wrap (indices run modulo shm.ring.ring_wrap, the largest
multiple of the capacity below 2**64); here the consumer starts just below it,
as a long-lived one would be, and a hostile producer writes indices relative
to it: what is valid modulo the wrap is accepted (records across the wrap come
out exact), everything else, an index at or past the wrap included, is
RingCorruptError, never an exception of another kind, never a read outside the
ring.
"""

from __future__ import annotations

import pytest

from shm.errors import RingCorruptError
from shm.layout import RingGeometry
from shm.memory import GuardedBuffer
from shm.ring import RingConsumer, RingProducer, ring_wrap

CAP = 1 << 16
GEOMETRY = RingGeometry(data_offset=4096, capacity=CAP, producer_index_offset=0, consumer_index_offset=128)
WRAP = ring_wrap(CAP)
START = WRAP - 48  # the broker's head: three 16-byte records before the wrap


def ring() -> tuple[GuardedBuffer, RingProducer, RingConsumer]:
    mem = GuardedBuffer(bytearray(4096 + CAP))
    producer = RingProducer(mem, GEOMETRY, CAP // 4, start_index=START)
    consumer = RingConsumer(mem, GEOMETRY, CAP // 4, start_index=START)
    mem.store_u64(GEOMETRY.consumer_index_offset, START)
    return mem, producer, consumer


def test_records_across_the_wrap_come_out_exact() -> None:
    _, producer, consumer = ring()
    sent = [bytes([n]) * 8 for n in range(1, 9)]  # 16-byte records: the 4th crosses 2**64
    for payload in sent:
        assert producer.try_push(3, [payload])
    assert producer.tail == (START + 16 * len(sent)) % WRAP < START  # the tail wrapped
    got = []
    while (record := consumer.poll()) is not None:
        got.append(record.payload)
    assert got == sent and consumer.head == producer.tail


# producer index written by the guest, relative to the consumer's head (modulo the wrap)
CASES = {
    "equal (empty)": (0, "ok"),
    "one record, across the wrap": (64, "ok"),
    "exactly the capacity": (CAP, "ok"),
    "behind by 8": (-8, "corrupt"),
    "behind by the capacity": (-CAP, "corrupt"),
    "one past the capacity": (CAP + 8, "corrupt"),
    "far ahead": (1 << 40, "corrupt"),
    "half the index space": (1 << 63, "corrupt"),
    "negative as signed (-1)": (-1, "corrupt"),
    "misaligned": (3, "corrupt"),
    "misaligned across the wrap": (61, "corrupt"),
}


@pytest.mark.parametrize("index", [WRAP, WRAP + 16, (1 << 64) - 8])
def test_an_index_at_or_past_the_wrap_is_corrupt(index: int) -> None:
    mem, _, consumer = ring()
    mem.store_u64(GEOMETRY.producer_index_offset, index)
    with pytest.raises(RingCorruptError):
        consumer.poll()


@pytest.mark.parametrize("case", CASES)
def test_each_producer_index(case: str) -> None:
    mem, producer, consumer = ring()
    for n in range(8):  # honest records first, so that "ok" indices point at real ones
        producer.try_push(3, [bytes([n + 1]) * 8], publish=False)
    delta, expected = CASES[case]
    mem.store_u64(GEOMETRY.producer_index_offset, (START + delta) % WRAP)
    if expected == "ok":
        taken = 0
        try:
            while consumer.poll() is not None:
                taken += 1
        except RingCorruptError:
            assert delta == CAP  # the stale bytes past our records are zeros: bad padding
        assert taken == min(delta, 128) // 16
    else:
        with pytest.raises(RingCorruptError):
            consumer.poll()
