"""One class per transport, all driven by :mod:`bench.harness` with the same workload.

Each peer is used the way its documentation suggests for bytes, one message
per call; only ivclip has a batched row (that is what it adds).  A peer that
cannot be imported stays in the list and is reported as such.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import multiprocessing
import os
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any

from bench.harness import CHUNK, KIND, PING_SIZE, Checker, Runner, Spec, Stamper, quiet_stderr
from shm import layout
from shm.memory import SharedBuffer, copy
from shm.ring import RingConsumer, RingProducer

Send = Callable[[Any], None]
Recv = Callable[[bytearray], None]

SPINS = 0  # polls before giving the core away (see _Idle)


class _Idle:
    """What a spinning loop does when the ring is full or empty: spin SPINS polls, then yield.

    Measured on the 2-core benchmark machine with other work running: spinning
    200 polls first halved ivclip's and cut iceoryx2's throughput (a Python
    spinner takes the core the other side needs), so the loops yield at once.
    """

    __slots__ = ("misses",)

    def __init__(self) -> None:
        self.misses = 0

    def __call__(self) -> None:
        self.misses += 1
        if self.misses > SPINS:
            os.sched_yield()

    def reset(self) -> None:
        self.misses = 0


class _Base:
    name = ""
    note = ""

    def unavailable(self) -> str | None:
        return None

    def cleanup(self, state: Any) -> None:
        pass


# ivclip ----------------------------------------------------------------------
class _Ring(_Base):
    """A region in anonymous shared memory (the same shmem pages /dev/shm gives)."""

    def __init__(self, region_size: int, copy_strategy: str | None = None) -> None:
        self.geometry = layout.expected_geometry(region_size)
        self.copy_strategy = copy_strategy

    def prepare(self, spec: Spec | None = None) -> mmap.mmap:
        if spec is not None and spec.chunk > self.geometry.max_record:
            raise ValueError("chunk larger than the ring's max_record")
        return mmap.mmap(-1, self.geometry.region_size)

    prepare_pingpong = prepare

    def _ends(self, state: mmap.mmap, forward: bool) -> tuple[RingProducer, RingConsumer]:
        if self.copy_strategy is not None:
            from shm.memory import set_copy_strategy

            set_copy_strategy(self.copy_strategy)
        mem = SharedBuffer(state)
        g = self.geometry
        ring = g.guest_to_host if forward else g.host_to_guest
        return RingProducer(mem, ring, g.max_record), RingConsumer(mem, ring, g.max_record)

    def cleanup(self, state: Any) -> None:
        state.close()

    # Ping-pong: both sides spin on the ring, as the issue asks.
    def _pp(self, state: mmap.mmap, a_side: bool) -> tuple[Send, Recv]:
        out, _ = self._ends(state, a_side)
        _, inbox = self._ends(state, not a_side)
        push, poll_into = out.try_push, inbox.poll_into

        def send(msg: Any) -> None:
            while not push(KIND, (msg,)):
                pass

        def recv(buf: bytearray) -> None:
            while poll_into(buf) is None:
                pass

        return send, recv

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, True)

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, False)


class RingCopy(_Ring):
    name = "ivclip ring copy"
    note = "try_push / poll_into (one copy in, one out); sched_yield when full/empty"

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        prod, _ = self._ends(state, True)

        def run() -> None:
            push, idle = prod.try_push, _Idle()
            for seq in range(stamper.total):
                parts = (stamper.chunk(seq),)
                while not push(KIND, parts):
                    idle()
                idle.reset()

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        _, cons = self._ends(state, True)
        buf = bytearray(spec.chunk)

        def run() -> None:
            poll_into, one, idle = cons.poll_into, checker.one, _Idle()
            for _ in range(checker.total):
                while poll_into(buf) is None:
                    idle()
                idle.reset()
                one(buf)

        return run


class RingZeroCopy(_Ring):
    name = "ivclip ring zero-copy"
    note = "loan + copy from the prepared buffer + commit; peek, check in place, consume"

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        prod, _ = self._ends(state, True)

        def run() -> None:
            loan, commit, idle = prod.loan, prod.commit, _Idle()
            for seq in range(stamper.total):
                chunk = stamper.chunk(seq)
                view = loan(len(chunk))
                while view is None:
                    idle()
                    view = loan(len(chunk))
                idle.reset()
                copy(view, chunk)
                commit(KIND)

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        _, cons = self._ends(state, True)

        def run() -> None:
            peek, consume, one, idle = cons.peek, cons.consume, checker.one, _Idle()
            for _ in range(checker.total):
                got = peek()
                while got is None:
                    idle()
                    got = peek()
                idle.reset()
                one(got[1])
                consume()

        return run


class RingBatch(_Ring):
    name = "ivclip ring batch"
    note = "push_chunks of up to 256 KiB of payloads per publish; drain_into all available"
    BATCH_BYTES = 256 * 1024

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        prod, _ = self._ends(state, True)
        chunk = spec.chunk
        per_batch = max(1, self.BATCH_BYTES // chunk)
        # Prepared buffer: the payload's chunks repeated to fill a batch.
        batch = bytearray(bytes(stamper.payload) * max(1, per_batch // spec.per_payload))
        per_batch = len(batch) // chunk

        def run() -> None:
            push, idle = prod.push_chunks, _Idle()
            seq, total = 0, stamper.total
            view = memoryview(batch)
            while seq < total:
                n = min(per_batch, total - seq)
                stamper.batch(batch, seq, n)
                offset, end = 0, n * chunk
                while offset < end:
                    _, used = push(KIND, view[offset:end], chunk)
                    offset += used
                    if used:
                        idle.reset()
                    else:
                        idle()
                seq += n

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        _, cons = self._ends(state, True)
        per_batch = max(1, (4 * self.BATCH_BYTES) // spec.chunk)
        buf = bytearray(per_batch * spec.chunk)
        meta = array("I", bytes(8 * per_batch))

        def run() -> None:
            drain, many, idle = cons.drain_into, checker.many, _Idle()
            while not checker.done:
                records, _ = drain(buf, meta)
                if records:
                    idle.reset()
                    many(buf, records)
                else:
                    idle()

        return run


# Kernel byte streams ------------------------------------------------------------
def _read_exactly(read_into: Callable[[memoryview], int], view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = read_into(view[got:])
        if k <= 0:
            raise EOFError("the stream ended early")
        got += k


class OsPipe(_Base):
    name = "os.pipe"
    note = "os.write / os.readv into the consumer's buffer (default 64 KiB pipe)"

    def prepare(self, spec: Spec | None = None) -> tuple[int, int]:
        return os.pipe()

    def prepare_pingpong(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return os.pipe(), os.pipe()

    def cleanup(self, state: Any) -> None:
        fds = state if isinstance(state[0], int) else state[0] + state[1]
        for fd in fds:
            os.close(fd)

    @staticmethod
    def _writer(fd: int) -> Send:
        def send(data: Any) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        return send

    @staticmethod
    def _reader(fd: int) -> Callable[[memoryview], int]:
        return lambda view: os.readv(fd, (view,))

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        send = self._writer(state[1])

        def run() -> None:
            for seq in range(stamper.total):
                send(stamper.chunk(seq))

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        read = self._reader(state[0])
        buf = bytearray(spec.chunk)
        view = memoryview(buf)

        def run() -> None:
            for _ in range(checker.total):
                _read_exactly(read, view)
                checker.one(buf)

        return run

    def _pp(self, state: Any, a_side: bool) -> tuple[Send, Recv]:
        ab, ba = state
        out, inbox = (ab, ba) if a_side else (ba, ab)
        send, read = self._writer(out[1]), self._reader(inbox[0])
        return send, lambda buf: _read_exactly(read, memoryview(buf))

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, True)

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, False)


class SocketPair(_Base):
    name = "AF_UNIX socketpair"
    note = "sendall / recv_into (SOCK_STREAM, default buffers)"

    def prepare(self, spec: Spec | None = None) -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    prepare_pingpong = prepare

    def cleanup(self, state: Any) -> None:
        for s in state:
            s.close()

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        sock = state[0]

        def run() -> None:
            for seq in range(stamper.total):
                sock.sendall(stamper.chunk(seq))

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        sock = state[1]
        buf = bytearray(spec.chunk)
        view = memoryview(buf)

        def run() -> None:
            for _ in range(checker.total):
                _read_exactly(sock.recv_into, view)
                checker.one(buf)

        return run

    def _pp(self, sock: socket.socket) -> tuple[Send, Recv]:
        return sock.sendall, lambda buf: _read_exactly(sock.recv_into, memoryview(buf))

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[0])

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[1])


# multiprocessing ------------------------------------------------------------------
class MpPipe(_Base):
    name = "multiprocessing.Pipe"
    note = "send_bytes / recv_bytes_into"

    def prepare(self, spec: Spec | None = None) -> Any:
        return multiprocessing.get_context("fork").Pipe(duplex=True)

    prepare_pingpong = prepare

    def cleanup(self, state: Any) -> None:
        for conn in state:
            conn.close()

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        conn = state[0]

        def run() -> None:
            for seq in range(stamper.total):
                conn.send_bytes(stamper.chunk(seq))

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        conn = state[1]
        buf = bytearray(spec.chunk)

        def run() -> None:
            for _ in range(checker.total):
                conn.recv_bytes_into(buf)
                checker.one(buf)

        return run

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return state[0].send_bytes, state[0].recv_bytes_into

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return state[1].send_bytes, state[1].recv_bytes_into


class MpQueue(_Base):
    name = "multiprocessing.Queue"
    note = "put(bytes(chunk)) / get(), maxsize 64"

    def prepare(self, spec: Spec | None = None) -> Any:
        return multiprocessing.get_context("fork").Queue(maxsize=64)

    def prepare_pingpong(self) -> Any:
        ctx = multiprocessing.get_context("fork")
        return ctx.Queue(maxsize=64), ctx.Queue(maxsize=64)

    def cleanup(self, state: Any) -> None:
        for q in state if isinstance(state, tuple) else (state,):
            q.close()
            q.join_thread()

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        def run() -> None:
            for seq in range(stamper.total):
                state.put(bytes(stamper.chunk(seq)))
            state.close()
            state.join_thread()

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        def run() -> None:
            for _ in range(checker.total):
                checker.one(state.get())

        return run

    def _pp(self, out: Any, inbox: Any) -> tuple[Send, Recv]:
        def recv(buf: bytearray) -> None:
            buf[:] = inbox.get()

        return (lambda msg: out.put(bytes(msg))), recv

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[0], state[1])

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[1], state[0])


# POSIX message queue ---------------------------------------------------------------
class PosixMq(_Base):
    name = "posix_ipc.MessageQueue"
    note = ""

    def __init__(self) -> None:
        self.message_size = 0

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("posix_ipc")
        except ImportError as exc:
            return f"not installed ({exc})"
        return None

    def _open(self, size: int) -> Any:
        posix_ipc: Any = importlib.import_module("posix_ipc")

        name = f"/ivclip-bench-{os.getpid()}-{time.monotonic_ns()}"
        try:  # root may exceed fs.mqueue.msgsize_max; others get the system limit
            q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=10, max_message_size=size)
        except (ValueError, OSError, posix_ipc.Error):
            with open("/proc/sys/fs/mqueue/msgsize_max") as f:
                limit = int(f.read())
            q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=10, max_message_size=limit)
        q.unlink()  # both ends inherit the descriptor across fork
        self.message_size = q.max_message_size
        self.note = (
            f"send / receive, chunks cut to the queue's message size "
            f"({q.max_message_size} B here; fs.mqueue.msgsize_max for non-root users)"
        )
        return q

    def prepare(self, spec: Spec | None = None) -> Any:
        return self._open(CHUNK)

    def prepare_pingpong(self) -> Any:
        return self._open(PING_SIZE), self._open(PING_SIZE)

    def cleanup(self, state: Any) -> None:
        for q in state if isinstance(state, tuple) else (state,):
            q.close()

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        step = state.max_message_size

        def run() -> None:
            send = state.send
            for seq in range(stamper.total):
                view = stamper.chunk(seq)
                for at in range(0, len(view), step):
                    send(bytes(view[at : at + step]))

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        step = state.max_message_size
        buf = bytearray(spec.chunk)

        def run() -> None:
            receive = state.receive
            if step >= spec.chunk:
                for _ in range(checker.total):
                    checker.one(receive()[0])
                return
            for _ in range(checker.total):
                for at in range(0, spec.chunk, step):
                    data = receive()[0]
                    buf[at : at + len(data)] = data
                checker.one(buf)

        return run

    def _pp(self, out: Any, inbox: Any) -> tuple[Send, Recv]:
        def recv(buf: bytearray) -> None:
            buf[:] = inbox.receive()[0]

        return (lambda msg: out.send(bytes(msg))), recv

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[0], state[1])

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[1], state[0])


# faster-fifo -----------------------------------------------------------------------
class FasterFifo(_Base):
    name = "faster-fifo"
    note = "put(bytes(chunk)) / get() (pickled), 64 MiB queue buffer"

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("faster_fifo")
        except ImportError as exc:
            return f"not installed ({exc}); pip install faster-fifo"
        return None

    def _queue(self) -> Any:
        faster_fifo: Any = importlib.import_module("faster_fifo")
        return faster_fifo.Queue(max_size_bytes=64 << 20)

    def prepare(self, spec: Spec | None = None) -> Any:
        return self._queue()

    def prepare_pingpong(self) -> Any:
        return self._queue(), self._queue()

    def cleanup(self, state: Any) -> None:
        for q in state if isinstance(state, tuple) else (state,):
            q.close()

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        def run() -> None:
            for seq in range(stamper.total):
                state.put(bytes(stamper.chunk(seq)), timeout=30)

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        def run() -> None:
            for _ in range(checker.total):
                checker.one(state.get(timeout=30))

        return run

    def _pp(self, out: Any, inbox: Any) -> tuple[Send, Recv]:
        def recv(buf: bytearray) -> None:
            buf[:] = inbox.get(timeout=30)

        return (lambda msg: out.put(bytes(msg), timeout=30)), recv

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[0], state[1])

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state[1], state[0])


# iceoryx2 --------------------------------------------------------------------------
class Iceoryx2(_Base):
    name = "iceoryx2"
    note = (
        "zero-copy publish-subscribe of Slice[c_uint8]: loan_slice_uninit + memmove + send; "
        "receive, check in place, drop; spin when empty"
    )

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("iceoryx2")
        except ImportError as exc:
            return f"not installed ({exc}); pip install iceoryx2"
        return None

    def prepare(self, spec: Spec | None = None) -> str:
        return f"ivclip-bench-{os.getpid()}-{time.monotonic_ns()}"

    def prepare_pingpong(self) -> str:
        return self.prepare()

    @staticmethod
    def _service(name: str, max_len: int) -> tuple[Any, Any]:
        with quiet_stderr():
            iox2: Any = importlib.import_module("iceoryx2")

            iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
            node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
            service = (
                node.service_builder(iox2.ServiceName.new(name))
                .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                .enable_safe_overflow(False)
                .subscriber_max_buffer_size(16)
                .history_size(0)
                .open_or_create()
            )
        return node, service

    def _publisher(self, name: str, max_len: int) -> tuple[Any, Any]:
        iox2: Any = importlib.import_module("iceoryx2")

        node, service = self._service(name, max_len)
        publisher = (
            service.publisher_builder()
            .initial_max_slice_len(max_len)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        return (node, service), publisher

    def _subscriber(self, name: str, max_len: int) -> tuple[Any, Any]:
        node, service = self._service(name, max_len)
        return (node, service), service.subscriber_builder().buffer_size(16).create()

    @staticmethod
    def _connect(service: Any, publisher: Any = None, subscriber: Any = None) -> None:
        """Wait until both ends see each other before any sample flows.

        Samples sent while a subscriber is still connecting can be lost (seen
        with 0.10.0: a gap of ~1600 samples after the first 16), so setup waits.
        """
        deadline = time.monotonic() + 20
        config = service.dynamic_config
        while (publisher is not None and config.number_of_subscribers < 1) or (
            subscriber is not None and config.number_of_publishers < 1
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2 ends did not see each other")
            time.sleep(0.001)
        if publisher is not None:
            publisher.update_connections()
        if subscriber is not None and subscriber.receive() is not None:
            raise RuntimeError("a sample arrived before the run started")

    def producer(self, state: Any, spec: Spec, stamper: Stamper) -> Runner:
        keep, publisher = self._publisher(state, spec.chunk)
        self._connect(keep[1], publisher=publisher)
        memmove = ctypes.memmove

        def run() -> None:
            for seq in range(stamper.total):
                chunk = stamper.chunk(seq)
                n = len(chunk)
                sample = publisher.loan_slice_uninit(n)
                memmove(sample.payload_ptr, (ctypes.c_char * n).from_buffer(chunk), n)
                sample.assume_init().send()
            assert keep  # node and service live as long as the run

        return run

    def consumer(self, state: Any, spec: Spec, checker: Checker) -> Runner:
        keep, subscriber = self._subscriber(state, spec.chunk)
        self._connect(keep[1], subscriber=subscriber)

        def run() -> None:
            receive, one, idle = subscriber.receive, checker.one, _Idle()
            for _ in range(checker.total):
                sample = receive()
                while sample is None:
                    idle()
                    sample = receive()
                idle.reset()
                one(sample.payload().as_memory_view())
                del sample  # hands the sample back to the publisher
            assert keep

        return run

    def _pp(self, name: str, a_side: bool) -> tuple[Send, Recv]:
        keep_p, publisher = self._publisher(name + ("-ab" if a_side else "-ba"), PING_SIZE)
        keep_s, subscriber = self._subscriber(name + ("-ba" if a_side else "-ab"), PING_SIZE)
        self._connect(keep_p[1], publisher=publisher)
        self._connect(keep_s[1], subscriber=subscriber)
        memmove = ctypes.memmove
        keep = (keep_p, keep_s)

        def send(msg: Any) -> None:
            sample = publisher.loan_slice_uninit(PING_SIZE)
            memmove(sample.payload_ptr, (ctypes.c_char * PING_SIZE).from_buffer(msg), PING_SIZE)
            sample.assume_init().send()

        def recv(buf: bytearray) -> None:
            sample = subscriber.receive()
            while sample is None:
                sample = subscriber.receive()
            memmove((ctypes.c_char * PING_SIZE).from_buffer(buf), sample.payload_ptr, PING_SIZE)
            assert keep

        return send, recv

    def pinger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, True)

    def ponger(self, state: Any) -> tuple[Send, Recv]:
        return self._pp(state, False)


def all_transports(region_size: int) -> list[Any]:
    return [
        RingCopy(region_size),
        RingZeroCopy(region_size),
        RingBatch(region_size),
        OsPipe(),
        SocketPair(),
        MpPipe(),
        MpQueue(),
        PosixMq(),
        FasterFifo(),
        Iceoryx2(),
    ]


IVCLIP = ("ivclip ring copy", "ivclip ring zero-copy", "ivclip ring batch")
