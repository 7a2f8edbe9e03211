"""atheris fuzz target: the broker's whole per-VM service against a guest that writes anything.

Each input is a script of guest actions on one region (records with honest or
lying framing, raw indices, raw bytes anywhere the guest may write, well-formed
messages with the right transfer id, the broker's rounds and the passing of
time), run against a fresh :class:`broker.vm.VmLink` with a copy or a paste
gesture in flight.  A crash is any exception out of ``VmLink.service`` (it
must absorb everything a guest writes), a copy buffer over its limit, or a
completed copy over the limit.

Short run (CI runs this for ~20 s through tests/hostile/test_fuzz.py)::

    python tests/fuzz/fuzz_vmlink.py -max_total_time=20

Long run, keeping a corpus and the crashes found::

    mkdir -p /tmp/ivclip-corpus && python tests/fuzz/fuzz_vmlink.py /tmp/ivclip-corpus \\
        -max_total_time=3600 -artifact_prefix=/tmp/ivclip-crash- -print_final_stats=1
"""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout, not an installed copy

import atheris

with atheris.instrument_imports():
    from broker.vm import VmLink
    from protocol.channel import CopyCompleted, HostState
    from shm import layout
    from shm.memory import GuardedBuffer
    from shm.ring import record_span

SIZE = 1 << 20
GEOMETRY = layout.expected_geometry(SIZE)
G2H = GEOMETRY.guest_to_host
U64 = (1 << 64) - 1


class BufferRegion:
    """Stands for shm.region.Region: the same guarded accesses, on a bytearray."""

    def __init__(self) -> None:
        self.size = SIZE
        self.path = Path("<fuzz>")
        self.owner = True
        self.mem = GuardedBuffer(bytearray(SIZE))

    def size_problem(self) -> None:
        return None

    def path_problem(self) -> None:
        return None

    def restore_size(self) -> None:
        pass

    def close(self) -> None:
        pass

    def unlink(self) -> None:
        pass


REGION = BufferRegion()
GUEST_AREAS = (
    (layout.GUEST_SESSION_OFF, 512),
    (layout.G2H_TAIL_OFF, layout.G2H_TAIL_OFF + 8),
    (layout.H2G_HEAD_OFF, layout.H2G_HEAD_OFF + 8),
    (G2H.data_offset, G2H.data_offset + G2H.capacity),
)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    link = VmLink("fuzz", REGION, timeout_s=1.0)  # type: ignore[arg-type]
    mem = REGION.mem
    now = 1.0
    # Attach as a guest would, so that the broker talks to us.
    mem.write(layout.GUEST_SESSION_OFF, link.session_id)
    mem.store_u64(layout.GUEST_EPOCH_OFF, 7)
    mem.store_u64(layout.GUEST_HEARTBEAT_OFF, 1)
    limit = fdp.ConsumeIntInRange(0, 1 << 18)
    if fdp.ConsumeBool():
        link.channel.start_copy(0x1234, limit, now)
    else:
        limit = 0
        link.channel.start_paste(0x1234, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)), now)
    tail = 0
    for _ in range(fdp.ConsumeIntInRange(1, 48)):
        op = fdp.ConsumeIntInRange(0, 6)
        if op == 0:  # a record, framed honestly or with a lying length
            kind = fdp.PickValueInList([0, 1, 2, 3, 4, 5, 6, 7, 0xFFFFFFFF])
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
            length = len(payload) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            pos = tail % G2H.capacity
            if pos + 8 + len(payload) <= G2H.capacity:
                mem.write(G2H.data_offset + pos, struct.pack("<II", length, kind) + payload)
            tail = (tail + record_span(len(payload))) & U64
            mem.store_u64(layout.G2H_TAIL_OFF, tail)
        elif op == 1:  # a message with the transfer id of the gesture in flight
            tid = link.channel.transfer_id if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, U64)
            kind = fdp.ConsumeIntInRange(2, 6)
            head = struct.pack("<Q", tid)
            body = {2: struct.pack("<Q", fdp.ConsumeIntInRange(0, 1 << 20)),
                    3: struct.pack("<Q", fdp.ConsumeIntInRange(0, 1 << 20)) + fdp.ConsumeBytes(200),
                    4: b"",
                    5: struct.pack("<IIQ", fdp.ConsumeIntInRange(0, 5), 0, 0),
                    6: b""}[kind]
            payload = head + body
            pos = tail % G2H.capacity
            if pos + 8 + len(payload) <= G2H.capacity:
                mem.write(G2H.data_offset + pos, struct.pack("<II", len(payload), kind) + payload)
                tail = (tail + record_span(len(payload))) & U64
                mem.store_u64(layout.G2H_TAIL_OFF, tail)
        elif op == 2:  # the producer index, raw
            tail = fdp.ConsumeIntInRange(0, U64)
            mem.store_u64(layout.G2H_TAIL_OFF, tail)
        elif op == 3:  # raw bytes anywhere the guest may write
            lo, hi = GUEST_AREAS[fdp.ConsumeIntInRange(0, len(GUEST_AREAS) - 1)]
            at = fdp.ConsumeIntInRange(lo, hi - 1)
            mem.write(at, fdp.ConsumeBytes(min(hi - at, 64)))
        elif op == 4:  # the h2g consumer index (read by the broker while it pastes)
            mem.store_u64(layout.H2G_HEAD_OFF, fdp.ConsumeIntInRange(0, U64))
        else:  # the broker's round, some time later
            now += fdp.PickValueInList([0.0, 0.001, 0.2, 1.5])
            check(link, link.service(now), limit)
    check(link, link.service(now + 0.001), limit)


def check(link: Any, result: tuple[bool, list[Any]], limit: int) -> None:
    _, events = result
    inbox = link.channel._inbox
    if inbox is not None and len(inbox.buffer) > limit:
        raise AssertionError(f"copy buffer of {len(inbox.buffer)} bytes over the limit {limit}")
    for event in events:
        if isinstance(event, CopyCompleted) and len(event.data) > limit:
            raise AssertionError("a copy completed over its limit")
    if link.channel.state is not HostState.IDLE and link.attachment(0).value == "faulty":
        raise AssertionError("a faulty VM kept its transfer in flight")


def main() -> None:
    logging.disable(logging.CRITICAL)  # a fault per input would otherwise be a log line per input
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
