"""The workload, identical for every transport, and the processes that run it.

Throughput: a producer process sends `count` payloads of `size` bytes from one
prepared (random) buffer; a separate consumer process receives them.  A
payload larger than :data:`CHUNK` travels as CHUNK-sized chunks, for every
transport alike (a ring record holds at most max_record bytes; a message
queue has a message size).  Before sending chunk number `seq` the producer
writes `seq` into its first and last 8 bytes (the "stamps").

The consumer ends with every chunk either in its own memory (copying
transports: a buffer it owns, or the bytes object the transport returned) or,
for zero-copy transports, in a view it verifies in place; in both cases it
checks both stamps of every chunk (nothing lost, reordered, duplicated or
torn at the edges) and compares every :data:`FULL_CHECK_EVERY`-th chunk and
the last one byte for byte against its own copy of the prepared buffer.

Timing: both processes set up first, then are released together; the
consumer's clock runs from its release to the arrival of the last chunk.  It
notes the time after every receive call; p50/p99 are of the time per payload
between consecutive receives (a batch's interval is shared by its payloads).

Ping-pong: one 64-byte message goes back and forth; one-way latency is half
the round trip.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import struct
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

CHUNK = 256 * 1024
SIZES = (64, 4096, 65536, 1 << 20, 16 << 20)
FULL_CHECK_EVERY = 16
PING_SIZE = 64
KIND = 1  # the record kind every ring transport uses

_STAMP = struct.Struct("<Q")


class BenchError(Exception):
    """A run failed: a transport broke, timed out, or delivered wrong bytes."""


@dataclass(frozen=True, slots=True)
class Spec:
    size: int
    count: int

    @property
    def chunk(self) -> int:
        return min(self.size, CHUNK)

    @property
    def per_payload(self) -> int:
        return -(-self.size // self.chunk)

    @property
    def total_chunks(self) -> int:
        return self.count * self.per_payload


def prepared_payload(size: int, seed: int = 1) -> bytearray:
    """The buffer every producer sends from (and every consumer checks against)."""
    return bytearray(np.random.default_rng(seed).bytes(size))


class Stamper:
    """Producer side: hands out chunk views of the prepared buffer, stamped with their number."""

    def __init__(self, spec: Spec, payload: bytearray) -> None:
        self.spec = spec
        self.payload = payload
        view = memoryview(payload)
        chunk = spec.chunk
        self.views = [view[i * chunk : (i + 1) * chunk] for i in range(spec.per_payload)]
        self.total = spec.total_chunks

    def chunk(self, seq: int) -> memoryview:
        view = self.views[seq % len(self.views)]
        _STAMP.pack_into(view, 0, seq)
        _STAMP.pack_into(view, len(view) - 8, seq)
        return view

    def batch(self, buffer: bytearray, first: int, count: int) -> None:
        """Stamp `count` consecutive chunks laid out back to back in `buffer` (all chunk-sized)."""
        words = np.frombuffer(buffer, dtype=np.uint64, count=count * self.spec.chunk // 8)
        words = words.reshape(count, self.spec.chunk // 8)
        seqs = np.arange(first, first + count, dtype=np.uint64)
        words[:, 0] = seqs
        words[:, -1] = seqs


class Checker:
    """Consumer side: checks stamps and contents, and notes when receives return."""

    def __init__(self, spec: Spec, payload: bytearray) -> None:
        self.spec = spec
        chunk = spec.chunk
        self.expected = [
            bytearray(payload[i * chunk : (i + 1) * chunk]) for i in range(spec.per_payload)
        ]
        self.total = spec.total_chunks
        self.next = 0
        self.times = array("q")
        self.counts = array("q")
        self.full_checks = 0

    def _fail(self, why: str) -> None:
        raise BenchError(f"chunk {self.next}: {why}")

    def _full(self, seq: int, data: Any) -> None:
        expected = self.expected[seq % len(self.expected)]
        _STAMP.pack_into(expected, 0, seq)
        _STAMP.pack_into(expected, len(expected) - 8, seq)
        if expected != data:
            self._fail("payload bytes differ from what was sent")
        self.full_checks += 1

    def one(self, data: Any) -> None:
        """One chunk received (`data` supports the buffer protocol, chunk-sized)."""
        seq = self.next
        n = len(data)
        if n != self.spec.chunk:
            self._fail(f"{n} bytes instead of {self.spec.chunk}")
        if _STAMP.unpack_from(data, 0)[0] != seq or _STAMP.unpack_from(data, n - 8)[0] != seq:
            self._fail("stamps do not match: lost, reordered or torn")
        if seq % FULL_CHECK_EVERY == 0 or seq == self.total - 1:
            self._full(seq, data)
        self.next = seq + 1
        self.times.append(time.perf_counter_ns())
        self.counts.append(1)

    def many(self, buffer: Any, count: int) -> None:
        """`count` chunks received back to back at the start of `buffer`."""
        chunk = self.spec.chunk
        first = self.next
        words = np.frombuffer(buffer, dtype=np.uint64, count=count * chunk // 8)
        words = words.reshape(count, chunk // 8)
        seqs = np.arange(first, first + count, dtype=np.uint64)
        if not (np.array_equal(words[:, 0], seqs) and np.array_equal(words[:, -1], seqs)):
            self._fail("stamps do not match: lost, reordered or torn")
        view = memoryview(buffer)
        last = first + count - 1
        seq = first + (-first % FULL_CHECK_EVERY)
        while seq <= last:
            self._full(seq, view[(seq - first) * chunk : (seq - first + 1) * chunk])
            seq += FULL_CHECK_EVERY
        if last == self.total - 1 and last % FULL_CHECK_EVERY:
            self._full(last, view[(last - first) * chunk : (last - first + 1) * chunk])
        self.next = last + 1
        self.times.append(time.perf_counter_ns())
        self.counts.append(count)

    @property
    def done(self) -> bool:
        return self.next >= self.total


# Transports ------------------------------------------------------------------
Runner = Callable[[], None]


class Transport(Protocol):
    name: str
    note: str

    def unavailable(self) -> str | None:
        """Why this transport cannot run here (not installed...), or None."""

    def prepare(self, spec: Spec) -> Any:
        """Parent, before the fork: make what both processes share."""

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        """Child: set up, and return the function that sends every chunk."""

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        """Child: set up, and return the function that receives every chunk."""

    def cleanup(self, state: Any) -> None:
        """Parent, after both children ended."""

    def prepare_pingpong(self) -> Any: ...

    def pinger(self, state: Any) -> tuple[Callable[[Any], None], Callable[[bytearray], None]]:
        """Side A: (send, receive) of one 64-byte message."""

    def ponger(self, state: Any) -> tuple[Callable[[Any], None], Callable[[bytearray], None]]:
        """Side B: (send, receive) of one 64-byte message."""


@dataclass(slots=True)
class Measurement:
    transport: str
    payload_bytes: int
    payloads: int = 0
    seconds: float = 0.0
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    status: str = "ok"
    full_checks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def bytes_per_s(self) -> float:
        return self.payloads * self.payload_bytes / self.seconds if self.ok and self.seconds else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.payloads / self.seconds if self.ok and self.seconds else 0.0


def per_payload_percentiles(
    start_ns: int, times: array[int], counts: array[int], per_payload: int
) -> tuple[float, float]:
    """p50 and p99 (microseconds) of the time per payload between receives."""
    if not len(times):
        return float("nan"), float("nan")
    t = np.frombuffer(times, dtype=np.int64).astype(np.float64)
    c = np.frombuffer(counts, dtype=np.int64).astype(np.float64)
    gaps = np.diff(np.concatenate(([float(start_ns)], t)))
    # A payload of k chunks completes every k chunks: per-chunk time * k.
    per = gaps / c * per_payload
    order = np.argsort(per)
    weights = np.cumsum(c[order])
    total = weights[-1]
    p50 = per[order][np.searchsorted(weights, 0.5 * total)]
    p99 = per[order][min(len(order) - 1, int(np.searchsorted(weights, 0.99 * total)))]
    return float(p50) / 1000.0, float(p99) / 1000.0


# Processes -------------------------------------------------------------------
def _child(role: str, work: Callable[[], Runner], conn: Connection, go_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = work()
        conn.send(("ready",))
        os.read(go_fd, 1)
        start = time.perf_counter_ns()
        run()
        end = time.perf_counter_ns()
        conn.send(("done", start, end))
    except BaseException as exc:  # report anything; the parent decides
        conn.send(("error", f"{role}: {type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


def _pair(
    producer: Callable[[], Runner],
    consumer: Callable[[], Runner],
    timeout_s: float,
    collect: Callable[[], Any],
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Fork both sides, release them together; return their final messages."""
    ctx = multiprocessing.get_context("fork")
    go_r, go_w = os.pipe()
    results = []
    procs = []
    try:
        for role, work in (("consumer", consumer), ("producer", producer)):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_with_collect if role == "consumer" else _child,
                args=(role, work, child_end, go_r) + ((collect,) if role == "consumer" else ()),
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            results.append(parent_end)
        deadline = time.monotonic() + max(30.0, timeout_s)
        for conn in results:
            msg = _recv(conn, deadline)
            if msg[0] != "ready":
                raise BenchError(msg[1] if len(msg) > 1 else "setup failed")
        os.write(go_w, b"gg")
        deadline = time.monotonic() + timeout_s
        final = [_recv(conn, deadline) for conn in results]
        for msg in final:
            if msg[0] == "error":
                raise BenchError(msg[1])
        return tuple(final[0]), tuple(final[1])
    finally:
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for conn in results:
            conn.close()
        os.close(go_r)
        os.close(go_w)


