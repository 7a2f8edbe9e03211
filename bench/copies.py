"""Single-core copies: the memcpy reference row and the copy-strategy table.

The reference row copies each chunk of the prepared buffer into one private
destination buffer, from Python, one C call per chunk (glibc memcpy through
``ivc_copy_plain``): the cost of the one copy a consumer must make, with no
second process, no shared cache lines and no synchronisation.  Source and
destination stay hot in cache for chunks that fit, so this is the strictest
reference there is.

The strategy table measures the ring's own copy-in path (``push_chunks`` on a
private ring, many records per C call, so Python's call overhead is out of
it) for each copy strategy of shm.memory, block size by block size, once with
a 64 MiB ring (destination lines cold; first touch is not counted: the ring
is written through before timing) and once with a 1 MiB ring (warm: it stays
in this core's L2, as a ring the consumer keeps up with does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from shm._ivclip_c import ffi, lib

from bench.harness import Measurement, Spec, prepared_payload
from shm.layout import RingGeometry
from shm.memory import COPY_STRATEGIES, SharedBuffer, set_copy_strategy
from shm.ring import RingProducer, record_span

STRATEGY_BLOCKS = (4096, 16384, 32768, 65536, 131072, 262144, 1 << 20)


def memcpy_row(spec: Spec, payload: bytearray) -> Measurement:
    """The single-core memcpy of the same chunks: the physical limit of one copy."""
    dst = bytearray(spec.chunk)
    chunk = spec.chunk
    base = ffi.from_buffer(payload)
    src_ptrs = [base + i * chunk for i in range(spec.per_payload)]
    dst_ptr = ffi.from_buffer(dst)
    plain = lib.ivc_copy_plain
    # Time blocks of payloads (one timer read per ~64 KiB) for the percentiles.
    block = max(1, (64 << 10) // spec.size)
    per_payload_ns = []
    clock = time.perf_counter_ns
    start = last = clock()
    for i in range(0, spec.count, block):
        for _ in range(min(block, spec.count - i)):
            for ptr in src_ptrs:
                plain(dst_ptr, ptr, chunk)
        now = clock()
        per_payload_ns.append((now - last) / min(block, spec.count - i))
        last = now
    result = Measurement("memcpy", spec.size, payloads=spec.count, seconds=(last - start) / 1e9)
    samples = np.array(per_payload_ns) / 1000.0
    result.p50_us = float(np.percentile(samples, 50))
    result.p99_us = float(np.percentile(samples, 99))
    return result


@dataclass(frozen=True, slots=True)
class StrategyRow:
    strategy: str
    block: int
    cold_gb_s: float
    warm_gb_s: float


def _ring_copy_rate(block: int, capacity: int, seconds: float) -> float:
    """GB/s of push_chunks of `block`-byte records into a private ring of `capacity`."""
    buf = bytearray(4096 + capacity)
    mem = SharedBuffer(buf)
    geometry = RingGeometry(4096, capacity, 0, 128)
    max_record = min(block, capacity // 4)
    producer = RingProducer(mem, geometry, max_record)
    per_call = max(1, min(capacity // record_span(block) - 1, (8 << 20) // block))
    data = prepared_payload(block * per_call)
    try:
        # Warm-up pass: first touch of every page and line is not what we measure.
        for _ in range(2 if capacity > (8 << 20) else 1):
            mem.store_u64(128, producer.tail)
            producer.push_chunks(1, data, block, publish=False)
        best = 0.0
        for _ in range(3):  # best of three: other work on the machine only slows a slice down
            moved = 0
            start = time.perf_counter()
            deadline = start + seconds / 3
            while True:
                mem.store_u64(128, producer.tail)  # the "consumer" keeps up: ring always empty
                _, used = producer.push_chunks(1, data, block, publish=False)
                moved += used
                now = time.perf_counter()
                if now >= deadline:
                    break
            best = max(best, moved / (now - start) / 1e9)
        return best
    finally:
        mem.close()


def strategy_table(seconds_per_cell: float) -> list[StrategyRow]:
    rows = []
    previous = set_copy_strategy("glibc")
    try:
        for strategy in COPY_STRATEGIES:
            set_copy_strategy(strategy)
            for block in STRATEGY_BLOCKS:
                cold_capacity = 64 << 20
                warm_capacity = max(1 << 20, -(-4 * record_span(block) // 4096) * 4096 + 4096)
                rows.append(
                    StrategyRow(
                        strategy,
                        block,
                        _ring_copy_rate(block, cold_capacity, seconds_per_cell),
                        _ring_copy_rate(block, warm_capacity, seconds_per_cell),
                    )
                )
    finally:
        set_copy_strategy(previous)
    return rows


__all__ = ["STRATEGY_BLOCKS", "StrategyRow", "memcpy_row", "strategy_table"]
