"""Multi-process stress: more than 1 GiB through a 1 MiB region, every API on both ends.

A producer process and a consumer process share one anonymous shared mapping
(the same shmem pages a /dev/shm region is).  Both derive the same record
sequence from one seed: lengths (large ones to move the bytes, small ones to
stress the per-record paths, and ones chosen to end a record exactly at the
ring's end or to leave a header-only padding record), kinds, and each
payload's place in a shared random pattern.  The producer pushes with
try_push, loan/commit and push_batch, publishing sometimes per record and
sometimes per batch; the consumer takes with poll, poll_into, peek/consume and
drain_into, releasing sometimes late.  The consumer compares every payload
byte for byte, both ends keep a running CRC-32 of everything, and the
consumer checks that its head lands where the layout says every record goes.
It runs once per copy strategy of shm.memory.

Coverage is asserted, not hoped for: padding records of an odd and of an
even number of 8-byte words, header-only padding, records that end exactly
at the ring's end (no padding), and payload lengths of every residue mod 8.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import time
import traceback
import zlib
from array import array
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait

import pytest

from shm import layout
from shm.memory import COPY_STRATEGIES, SharedBuffer, copy, set_copy_strategy
from shm.ring import RingConsumer, RingProducer, record_span

REGION = layout.MIN_REGION_SIZE
GEOMETRY = layout.expected_geometry(REGION)
RING = GEOMETRY.guest_to_host
CAP = RING.capacity
MAXREC = GEOMETRY.max_record
TOTAL = 1 << 30
SEED = 20240607
# Start at an odd number of words past a multiple of the capacity, so nothing lines up by luck.
START = 3 * CAP + 8 * 37
PATTERN_SIZE = 4 << 20
TIMEOUT_S = 240


def pattern() -> bytes:
    return random.Random(SEED).randbytes(PATTERN_SIZE)


def records(seed: int = SEED) -> Iterator[tuple[int, int, int, int]]:
    """(seq, length, kind, pattern offset) of every record, until TOTAL bytes are covered."""
    rng = random.Random(seed)
    pos, moved, seq = START % CAP, 0, 0
    while moved < TOTAL:
        to_end = CAP - pos
        r = rng.random()
        if r < 0.03 and to_end - 8 <= MAXREC:
            length = max(0, to_end - 8 - rng.randrange(8))  # ends exactly at the ring's end
        elif r < 0.06 and to_end > 16 and to_end - 16 <= MAXREC:
            length = to_end - 16 - rng.randrange(8)  # leaves 8 bytes: a header-only pad
        elif r < 0.30:
            length = rng.randrange(0, 300)
        else:
            length = rng.randrange(16 << 10, MAXREC + 1)
        span = record_span(length)
        pos = (pos if span <= to_end else 0) + span
        pos %= CAP
        yield seq, length, 1 + seq % 4093, (seq * 7919) % (PATTERN_SIZE - MAXREC)
        moved += length
        seq += 1


def _produce(mem_map: mmap.mmap, conn: Connection, strategy: str) -> None:
    try:
        set_copy_strategy(strategy)
        data = pattern()
        view = memoryview(data)
        producer = RingProducer(SharedBuffer(mem_map), RING, MAXREC, START)
        rng = random.Random(SEED + 1)
        crc, count, moved = 0, 0, 0
        todo = list(records())
        i = 0
        while i < len(todo):
            how = rng.random()
            publish = rng.random() < 0.7
            if how < 0.4:
                _, length, kind, off = todo[i]
                part = view[off : off + length]
                parts = (part[: length // 2], part[length // 2 :]) if how < 0.1 else (part,)
                while not producer.try_push(kind, parts, publish=publish):
                    producer.publish()
                    os.sched_yield()
                done = 1
            elif how < 0.6:
                _, length, kind, off = todo[i]
                loan = producer.loan(length)
                while loan is None:
                    producer.publish()
                    os.sched_yield()
                    loan = producer.loan(length)
                copy(loan, view[off : off + length])
                producer.commit(kind, publish=publish)
                done = 1
            else:
                # A batch of records of one kind: push_batch takes one kind per call.
                kind = todo[i][2]
                batch = [todo[i]]
                while len(batch) < 16 and i + len(batch) < len(todo):
                    nxt = todo[i + len(batch)]
                    if nxt[2] != kind:
                        break
                    batch.append(nxt)
                joined = b"".join(view[off : off + length] for _, length, _, off in batch)
                lengths = [length for _, length, _, _ in batch]
                done, _ = producer.push_batch(kind, joined, lengths, publish=publish)
                if not done:
                    producer.publish()
                    os.sched_yield()
                    continue
            for _, length, _, off in todo[i : i + done]:
                crc = zlib.crc32(view[off : off + length], crc)
                moved += length
            count += done
            i += done
        producer.publish()
        conn.send(("ok", count, moved, crc))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _consume(mem_map: mmap.mmap, conn: Connection, strategy: str) -> None:
    try:
        set_copy_strategy(strategy)
        data = pattern()
        view = memoryview(data)
        consumer = RingConsumer(SharedBuffer(mem_map), RING, MAXREC, START)
        rng = random.Random(SEED + 2)
        expected = records()
        crc, count, moved = 0, 0, 0
        pad_words: set[int] = set()
        exact_ends = 0
        residues: set[int] = set()
        pos = START % CAP
        buf = bytearray(MAXREC + 64)
        big = bytearray(4 * MAXREC)
        meta = array("I", bytes(8 * 64))

        def check(kind: int, payload: memoryview | bytes | bytearray) -> None:
            nonlocal crc, count, moved, pos, exact_ends
            seq, length, want_kind, off = next(expected)
            if kind != want_kind or len(payload) != length:
                raise AssertionError(f"record {seq}: kind {kind} length {len(payload)}, "
                                     f"expected kind {want_kind} length {length}")
            if view[off : off + length] != payload:
                raise AssertionError(f"record {seq}: payload differs")
            crc = zlib.crc32(payload, crc)
            count += 1
            moved += length
            residues.add(length % 8)
            span, to_end = record_span(length), CAP - pos
            if span > to_end:
                pad_words.add(to_end // 8)
                pos = 0
            if pos + span == CAP:
                exact_ends += 1
            pos = (pos + span) % CAP

        total = sum(1 for _ in records())
        idle = 0
        while count < total:
            how = rng.random()
            release = rng.random() < 0.8
            before = count
            if how < 0.25:
                record = consumer.poll(release=release)
                if record is not None:
                    check(record.kind, record.payload)
            elif how < 0.5:
                got = consumer.poll_into(buf, 64, release=release)
                if got is not None:
                    check(got[0], memoryview(buf)[64 : 64 + got[1]])
            elif how < 0.7:
                peeked = consumer.peek()
                if peeked is not None:
                    check(peeked[0], peeked[1])
                    consumer.consume(release=release)
            else:
                n, _ = consumer.drain_into(big, meta, release=release)
                at = 0
                for k in range(n):
                    kind, length = meta[2 * k], meta[2 * k + 1]
                    check(kind, memoryview(big)[at : at + length])
                    at += length
            if count > before and consumer.head % CAP != pos:
                raise AssertionError(f"head {consumer.head % CAP} is not where record ends ({pos})")
            if count == before:
                consumer.release()
                idle += 1
                os.sched_yield()
        consumer.release()
        conn.send(("ok", count, moved, crc, sorted(pad_words), exact_ends, sorted(residues)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


@pytest.mark.parametrize("strategy", COPY_STRATEGIES)
def test_more_than_a_gib_through_a_small_ring_with_checksums(strategy):
    ctx = multiprocessing.get_context("fork")
    region = mmap.mmap(-1, REGION)
    mem = SharedBuffer(region)
    mem.store_u64(RING.producer_index_offset, START)
    mem.store_u64(RING.consumer_index_offset, START)
    mem.close()
    ends = []
    procs = []
    try:
        for target in (_consume, _produce):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=target, args=(region, child, strategy), daemon=True)
            proc.start()
            child.close()
            ends.append(parent)
            procs.append(proc)
        replies: list[tuple[object, ...] | None] = [None, None]
        deadline = time.monotonic() + TIMEOUT_S
        while None in replies:
            ready = wait([c for c, r in zip(ends, replies, strict=True) if r is None],
                         timeout=max(0.0, deadline - time.monotonic()))
            assert ready, "the stress test timed out"
            for conn in ready:
                reply = conn.recv()  # type: ignore[union-attr]
                assert reply[0] == "ok", reply  # one side failed: say why at once
                replies[ends.index(conn)] = reply  # type: ignore[arg-type]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        region.close()
    consumed, produced = replies
    assert consumed is not None and produced is not None
    _, count, moved, crc, pad_words, exact_ends, residues = consumed
    assert (count, moved, crc) == produced[1:]
    assert moved >= TOTAL
    assert any(w % 2 for w in pad_words) and any(w % 2 == 0 for w in pad_words), pad_words
    assert 1 in pad_words, "no header-only padding record"
    assert exact_ends > 0, "no record ended exactly at the ring's end"
    assert residues == list(range(8)), residues
