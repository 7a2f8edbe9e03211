"""The guest driver: attaches to the region, answers the broker, serves local clients.

One thread, one selector, like the broker.  The driver trusts the broker no
more than it must: ring indices and records are validated by the ring and
the protocol; any inconsistency detaches and re-attaches.  It re-attaches on
its own when the broker re-initialises the region (a new session id), e.g.
after a broker restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.framing import Frame
from control.server import Connection, ControlServer
from control.sockets import InstanceLock
from control.stop import StopSignal
from filexfer.receiver import default_incoming, sweep_partials
from guestdrv.clipboard import ClipboardBackend, choose_item
from guestdrv.device import pick_device
from guestdrv.errors import ClipboardError, ClipboardTooLarge
from guestdrv.files import FILE_SPINS, GuestFiles
from protocol import clipformat
from protocol.channel import CopyRequested, Dropped, GuestChannel, GuestEvent, PasteReceived
from protocol.clipformat import ClipItem, TextPolicy
from protocol.errors import ClipFormatError, RemoteProtocolError
from protocol.filestream import LENIENT, STRICT
from protocol.messages import CHUNK_HEADER_SIZE, Message, RefusedBecause, StatusCode
from protocol.pump import drain, drain_views, flush
from shm import layout
from shm.backoff import Backoff
from shm.errors import LayoutError, RegionError, RingCorruptError, ShmError
from shm.region import Identity, Region, read_identity, read_session_id
from shm.ring import RingConsumer, RingProducer

log = logging.getLogger(__name__)

DRIVER_VERSION = 1
RETRY_ATTACH_S = 0.5
SESSION_LOOK_S = 0.1
CHUNK_SIZE = 256 * 1024
MAX_RECORDS = 256
MAX_FILE_BYTES_PER_POLL = 16 << 20
"""File data written per poll: the heartbeat goes on even when the disk is slow
(16 MiB at 50 MB/s is a third of a second; the broker calls a driver gone after 2 s)."""


class _Attached:
    """What exists only while attached to one broker session."""

    def __init__(self, region: Region, identity: Identity, limit: int) -> None:
        self.region = region
        self.identity = identity
        geometry = identity.geometry
        mem = region.mem
        self.producer = RingProducer(
            mem, geometry.guest_to_host, geometry.max_record,
            start_index=mem.load_u64(layout.G2H_TAIL_OFF) & ~7,
        )
        self.consumer = RingConsumer(
            mem, geometry.host_to_guest, geometry.max_record,
            start_index=mem.load_u64(layout.H2G_TAIL_OFF) & ~7,  # skip anything left for an older driver
        )
        mem.store_u64(layout.H2G_HEAD_OFF, self.consumer.head)  # hand that space back
        chunk = min(CHUNK_SIZE, geometry.max_record - CHUNK_HEADER_SIZE)
        self.chunk_size = chunk
        # `limit` is on content; a paste also carries the container around it.
        self.channel = GuestChannel(chunk_size=chunk, limit=limit + clipformat.MAX_OVERHEAD)
        self.heartbeat = 1
        mem.store_u64(layout.GUEST_EPOCH_OFF, secrets.randbits(64) or 1)
        mem.store_u64(layout.GUEST_HEARTBEAT_OFF, self.heartbeat)
        mem.store_u32(layout.GUEST_VERSION_OFF, DRIVER_VERSION)
        mem.write(layout.GUEST_SESSION_OFF, identity.session_id)  # last: now the broker may talk


def matching_item(items: Sequence[ClipItem], mime: str) -> ClipItem | None:
    """The item of type `mime`: the exact type, else the first whose type without its
    parameters is the same (``text/plain`` finds ``text/plain;charset=utf-8``)."""
    exact = next((item for item in items if item.mime == mime), None)
    if exact is not None:
        return exact
    base = mime.split(";", 1)[0].strip().lower()
    return next((item for item in items if item.mime.split(";", 1)[0].strip().lower() == base), None)


class GuestDriver:
    def __init__(
        self,
        *,
        socket_path: Path,
        clipboard: ClipboardBackend,
        limit: int,
        device: Path | None = None,
        idle_wait_s: float = 0.02,
        text_policy: TextPolicy = TextPolicy.STRICT,
        wipe_after_s: float | None = None,
        incoming: Path | None = None,
        allow_unsafe_names: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.clipboard = clipboard
        self.limit = limit
        self.text_policy = text_policy
        self.wipe_after_s = wipe_after_s
        self._wipe_at: float | None = None
        self.pastes_refused = 0
        self.device = device
        self.idle_wait_s = idle_wait_s
        self.dropped = 0
        self.copies_answered = 0
        self.pastes_received = 0
        self._attached: _Attached | None = None
        self._device_in_use: Path | None = None
        self._waiting_reason = ""
        self._next_attach = 0.0
        self._next_session_look = 0.0
        self._next_beat = 0.0
        self._selector = selectors.DefaultSelector()
        self._server: ControlServer | None = None
        self._stop = StopSignal(self._selector)
        self._lock = InstanceLock(Path(str(socket_path) + ".lock"))
        self.files = GuestFiles(incoming=incoming or default_incoming(), selector=self._selector,
                                policy=LENIENT if allow_unsafe_names else STRICT)

    # Lifetime --------------------------------------------------------------
    def start(self) -> None:
        """Listen on the local socket.

        Raises:
            ControlError: another driver already serves this socket, or it cannot be bound.
        """
        self._lock.acquire(f"ivclip guest driver on {self.socket_path}")
        self._server = ControlServer(
            self.socket_path, self._selector, self._on_request, max_body=self.limit
        )
        sweep_partials(self.files.incoming)

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the loop cleanly."""
        self._stop.install()

    def stop(self) -> None:
        self._stop.stop()

    def close(self) -> None:
        self._detach("driver stopping", goodbye=True)
        self.clipboard.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._lock.release()

    def run(self) -> None:
        backoff = Backoff(max_sleep_s=self.idle_wait_s)
        spins = backoff.spins
        while not self._stop.stopping:
            now = time.monotonic()
            if self.poll_once(now):
                backoff.reset()
            # While files move, poll at least every millisecond (like the broker), and spin
            # less: see broker.files.FILE_SPINS.
            cap = 0.001 if self.files.active else None
            backoff.spins = FILE_SPINS if self.files.active else spins
            wait = backoff.next_wait(cap) if self._attached else min(RETRY_ATTACH_S, 0.1)
            for key, _ in self._selector.select(wait):
                key.data()

    # Attachment ------------------------------------------------------------
    def _try_attach(self, now: float) -> None:
        self._next_attach = now + RETRY_ATTACH_S
        path = self.device
        reason = ""
        if path is None:
            path, reason = pick_device()
        region = None
        try:
            if path is None:
                raise LayoutError(reason)
            region = Region.attach(path)
            if not region.claim():
                raise RegionError(f"another guest driver is attached to {path}; waiting for it to stop")
            identity = read_identity(region.mem)
            self._attached = _Attached(region, identity, self.limit)
        except (RegionError, LayoutError) as exc:
            if region is not None:
                region.close()
            if str(exc) != self._waiting_reason:
                log.info("waiting for the broker: %s", exc)
                self._waiting_reason = str(exc)
            return
        self._device_in_use = path
        self._waiting_reason = ""
        log.info("attached to %s (session %s)", path, identity.session_id.hex()[:8])

    def _detach(self, why: str, *, goodbye: bool = False) -> None:
        """Leave the region; `goodbye`: tell the broker (our epoch cleared), so it fails
        gestures for us at once instead of waiting for the heartbeat to go stale."""
        if self._attached is None:
            return
        log.info("detached: %s", why)
        self.files.detached(why)
        mem = self._attached.region.mem
        if goodbye:
            with contextlib.suppress(ShmError):  # a region gone meanwhile needs no goodbye
                if read_session_id(mem) == self._attached.identity.session_id:
                    mem.store_u64(layout.GUEST_EPOCH_OFF, 0)
        self._attached.region.close()
        self._attached = None

    # The poll --------------------------------------------------------------
    def poll_once(self, now: float) -> bool:
        if self._wipe_at is not None and now >= self._wipe_at:
            self._wipe_at = None
            if self.clipboard.withdraw():
                log.info("wiped the pasted content from the clipboard")
        if self._attached is None:
            if now >= self._next_attach:
                self._try_attach(now)
            return False
        att = self._attached
        mem = att.region.mem
        if now >= self._next_session_look:
            self._next_session_look = now + SESSION_LOOK_S
            magic = mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little")
            if magic != layout.MAGIC or read_session_id(mem) != att.identity.session_id:
                self._detach("the broker re-initialised or left the region")
                self._next_attach = now  # re-attach at once if a new session is there
                return False
        if now >= self._next_beat:
            att.heartbeat += 1
            mem.store_u64(layout.GUEST_HEARTBEAT_OFF, att.heartbeat)
            self._next_beat = now + layout.HEARTBEAT_PERIOD_S
        def deliver(message: Message) -> None:
            # Events are handled at once: a file chunk may be a view into the ring, valid
            # only until its record is consumed (pump.drain_views).
            for event in att.channel.receive(message):
                self._on_event(att, event)

        try:
            if att.channel.receiving_id:
                moved = drain_views(att.consumer, deliver, max_records=MAX_RECORDS,
                                    max_bytes=MAX_FILE_BYTES_PER_POLL)
            else:
                moved = drain(att.consumer, deliver, max_records=MAX_RECORDS)
            self.files.poll(now)
            moved += flush(att.producer, att.channel, att.channel.output_done, max_records=MAX_RECORDS)
        except (RingCorruptError, RemoteProtocolError) as exc:
            magic = mem.load_u64(layout.MAGIC_OFF).to_bytes(8, "little")
            if magic != layout.MAGIC or read_session_id(mem) != att.identity.session_id:
                # The broker wiped or re-initialised the region under us: not an inconsistency.
                self._detach("the broker re-initialised or left the region")
                self._next_attach = now
            else:
                log.warning("the broker's side of the region is inconsistent (%s); re-attaching", exc)
                self._detach(str(exc))
            return False
        return moved > 0

    def _on_event(self, att: _Attached, event: GuestEvent) -> None:
        if self.files.on_event(att.channel, event):
            return
        match event:
            case CopyRequested(transfer_id, limit):
                self._answer_copy(att, transfer_id, limit)
            case PasteReceived(transfer_id, data):
                code, because = self._install(data)
                att.channel.confirm_paste(transfer_id, code, because)
                data[:] = bytes(len(data))  # the backend holds its own copy now
            case Dropped(message):
                self.dropped += 1
                log.info("dropped an unexpected %s", type(message).__name__)

    def _answer_copy(self, att: _Attached, transfer_id: int, limit: int) -> None:
        self.copies_answered += 1
        try:
            items = self.clipboard.read(limit)
        except ClipboardTooLarge as exc:
            log.info("copy request: %s", exc)
            att.channel.answer_status(transfer_id, StatusCode.TOO_LARGE, exc.size)
            return
        except ClipboardError as exc:
            log.warning("copy request: cannot read the clipboard: %s", exc)
            att.channel.answer_status(transfer_id, StatusCode.REFUSED, RefusedBecause.CLIPBOARD_FAILED)
            return
        if not items:
            log.info("copy request: the clipboard is empty")
            att.channel.answer_copy(transfer_id, None)
            return
        data = clipformat.encode(items)
        if len(data) > limit:
            log.info("copy request: clipboard of %d bytes is over the limit %d", len(data), limit)
        else:
            log.info("copy request: answered with %d bytes (%s)", len(data),
                     ", ".join(item.mime for item in items))
        att.channel.answer_copy(transfer_id, data)

    def _install(self, data: bytearray) -> tuple[StatusCode, RefusedBecause]:
        """Validate a paste and install it as the clipboard; the status to answer with."""
        try:
            items = clipformat.parse(data)
        except ClipFormatError as exc:
            log.warning("paste refused: %s", exc)
            self.pastes_refused += 1
            return StatusCode.REFUSED, RefusedBecause.BAD_FORMAT
        # The hook for the broker's per-VM policy file: it sets `text_policy`; the check
        # itself stays here, in the receiving guest, and in the pure clipformat module.
        for item in items:
            why = clipformat.check_item(item, self.text_policy)
            if why is not None:
                log.warning("paste refused by the %s text policy: %s", self.text_policy.value, why)
                self.pastes_refused += 1
                return StatusCode.REFUSED, RefusedBecause.TEXT_POLICY
        try:
            self.clipboard.write(items)
        except ClipboardError as exc:
            log.warning("paste refused: cannot set the clipboard: %s", exc)
            self.pastes_refused += 1
            return StatusCode.REFUSED, RefusedBecause.CLIPBOARD_FAILED
        self.pastes_received += 1
        log.info("paste: installed %d bytes (%s) as the clipboard", len(data),
                 ", ".join(item.mime for item in items))
        if self.wipe_after_s is not None:
            self._wipe_at = time.monotonic() + self.wipe_after_s
        return StatusCode.OK, RefusedBecause.UNSPECIFIED

    # Local clients ----------------------------------------------------------
    def _on_request(self, conn: Connection, frame: Frame) -> None:
        op = frame.header.get("op")
        mime = frame.header.get("type")
        if mime is not None:
            try:
                clipformat.check_mime(str(mime))
            except ClipFormatError as exc:
                conn.reply({"ok": False, "message": str(exc)})
                return
        try:
            if op == "copy":
                self._wipe_at = None  # the user copied something new: not ours to wipe
                self.clipboard.write([ClipItem(str(mime or clipformat.TEXT_MIME), frame.body)])
                conn.reply({"ok": True, "message": f"clipboard set ({len(frame.body)} bytes)"})
            elif op == "paste":
                items = self.clipboard.read(self.limit)
                types = [i.mime for i in items]
                if not items:
                    chosen = None
                elif mime:
                    chosen = matching_item(items, str(mime))
                else:
                    chosen = choose_item(items)
                if chosen is None:
                    what = f"holds no {mime}" if mime and items else "is empty"
                    conn.reply({"ok": False, "message": f"the clipboard {what}", "types": types})
                else:
                    conn.reply({"ok": True, "message": f"{len(chosen.data)} bytes",
                                "type": chosen.mime, "types": types}, bytes(chosen.data))
            elif op == "send":
                att = self._attached
                self.files.request_send(conn, frame, att.channel if att else None,
                                        att.chunk_size if att else 0)
            elif op == "status":
                conn.reply(self.status())
            else:
                conn.reply({"ok": False, "message": f"unknown request {op!r}"})
        except ClipboardError as exc:
            conn.reply({"ok": False, "message": str(exc)})

    def status(self) -> dict[str, Any]:
        att = self._attached
        return {
            "ok": True,
            "message": "status",
            "attached": att is not None,
            "device": str(self._device_in_use) if att else None,
            "session": att.identity.session_id.hex()[:8] if att else None,
            "waiting_for": self._waiting_reason or None,
            "capabilities": att.region.mem.load_u32(layout.CAPABILITIES_OFF) if att else 0,
            "copies_answered": self.copies_answered,
            "pastes_received": self.pastes_received,
            "pastes_refused": self.pastes_refused,
            "clipboard": self.clipboard.name,
            "text_policy": self.text_policy.value,
            "dropped": self.dropped,
            "pid": os.getpid(),
            **self.files.status(),
        }