def _child_with_collect(
    role: str, work: Callable[[], Runner], conn: Connection, go_fd: int, collect: Callable[[], Any]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = work()
        conn.send(("ready",))
        os.read(go_fd, 1)
        start = time.perf_counter_ns()
        run()
        end = time.perf_counter_ns()
        conn.send(("done", start, end, collect()))
    except BaseException as exc:
        conn.send(("error", f"{role}: {type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


def _recv(conn: Connection, deadline: float) -> tuple[Any, ...]:
    left = deadline - time.monotonic()
    if left <= 0 or not conn.poll(left):
        raise BenchError("timed out")
    try:
        msg: tuple[Any, ...] = conn.recv()
    except EOFError as exc:
        raise BenchError("a benchmark process died") from exc
    return msg


def run_throughput(transport: Transport, spec: Spec, timeout_s: float) -> Measurement:
    """One producer and one consumer process moving `spec.count` payloads."""
    result = Measurement(transport.name, spec.size)
    payload = prepared_payload(spec.size)
    checker = Checker(spec, payload)
    stamper = Stamper(spec, payload)
    state = transport.prepare(spec)
    try:
        (_, start, _end, collected), _ = _pair(
            lambda: transport.producer(state, spec, stamper),
            lambda: transport.consumer(state, spec, checker),
            timeout_s,
            lambda: (checker.next, checker.full_checks, checker.times, checker.counts),
        )
    except BenchError as exc:
        result.status = str(exc)
        return result
    finally:
        transport.cleanup(state)
    received, full_checks, times, counts = collected
    if received != spec.total_chunks or not len(times):
        result.status = f"received {received} of {spec.total_chunks} chunks"
        return result
    result.payloads = spec.count
    result.seconds = (times[-1] - start) / 1e9
    result.full_checks = full_checks
    result.p50_us, result.p99_us = per_payload_percentiles(
        start, times, counts, spec.per_payload
    )
    return result


def run_pingpong(transport: Transport, rounds: int, timeout_s: float) -> Measurement:
    """64-byte ping-pong; p50/p99 of one-way latency (half the round trip)."""
    result = Measurement(transport.name, PING_SIZE)
    state = transport.prepare_pingpong()
    rtts = array("q", bytes(8 * rounds))

    def side_a() -> Runner:
        send, recv = transport.pinger(state)
        msg = bytearray(os.urandom(PING_SIZE))
        buf = bytearray(PING_SIZE)

        def run() -> None:
            clock = time.perf_counter_ns
            for i in range(rounds):
                _STAMP.pack_into(msg, 0, i)
                t0 = clock()
                send(msg)
                recv(buf)
                rtts[i] = clock() - t0
                if _STAMP.unpack_from(buf, 0)[0] != i:
                    raise BenchError(f"round {i}: wrong reply")

        return run

    def side_b() -> Runner:
        send, recv = transport.ponger(state)
        buf = bytearray(PING_SIZE)

        def run() -> None:
            for _ in range(rounds):
                recv(buf)
                send(buf)

        return run

    try:
        (_, start, end, collected), _ = _pair(side_b, side_a, timeout_s, lambda: rtts)
    except BenchError as exc:
        result.status = str(exc)
        return result
    finally:
        transport.cleanup(state)
    samples = np.frombuffer(collected, dtype=np.int64)[rounds // 10 :]  # drop warm-up
    one_way = samples / 2.0 / 1000.0
    result.payloads = rounds
    result.seconds = (end - start) / 1e9
    result.p50_us = float(np.percentile(one_way, 50))
    result.p99_us = float(np.percentile(one_way, 99))
    return result


@contextlib.contextmanager
def quiet_stderr() -> Any:
    """Silence a library's chatter on fd 2 (iceoryx2 prints config notices)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
