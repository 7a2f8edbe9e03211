"""A hostile guest, for the adversary tests and the latency benchmark (never for production).

It maps its own region as a guest would and rewrites any byte of it: ring
indices, record headers, record payloads, the header the broker wrote, its
own status fields, and answers to copy and paste gestures, valid or not.
Every mutation is drawn from a seeded ``random.Random``, so a run is
reproducible up to the timing of the broker's reads.

Each mutation has a label (``family.name``), and the run's report counts
them.  The families:

* ``index``  -- g2h_tail behind, ahead, far past the capacity, wrapping,
  negative when read signed, misaligned, exactly one capacity ahead;
* ``record`` -- lengths zero, odd, over the ring, over max_record, over what
  was published, straddling the end, bad padding; unknown kinds, a copy
  request from the guest, bad status fields, a size over any limit;
* ``proto``  -- well-formed but unsolicited: data streams, chunks and ends with
  guessed transfer ids, statuses and cancels (the broker drops and counts them);
* ``header`` -- the broker's fields (magic, version, sizes, offsets, session id,
  max_record, capability bits, heartbeat, the broker's own indices);
* ``guest``  -- its status fields (session, epoch, heartbeat, version) and the
  h2g consumer index;
* ``race``   -- one field flipped between a valid and an invalid value for a
  while (the tail, a record's length, kind, transfer id or size, the magic,
  the guest session), to catch a broker that reads a field twice;
* ``answer`` -- its answers when the host user does make a copy gesture for it
  (honest, over the limit, bad offsets, short, silent, a premature OK...) and
  when a paste arrives (consume and confirm, confirm early, never consume).

Content it makes up starts with :data:`MARKER`, so a test can tell whether
any of it reached the global clipboard.

``python -m broker.hostile --region PATH --seed N --duration S [--mode chaos|flood]``
runs it as a process until the time is up and writes a JSON report.  In
``flood`` mode it only pushes well-formed unsolicited chunks of the largest
size, as fast as the ring takes them (the benchmark's "hostile VM flooding
at full speed").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from protocol.channel import CAP_COPY_FROM, CAP_PASTE_TO
from protocol.errors import RemoteProtocolError
from protocol.messages import (
    Cancel,
    CopyRequest,
    DataBegin,
    DataChunk,
    DataEnd,
    Kind,
    Message,
    Status,
    StatusCode,
    decode,
    encode,
)
from shm import layout
from shm.errors import RingCorruptError, ShmError
from shm.memory import SharedBuffer
from shm.region import Region
from shm.ring import PAD_KIND, RingConsumer, record_span

log = logging.getLogger(__name__)

MARKER = b"MALLORY!"
_U64 = (1 << 64) - 1
_HDR = struct.Struct("<II")


def forged_content(rng: random.Random, size: int) -> bytes:
    """Made-up content: the marker, then random bytes (at least the marker)."""
    return (MARKER + rng.randbytes(max(0, size - len(MARKER))))[: max(size, len(MARKER))]


class Adversary:
    """Attacks the broker through one region.  Call :meth:`step` in a loop."""

    def __init__(self, mem: SharedBuffer, rng: random.Random, *, concurrent: bool,
                 fault_share: float | None = None) -> None:
        self.mem = mem
        self.rng = rng
        # concurrent: a broker process runs alongside, so races flip for real and
        # a mutation waits a moment for the broker to look; otherwise the caller
        # services the broker between steps.
        self.concurrent = concurrent
        geometry = layout.expected_geometry(mem.size)
        self.geometry = geometry
        self.cap = geometry.guest_to_host.capacity
        self.data = geometry.guest_to_host.data_offset
        self.max_record = geometry.max_record
        self.session = b""
        self.tail = 0
        self.heartbeat = 0
        self.h2g: RingConsumer | None = None
        self.counts: Counter[str] = Counter()
        self.iterations = 0
        self._pending_restore: list[tuple[int, bytes, bytes]] = []  # offset, wrote, original
        self._stalling = False
        # The share of steps spent on mutations that make the broker mark us faulty
        # (index, record).  Each fault makes the broker ignore us until it
        # re-initialises the region (a second): against a live broker they are kept
        # rare, so that it spends its time reading what the other families write.
        self.fault_share = (0.01 if concurrent else 0.4) if fault_share is None else fault_share
        self._mutations: list[tuple[str, Callable[[], None]]] = [
            (name[len("m_"):].replace("__", "."), getattr(self, name))
            for name in sorted(dir(self)) if name.startswith("m_")
        ]
        self._faulting = [m for m in self._mutations if m[0].startswith(FAULTING)]
        self._others = [m for m in self._mutations if not m[0].startswith(FAULTING)]

    # Attaching, like a driver would, so that the broker reads our rings -------
    def sync(self) -> bool:
        """Attach to the current session if it changed; True when attached."""
        if self.mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little") != layout.MAGIC:
            return False
        session = self.mem.read(layout.SESSION_ID_OFF, layout.SESSION_ID_SIZE)
        if session == self.session:
            return True
        self.session = session
        self.tail = self.mem.load_u64(layout.G2H_TAIL_OFF) & ~7  # 0 after a re-initialisation
        self._pending_restore.clear()
        self.h2g = RingConsumer(self.mem, self.geometry.host_to_guest, self.max_record,
                                start_index=self.mem.load_u64(layout.H2G_TAIL_OFF) & ~7)
        self.mem.store_u64(layout.H2G_HEAD_OFF, self.h2g.head)
        self.mem.store_u64(layout.GUEST_EPOCH_OFF, self.rng.getrandbits(64) | 1)
        self.mem.store_u64(layout.GUEST_HEARTBEAT_OFF, self._beat())
        self.mem.store_u32(layout.GUEST_VERSION_OFF, 1)
        self.mem.write(layout.GUEST_SESSION_OFF, session)
        self.counts["attach"] += 1
        return True

    def _beat(self) -> int:
        self.heartbeat += 1
        return self.heartbeat

    def beat(self) -> None:
        self.mem.store_u64(layout.GUEST_HEARTBEAT_OFF, self._beat())

    # Low-level writing ---------------------------------------------------------
    def head(self) -> int:
        """The broker's consumer index of our g2h ring (what it has read)."""
        return self.mem.load_u64(layout.G2H_HEAD_OFF)

    def room(self) -> int:
        return self.cap - ((self.tail - self.head()) & _U64)

    def publish(self, tail: int | None = None) -> None:
        self.mem.store_u64(layout.G2H_TAIL_OFF, (self.tail if tail is None else tail) & _U64)

    def put(
        self, kind: int, payload: bytes, *, length: int | None = None, publish: bool = True
    ) -> int | None:
        """Write one record at our tail, honestly framed (padding at the end of the
        ring) except for `length`, which may lie.  Returns its ring position, or None
        when there is no room."""
        span = record_span(len(payload))
        pos = self.tail % self.cap
        to_end = self.cap - pos
        need = span if span <= to_end else to_end + span
        if span > self.cap // 2 or need > self.room():
            return None
        if span > to_end:
            self.mem.write(self.data + pos, _HDR.pack(to_end - 8, PAD_KIND))
            self.tail += to_end
            pos = 0
        self.mem.write(self.data + pos, _HDR.pack(len(payload) if length is None else length, kind))
        self.mem.write(self.data + pos + 8, payload)
        self.tail += span
        if publish:
            self.publish()
        return pos

    def send(self, *messages: Message) -> bool:
        for message in messages:
            kind, parts = encode(message)
            if self.put(int(kind), b"".join(bytes(p) for p in parts)) is None:
                return False
        return True

    def _scribble(self, offset: int, data: bytes) -> None:
        """Overwrite a field, remembering it so it can be put back later."""
        original = self.mem.read(offset, len(data))
        self.mem.write(offset, data)
        self._pending_restore.append((offset, data, original))

    def restore(self) -> None:
        """Put back scribbled fields, unless the broker rewrote them meanwhile."""
        for offset, wrote, original in reversed(self._pending_restore):
            if self.mem.read(offset, len(wrote)) == wrote:
                self.mem.write(offset, original)
        self._pending_restore.clear()

    def _wait_for_broker(self) -> None:
        if self.concurrent:
            time.sleep(self.rng.choice((0.0, 0.0005, 0.002, 0.005)))

    def _flip(self, offset: int, values: tuple[bytes, bytes]) -> None:
        """Alternate a field between a good and a bad value: for a while against a
        live broker, ending on the good one; otherwise (the caller services the
        broker between steps) the bad value on every other step, put back later."""
        good, bad = values
        if not self.concurrent:
            if self.iterations % 2:
                self._scribble(offset, bad)
            return
        deadline = time.monotonic() + self.rng.choice((0.001, 0.005, 0.02))
        write = self.mem.write
        while time.monotonic() < deadline:
            for _ in range(200):
                write(offset, good)
                write(offset, bad)
        write(offset, good)

    def _id(self) -> int:
        return self.rng.choice((0, 1, _U64, self.rng.getrandbits(64)))

    # One step --------------------------------------------------------------------
    def step(self) -> str | None:
        """Apply one mutation (or answer the broker); returns its label, None if not attached."""
        self.iterations += 1
        self.restore()  # first: what we scribbled may be the very fields sync() reads
        if not self.sync():
            return None
        if self.iterations % 8 == 0:
            self.beat()
        label = self._answer() or self._mutate()
        self.counts[label] += 1
        self._wait_for_broker()
        return label

    def _mutate(self) -> str:
        group = self._faulting if self.rng.random() < self.fault_share else self._others
        label, mutate = self.rng.choice(group)
        mutate()
        return label

    def behave(self) -> bool:
        """One honest step: attached, heartbeat, answer the broker; no mutation."""
        self.iterations += 1
        self.restore()
        if not self.sync():
            return False
        if self.mem.load_u64(layout.GUEST_EPOCH_OFF) == 0:
            self.mem.store_u64(layout.GUEST_EPOCH_OFF, self.rng.getrandbits(64) | 1)
        self.mem.write(layout.GUEST_SESSION_OFF, self.session)
        self.beat()
        label = self._answer()
        if label:
            self.counts[label] += 1
        return True

    def flood_step(self) -> int:
        """Push the largest well-formed unsolicited chunks while the ring has room."""
        self.iterations += 1
        if not self.sync():
            return 0
        if self.iterations % 64 == 0:
            self.beat()
        pushed = 0
        payload = struct.pack("<QQ", self.rng.getrandbits(64), 0) + forged_content(
            self.rng, self.max_record - 16)
        while self.put(int(Kind.DATA_CHUNK), payload) is not None:
            pushed += 1
        self.counts["flood.chunk"] += pushed
        return pushed

    # Answers to gestures -------------------------------------------------------
    def _answer(self) -> str | None:
        """When the broker asks (copy gesture) or hands us a paste, misbehave in one way."""
        caps = self.mem.load_u32(layout.CAPABILITIES_OFF)
        if not caps & CAP_PASTE_TO:
            self._stalling = False
        if not caps & (CAP_COPY_FROM | CAP_PASTE_TO) or self.h2g is None or self._stalling:
            return None
        try:
            record = self.h2g.poll()
        except RingCorruptError:
            return None  # we scribbled the broker's h2g tail ourselves
        if record is None:
            return None
        try:
            message = decode(record.kind, record.payload)
        except RemoteProtocolError:
            return None
        if isinstance(message, CopyRequest):
            return self._answer_copy(message)
        if isinstance(message, DataBegin):
            return self._answer_paste(message.transfer_id, begin=True)
        if isinstance(message, DataChunk | DataEnd):
            return self._answer_paste(message.transfer_id, end=isinstance(message, DataEnd))
        return None

    def _answer_copy(self, request: CopyRequest) -> str:
        tid, limit = request.transfer_id, request.limit
        how = self.rng.choice(("honest", "honest", "over_limit", "bad_offset", "short_end", "overflow",
                               "silent", "status_ok", "empty", "too_large", "double_begin", "wrong_id"))
        # Without a live broker to drain the ring meanwhile, an answer must fit in it.
        most = 3 * self.max_record if self.concurrent else self.max_record
        size = self.rng.randint(1, max(1, min(limit, most)))
        content = forged_content(self.rng, size)
        chunk = self.max_record - 16
        if how == "honest":
            self.send(DataBegin(tid, len(content)))
            for off in range(0, len(content), chunk):
                for _ in range(2000 if self.concurrent else 1):
                    if self.send(DataChunk(tid, off, content[off : off + chunk])):
                        break
                    time.sleep(0.0005)  # the broker reads the ring meanwhile
            self.send(DataEnd(tid))
        elif how == "over_limit":
            self.send(DataBegin(tid, limit + 1 + self.rng.randrange(1 << 20)))
        elif how == "bad_offset":
            self.send(DataBegin(tid, 64), DataChunk(tid, 8, content[:32]))
        elif how == "short_end":
            self.send(DataBegin(tid, 64), DataChunk(tid, 0, content[:16]), DataEnd(tid))
        elif how == "overflow":
            self.send(DataBegin(tid, 16), DataChunk(tid, 0, (content * 4)[:48]))
        elif how == "status_ok":
            self.send(Status(tid, StatusCode.OK))
        elif how == "empty":
            self.send(Status(tid, StatusCode.EMPTY))
        elif how == "too_large":
            self.send(Status(tid, StatusCode.TOO_LARGE, limit + 1))
        elif how == "double_begin":
            self.send(DataBegin(tid, 8), DataBegin(tid, 8), DataChunk(tid, 0, MARKER), DataEnd(tid))
        elif how == "wrong_id":
            self.send(DataBegin(tid ^ 1, 8), DataChunk(tid ^ 1, 0, MARKER), DataEnd(tid ^ 1))
        return f"answer.copy_{how}"

    def _answer_paste(self, tid: int, *, begin: bool = False, end: bool = False) -> str:
        how = self.rng.choice(("consume", "consume", "confirm_early", "refuse", "cancel", "stall"))
        if how == "confirm_early" and begin:
            self.send(Status(tid, StatusCode.OK))
        elif how == "refuse":
            self.send(Status(tid, StatusCode.REFUSED))
        elif how == "cancel":
            self.send(Cancel(tid))
        elif how == "stall":
            self._stalling = True  # stop reading: the broker's paste must time out
        elif end:
            self.send(Status(tid, StatusCode.OK))
        return f"answer.paste_{how}"

    # index: the g2h producer index -------------------------------------------------
    def m_index__behind(self) -> None:
        self.publish((self.head() - 8 * self.rng.randint(1, 64)) & _U64)

    def m_index__ahead(self) -> None:
        self.publish(self.head() + self.cap + 8 * self.rng.randint(1, 64))

    def m_index__far(self) -> None:
        self.publish(self.rng.choice((1 << 40, 1 << 62, 1 << 63, (1 << 63) + 8, self.cap * 1000)))

    def m_index__wrap(self) -> None:
        self.publish((1 << 64) - 8 * self.rng.randint(1, 1 << 10))

    def m_index__negative(self) -> None:
        self.publish((1 << 63) | (self.rng.getrandbits(60) << 3))

    def m_index__misaligned(self) -> None:
        self.publish(self.head() + self.rng.randint(1, 7))

    def m_index__one_capacity(self) -> None:
        self.publish(self.head() + self.cap)  # in range; the ring holds stale or zero bytes

    def m_index__rewind(self) -> None:
        self.send(Cancel(self._id()))
        self._wait_for_broker()
        self.publish(self.tail - 8 * self.rng.randint(1, 4))

    # record: framing and decoding ----------------------------------------------------
    def m_record__len_zero(self) -> None:
        self.put(self.rng.choice([int(k) for k in Kind]), b"")

    def m_record__len_odd(self) -> None:
        odd = self.rng.choice((1, 7, 9, 13, 17))
        self.put(self.rng.choice([int(k) for k in Kind]), self.rng.randbytes(odd))

    def m_record__len_over_ring(self) -> None:
        self.put(int(Kind.DATA_CHUNK), bytes(16), length=self.cap + self.rng.choice((0, 8, 1 << 20)))

    def m_record__len_over_max(self) -> None:
        self.put(int(Kind.DATA_CHUNK), bytes(16), length=self.max_record + self.rng.choice((1, 8, 4096)))

    def m_record__len_over_published(self) -> None:
        self.put(int(Kind.DATA_CHUNK), bytes(24), length=self.rng.choice((32, 4096, self.max_record)))

    def m_record__len_huge(self) -> None:
        self.put(int(Kind.DATA_CHUNK), bytes(16), length=self.rng.choice((0xFFFFFFFF, 0x80000000)))

    def m_record__straddle(self) -> None:
        """Fill (honestly: unsolicited chunks) to near the end of the ring, then a
        record running past it."""
        gap = self.rng.choice((16, 24, 32, 40))
        while (to_end := self.cap - self.tail % self.cap) > gap + 32:
            span = min(to_end - gap, self.max_record + 8)
            if self.put(int(Kind.DATA_CHUNK), struct.pack("<QQ", self._id(), 0) + bytes(span - 24)) is None:
                break
        at = self.tail % self.cap
        room = self.cap - at
        body = self.rng.randbytes(room + 8 * self.rng.randint(1, 8))
        self.mem.write(self.data + at, _HDR.pack(len(body), int(Kind.DATA_CHUNK)))
        self.mem.write(self.data + at + 8, body[: max(0, room - 8)])
        self.tail += record_span(len(body))
        self.publish()

    def m_record__bad_pad(self) -> None:
        pos = self.tail % self.cap
        self.put(PAD_KIND, b"", length=self.rng.choice((0, 8, self.cap - pos)))

    def m_record__pad_unpublished(self) -> None:
        pos = self.tail % self.cap
        to_end = self.cap - pos
        self.mem.write(self.data + pos, _HDR.pack(to_end - 8, PAD_KIND))
        self.tail += 8
        self.publish()  # the padding claims to the end; only its header is published

    def m_record__kind_unknown(self) -> None:
        kind = self.rng.choice((7, 8, 255, 0x80000000, 0xFFFFFFFF, self.rng.randint(7, 0xFFFFFFFF)))
        self.put(kind, self.rng.randbytes(self.rng.choice((0, 8, 16, 64))))

    def m_record__copy_request(self) -> None:
        self.send(CopyRequest(self._id(), 1 << 20))

    def m_record__status_reserved(self) -> None:
        self.put(int(Kind.STATUS), struct.pack("<QIIQ", self._id(), 0, 1, 0))

    def m_record__status_code(self) -> None:
        self.put(int(Kind.STATUS), struct.pack("<QIIQ", self._id(), self.rng.randint(5, 0xFFFFFFFF), 0, 0))

    def m_record__size_over_any_limit(self) -> None:
        total = (1 << 40) + self.rng.randrange(1 << 20)
        self.put(int(Kind.DATA_BEGIN), struct.pack("<QQ", self._id(), total))

    def m_record__garbage(self) -> None:
        self.put(self.rng.randint(1, 6), self.rng.randbytes(self.rng.randint(0, 256)))

    # proto: well-formed, unsolicited ----------------------------------------------------
    def m_proto__forged_stream(self) -> None:
        tid = self._id()
        content = forged_content(self.rng, self.rng.randint(8, 4096))
        self.send(DataBegin(tid, len(content)), DataChunk(tid, 0, content), DataEnd(tid))

    def m_proto__chunk_without_request(self) -> None:
        self.send(DataChunk(self._id(), self.rng.choice((0, 8, 1 << 30)), forged_content(self.rng, 512)))

    def m_proto__end_first(self) -> None:
        self.send(DataEnd(self._id()))

    def m_proto__status(self) -> None:
        self.send(Status(self._id(), self.rng.choice(list(StatusCode)), self.rng.getrandbits(64)))

    def m_proto__cancel(self) -> None:
        self.send(Cancel(self._id()))

    def m_proto__begin_zero(self) -> None:
        self.send(DataBegin(self._id(), 0))

    # header: fields only the broker writes -------------------------------------------
    def _header(self, offset: int, size: int) -> None:
        value = self.rng.choice((bytes(size), b"\xff" * size, self.rng.randbytes(size)))
        self._scribble(offset, value)

    def m_header__magic(self) -> None:
        self._header(layout.MAGIC_OFF, 8)

    def m_header__version(self) -> None:
        self._header(layout.LAYOUT_VERSION_OFF, 4)

    def m_header__sizes(self) -> None:
        self._header(self.rng.choice((layout.HEADER_SIZE_OFF, layout.REGION_SIZE_OFF)), 4)

    def m_header__offsets(self) -> None:
        self._header(self.rng.choice((layout.G2H_OFFSET_OFF, layout.G2H_CAPACITY_OFF,
                                      layout.H2G_OFFSET_OFF, layout.H2G_CAPACITY_OFF)), 8)

    def m_header__max_record(self) -> None:
        self._header(layout.MAX_RECORD_OFF, 4)

    def m_header__session_id(self) -> None:
        self._header(layout.SESSION_ID_OFF, layout.SESSION_ID_SIZE)

    def m_header__capabilities(self) -> None:
        self.mem.store_u32(layout.CAPABILITIES_OFF, self.rng.choice((0xFFFFFFFF, 1, 2, 3)))

    def m_header__broker_heartbeat(self) -> None:
        self.mem.store_u64(layout.BROKER_HEARTBEAT_OFF, self.rng.getrandbits(64))

    def m_header__broker_indices(self) -> None:
        self._header(self.rng.choice((layout.G2H_HEAD_OFF, layout.H2G_TAIL_OFF)), 8)

    # guest: our own status fields ---------------------------------------------------
    def m_guest__session(self) -> None:
        self._scribble(layout.GUEST_SESSION_OFF, self.rng.randbytes(layout.SESSION_ID_SIZE))

    def m_guest__epoch(self) -> None:
        self.mem.store_u64(layout.GUEST_EPOCH_OFF, self.rng.choice((0, self.rng.getrandbits(64))))
        if self.rng.random() < 0.5:
            self.mem.store_u64(layout.GUEST_EPOCH_OFF, self.rng.getrandbits(64) | 1)

    def m_guest__heartbeat(self) -> None:
        self.mem.store_u64(layout.GUEST_HEARTBEAT_OFF, self.rng.getrandbits(64))

    def m_guest__version(self) -> None:
        self.mem.store_u32(layout.GUEST_VERSION_OFF, self.rng.getrandbits(32))

    def m_guest__h2g_head(self) -> None:
        self._scribble(layout.H2G_HEAD_OFF, struct.pack("<Q", self.rng.choice(
            (_U64, 1 << 63, 3, self.rng.getrandbits(64)))))

    # race: flip a field between a valid and an invalid value ---------------------------
    def m_race__tail(self) -> None:
        self.send(Cancel(self._id()))
        good = struct.pack("<Q", self.tail)
        self._flip(layout.G2H_TAIL_OFF, (good, struct.pack("<Q", self.rng.choice((1 << 63, self.tail + 3)))))
        self.publish()

    def _flip_record(self, message: Message, field_at: int, bad: bytes) -> None:
        """Publish a valid record, then flip bytes of it (`field_at` from its header)."""
        kind, parts = encode(message)
        payload = b"".join(bytes(p) for p in parts)
        pos = self.put(int(kind), payload)
        if pos is None:
            return
        offset = self.data + pos + field_at
        good = self.mem.read(offset, len(bad))
        self._flip(offset, (good, bad))

    def m_race__length(self) -> None:
        self._flip_record(Cancel(self._id()), 0, struct.pack("<I", self.rng.choice(
            (16, 4096, self.max_record + 8, 0xFFFFFFF8))))

    def m_race__kind(self) -> None:
        self._flip_record(DataEnd(self._id()), 4, struct.pack("<I", self.rng.choice((1, 3, 99, 0))))

    def m_race__transfer_id(self) -> None:
        content = forged_content(self.rng, 64)
        self._flip_record(DataChunk(self._id(), 0, content), 8, struct.pack("<Q", self._id()))

    def m_race__total(self) -> None:
        self._flip_record(DataBegin(self._id(), 8), 16, struct.pack("<Q", (1 << 40) + 8))

    def m_race__magic(self) -> None:
        self._flip(layout.MAGIC_OFF, (layout.MAGIC, bytes(8)))

    def m_race__guest_session(self) -> None:
        self._flip(layout.GUEST_SESSION_OFF, (self.session, secrets.token_bytes(16)))
        self.mem.write(layout.GUEST_SESSION_OFF, self.session)


