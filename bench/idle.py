"""What the adaptive backoff costs: idle CPU share, and the wake-up latency it buys that with.

Measured with the real ring objects in a loop shaped like the broker's and
the guest driver's (poll every ring, reset the backoff on work, sleep
``Backoff.next_wait()`` in a selector that also watches a socket), not with
the broker itself:

* broker-like: 64 idle regions, ``Backoff(max_sleep_s=0.05)`` as the broker
  configures it;
* guest-like: one region, ``Backoff(max_sleep_s=0.02)`` as the driver does.

CPU share: user + system time of the poller process over a window of wall
time, after it has settled into its sleeping phase.  Wake-up latency: the
parent pushes one record (carrying its send time) into one ring after an
idle gap; the poller notes when it copies it out.  Short gaps land in the
spin or short-sleep phase, long ones in the longest sleep.  Each gap is
measured from the moment the poller released the previous record.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import random
import resource
import selectors
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shm import layout
from shm.backoff import Backoff
from shm.memory import SharedBuffer
from shm.ring import RingConsumer, RingProducer

REGION = layout.MIN_REGION_SIZE
_STAMP = struct.Struct("<q")


@dataclass(frozen=True, slots=True)
class IdleResult:
    poller: str
    regions: int
    max_sleep_s: float
    cpu_share: float  # of one core
    wakeups: dict[float, tuple[float, float]]  # idle gap (s) -> (p50, p99) latency in microseconds


def _poll_loop(
    regions: Sequence[mmap.mmap],
    max_sleep_s: float,
    conn: socket.socket,
    stop_after_s: float,
) -> None:
    geometry = layout.expected_geometry(REGION)
    ring = geometry.guest_to_host
    consumers = [RingConsumer(SharedBuffer(m), ring, geometry.max_record) for m in regions]
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    backoff = Backoff(max_sleep_s=max_sleep_s)
    buf = bytearray(64)
    latencies: list[int] = []
    usage_at: list[tuple[float, float]] = []
    deadline = time.monotonic() + stop_after_s
    while True:
        moved = False
        for consumer in consumers:
            if consumer.poll_into(buf) is not None:
                latencies.append(time.perf_counter_ns() - _STAMP.unpack_from(buf)[0])
                moved = True
        if moved:
            backoff.reset()
        for key, _ in selector.select(backoff.next_wait()):
            data = key.fileobj.recv(64)  # type: ignore[union-attr]
            if data == b"mark":
                r = resource.getrusage(resource.RUSAGE_SELF)
                usage_at.append((time.monotonic(), r.ru_utime + r.ru_stime))
            elif data == b"stop" or not data:
                conn.sendall(json.dumps([usage_at, latencies]).encode() + b"\n")
                return
        if time.monotonic() > deadline:
            return


def _measure(
    poller: str, regions: int, max_sleep_s: float, idle_s: float, gaps: Sequence[float], samples: int
) -> IdleResult:
    maps = [mmap.mmap(-1, REGION) for _ in range(regions)]
    ours, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    budget = 30 + idle_s + sum(gaps) * (samples + 1) * 2
    proc = ctx.Process(target=_poll_loop, args=(maps, max_sleep_s, theirs, budget), daemon=True)
    proc.start()
    theirs.close()
    mems: list[SharedBuffer] = []
    try:
        geometry = layout.expected_geometry(REGION)
        ring = geometry.guest_to_host
        mems.extend(SharedBuffer(m) for m in maps)
        producers = [RingProducer(mem, ring, geometry.max_record) for mem in mems]
        # Idle CPU: let it settle into the sleeping phase, then measure a window.
        time.sleep(0.5)
        ours.sendall(b"mark")
        time.sleep(idle_s)
        ours.sendall(b"mark")
        # Wake-ups after idle gaps; the gap is jittered so we do not beat with the sleep.
        rng = random.Random(7)
        for gap in gaps:
            for _ in range(samples + 1):  # the first one of each gap is dropped below
                # The gap runs from the poller's last work (it released the last record).
                time.sleep(gap * rng.uniform(0.8, 1.2))
                k = rng.randrange(regions)
                msg = _STAMP.pack(time.perf_counter_ns()) + bytes(56)
                producers[k].try_push(1, (msg,))
                wait_until = time.monotonic() + 5
                while mems[k].load_u64(ring.consumer_index_offset) != producers[k].tail:
                    if time.monotonic() > wait_until:
                        raise TimeoutError("the poller did not take a record within 5 s")
                    time.sleep(20e-6)
        time.sleep(max_sleep_s * 2)
        ours.sendall(b"stop")
        reply = b""
        ours.settimeout(30)
        while not reply.endswith(b"\n"):
            chunk = ours.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
        ours.close()
        for mem in mems:
            mem.close()
        for m in maps:
            m.close()
    usage_at, latencies = json.loads(reply)
    (t0, c0), (t1, c1) = usage_at[:2]
    wakeups = {}
    ns = np.array(latencies, dtype=np.float64) / 1000.0
    at = 0
    for gap in gaps:
        part = ns[at + 1 : at + 1 + samples]  # drop the warm-up sample
        at += samples + 1
        if len(part):
            wakeups[gap] = (float(np.percentile(part, 50)), float(np.percentile(part, 99)))
    return IdleResult(poller, regions, max_sleep_s, (c1 - c0) / (t1 - t0), wakeups)


def measure_idle(idle_s: float, gaps: Sequence[float], samples: int) -> list[IdleResult]:
    return [
        _measure("broker-like", 64, 0.05, idle_s, gaps, samples),
        _measure("guest-like", 1, 0.02, idle_s, gaps, samples),
    ]


__all__ = ["IdleResult", "measure_idle"]
