"""An in-process broker with in-process honest drivers, driven one round at a time.

No threads and no sleeping: each :meth:`InProcessLab.pump` services the broker
once and every driver once, so a test can put a hostile write between any two
rounds and check the invariants after each.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from broker.names import shm_path
from broker.policy import ALLOW_ALL, Policy
from broker.service import Broker, BrokerConfig
from control.framing import Frame, FrameDecoder
from control.server import Connection
from guestdrv.clipboard import ClipItem, HeadlessClipboard
from guestdrv.driver import GuestDriver
from shm import layout
from shm.memory import Buffer, GuardedBuffer

BINARY_MIME = "application/octet-stream"  # random bytes are no text for a strict driver

FIGURES: dict[str, Any] = {}
"""Figures a test wants in the closing report; printed by conftest at the end of the run."""


class FakeConnection:
    """Stands for a control client: keeps the replies."""

    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []

    def reply(self, header: dict[str, Any], body: bytes | bytearray = b"") -> None:
        self.replies.append(header)


class RecordingBuffer(GuardedBuffer):
    """A guarded buffer that notes every read of guest-written memory."""

    __slots__ = ("reads",)

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        self.reads: list[tuple[int, int]] = []

    def load_u64(self, offset: int) -> int:
        self.reads.append((offset, 8))
        return super().load_u64(offset)

    def load_u32(self, offset: int) -> int:
        self.reads.append((offset, 4))
        return super().load_u32(offset)

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read(offset, length)

    def read_into(self, offset: int, dst: Buffer, dst_offset: int = 0, length: int | None = None) -> int:
        n = super().read_into(offset, dst, dst_offset, length)
        self.reads.append((offset, n))
        return n


# Guest-written fields whose every read is validated afresh on its own (the peer's
# ring index): reading them more than once per round is by design.
REREAD_OK = {layout.G2H_TAIL_OFF, layout.H2G_HEAD_OFF}


def double_fetches(reads: list[tuple[int, int]], size: int) -> list[str]:
    """Guest-written bytes read twice within one round (other than REREAD_OK indices)."""
    geometry = layout.expected_geometry(size)
    g2h = geometry.guest_to_host
    guest_areas = [(layout.GUEST_SESSION_OFF, 512), (g2h.data_offset, g2h.data_offset + g2h.capacity)]
    spans = sorted(
        (offset, offset + length) for offset, length in reads
        if offset not in REREAD_OK and length
        and any(lo <= offset < hi for lo, hi in guest_areas)
    )
    found = []
    for (a_lo, a_hi), (b_lo, b_hi) in itertools.pairwise(spans):
        if b_lo < a_hi:
            found.append(f"[{a_lo}, {a_hi}) and [{b_lo}, {b_hi})")
    return found


def socket_request(header: dict[str, object], body: bytes = b"") -> tuple[Connection, socket.socket]:
    """A control connection holding `header`, and the client's end of it."""
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(server_end, 1 << 20)
    conn.request = Frame(header, body)
    return conn, client_end


def final_reply(client_end: socket.socket) -> dict[str, object]:
    """The reply that ends a request (after any progress frames)."""
    decoder = FrameDecoder(1 << 20)
    client_end.settimeout(5)
    while True:
        frame = decoder.next_frame()
        if frame is not None and frame.header.get("progress") is not True:
            return frame.header
        if frame is None:
            data = client_end.recv(1 << 16)
            assert data, "the connection closed without a final reply"
            decoder.feed(data)


class InProcessLab:
    def __init__(self, tmp_path: Path, vms: list[str], honest: list[str], *, size: int = 1 << 20,
                 limit: int = 256 << 10, timeout_s: float = 1.0, policy: Policy = ALLOW_ALL,
                 ttl_s: float | None = None, incoming: bool = False) -> None:
        self.prefix = f"ivclip-t{os.getpid()}-{secrets.token_hex(3)}-"
        self.size = size
        config = BrokerConfig(
            vms=vms, socket_path=tmp_path / "broker.sock", region_size=size, shm_prefix=self.prefix,
            clipboard_limit=limit, timeout_s=timeout_s, unlink_on_exit=True,
            audit_path=tmp_path / "audit.log", policy=policy, clipboard_ttl_s=ttl_s,
            incoming=tmp_path / "in-host",
        )
        self.audit_path = tmp_path / "audit.log"
        self.broker = Broker(config)
        self.broker.start()
        self.drivers = {
            vm: GuestDriver(socket_path=tmp_path / f"{vm}.sock", clipboard=HeadlessClipboard(),
                            limit=limit, device=self.region_path(vm),
                            incoming=tmp_path / f"in-{vm}" if incoming else None)
            for vm in honest
        }
        self._recorders: list[tuple[str, GuardedBuffer]] = []
        self.after_pump: Callable[[], None] | None = None  # e.g. check invariants after every round

    def region_path(self, vm: str) -> Path:
        return shm_path(vm, self.prefix)

    def record_reads(self, vm: str) -> RecordingBuffer:
        """From now on, note every read the broker makes of `vm`'s region."""
        link = self.broker.vms[vm]
        original = link.region.mem
        assert isinstance(original, GuardedBuffer)
        recorder = RecordingBuffer(link.region._map)
        link.region.mem = recorder
        link._reinitialise()  # the ring ends now read through the recorder
        self._recorders.append((vm, original))
        return recorder

    def pump(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            now = time.monotonic()
            self.broker.poll_once(now)
            self.broker.expire_clipboard(now)
            for driver in self.drivers.values():
                driver.poll_once(now)
            if self.after_pump is not None:
                self.after_pump()

    def attach_all(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(not d._attached for d in self.drivers.values()) or any(
            self.broker.vms[vm].attachment(time.monotonic()).value != "attached" for vm in self.drivers
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the in-process drivers did not attach")
            self.pump()
            time.sleep(0.001)

    def gesture(self, op: str, vm: str, *, between: Any = None, timeout_s: float = 10.0) -> dict[str, Any]:
        """Make a gesture and pump until its reply; `between()` runs between rounds."""
        conn = FakeConnection()
        self.broker._on_request(cast(Connection, conn), Frame({"op": op, "vm": vm}))
        deadline = time.monotonic() + timeout_s
        while not conn.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {op} {vm}")
            if between is not None:
                between()
            self.pump()
        return conn.replies[0]

    def set_clipboard(self, vm: str, data: bytes, mime: str = BINARY_MIME) -> None:
        self.drivers[vm].clipboard.write([ClipItem(mime, data)])

    def clipboard_of(self, vm: str) -> bytes | None:
        items = self.drivers[vm].clipboard.read(1 << 30)
        return bytes(items[0].data) if items else None

    def close(self) -> None:
        for driver in self.drivers.values():
            driver.close()
        for vm, original in self._recorders:
            link = self.broker.vms.get(vm)
            if link is not None:
                link.region.mem.close()
                link.region.mem = original
        self.broker.close()