FAULTING = ("index.", "record.")
"""Mutation families that always make the broker mark the VM faulty."""


def families(counts: Counter[str]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for label, n in counts.items():
        out[label.split(".")[0]] += n
    return dict(out)


def run(region_path: Path, seed: int, duration_s: float, *, mode: str = "chaos",
        max_iterations: int = 10_000_000) -> dict[str, object]:
    """Attack through `region_path` for `duration_s` (or `max_iterations`); returns the report.

    Raises:
        RegionError: the region cannot be mapped.
    """
    rng = random.Random(seed)
    region = Region.attach(region_path)
    started = time.monotonic()
    deadline = started + duration_s
    adversary = Adversary(region.mem, rng, concurrent=True)
    errors: Counter[str] = Counter()
    try:
        while time.monotonic() < deadline and adversary.iterations < max_iterations:
            try:
                if mode == "flood":
                    if not adversary.flood_step():
                        time.sleep(0)  # the ring is full: let the broker run
                elif adversary.step() is None:
                    time.sleep(0.002)  # between sessions
            except (ShmError, ValueError, IndexError) as exc:
                # Our own view can be inconsistent while the broker re-initialises
                # under us (we are the attacker; we do not validate carefully).
                errors[type(exc).__name__] += 1
    finally:
        region.close()
    return {
        "seed": seed,
        "mode": mode,
        "seconds": round(time.monotonic() - started, 2),
        "iterations": adversary.iterations,
        "mutations": sum(n for label, n in adversary.counts.items() if label != "attach"),
        "sessions": adversary.counts["attach"],
        "families": families(adversary.counts),
        "labels": dict(sorted(adversary.counts.items())),
        "own_errors": dict(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--region", type=Path, required=True, help="the region file to attack")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--mode", choices=("chaos", "flood"), default="chaos")
    parser.add_argument("--report", type=Path, help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        report = run(args.region, args.seed, args.duration, mode=args.mode)
    except ShmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
