"""The broker's link to one VM: its region, its ring ends and its channel.

Everything read from the region is guest-written and hostile: each field is
read once per look, into private memory, and validated before use.  Any
invalid ring index, record or protocol step marks the VM faulty: one log line
with the reason, the transfer in flight fails, and the region is
re-initialised under a new session (at most once per `REINIT_INTERVAL_S`), so
its driver can re-attach.

The backing file is checked too: its size with one fstat before every round
(a file truncated from outside would make the next access raise SIGBUS; the
guarded mapping turns that into BackingLostError for the window between the
check and the access), and whether its name still leads to it at every look.
A resized file is a fault: the size is restored and the region re-initialised.
A removed or replaced name is reported (log and status) but does not stop
service: our mapping, and a running VM's, still reach the same memory.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
from dataclasses import dataclass

from protocol.channel import Dropped, FailReason, HostChannel, HostEvent
from protocol.errors import RemoteProtocolError
from protocol.messages import CHUNK_HEADER_SIZE, Message
from protocol.pump import drain, flush
from shm import layout
from shm.errors import BackingLostError, RegionError, RingCorruptError
from shm.region import Region, initialise, wipe
from shm.ring import RingConsumer, RingProducer

log = logging.getLogger(__name__)

ATTACH_LOOK_S = 0.1
"""How often the guest's status fields are read while nothing is in flight."""
STALE_AFTER_S = 2.0
"""A driver whose heartbeat has not moved for this long counts as gone."""
REINIT_INTERVAL_S = 1.0
"""How long a faulty VM waits for its region to be re-initialised, after a first fault."""
MAX_REINIT_INTERVAL_S = 60.0
FAULT_MEMORY_S = 60.0
"""A fault within this long of the re-initialisation that followed the previous one doubles
the wait before the next re-initialisation, up to MAX_REINIT_INTERVAL_S: a guest that keeps
breaking the protocol costs a log line and a re-initialisation a minute, not one a second."""
DROP_LOG_INTERVAL_S = 5.0
"""At most one log line per VM per this period about unsolicited records, however
many a guest floods in (each is still counted), and about its driver attaching,
restarting or stopping."""
MAX_RECORDS_PER_SERVICE = 256
"""Fairness bound: records taken from one VM before serving the next."""
MAX_BYTES_PER_SERVICE = 512 * 1024
"""Fairness bound: payload bytes taken from one VM before serving the next (a
flooding guest's junk costs the broker at most this much copying per round)."""
CHUNK_SIZE = 256 * 1024


class Attachment(enum.Enum):
    NEVER = "never attached"
    STOPPED = "stopped"  # its driver detached cleanly
    ATTACHED = "attached"
    STALE = "not responding"
    FAULTY = "faulty"


@dataclass(slots=True)
class VmCounters:
    dropped: int = 0
    faults: int = 0
    attaches: int = 0


class VmLink:
    """One VM as the broker sees it.  Drive it with :meth:`service`."""

    def __init__(self, name: str, region: Region, *, timeout_s: float) -> None:
        self.name = name
        self.region = region
        self.timeout_s = timeout_s
        self.counters = VmCounters()
        self.last_fault = ""
        self.session_id = b""
        self._epoch = 0
        self._heartbeat = 0
        self._heartbeat_seen_at: float | None = None
        self._next_look = 0.0
        self._faulty_until = 0.0
        self._is_faulty = False
        self._my_heartbeat = 0
        self._caps_mirrored = -1
        self._drops_unlogged = 0
        self._next_drop_log = 0.0
        self._changes_unlogged = 0
        self._next_change_log = 0.0
        self._stopped = False
        self._reinit_interval = REINIT_INTERVAL_S
        self._recovered_at: float | None = None
        self.region_problem = ""
        self._reinitialise()

    # Setup -----------------------------------------------------------------
    def _reinitialise(self) -> None:
        self.session_id = secrets.token_bytes(layout.SESSION_ID_SIZE)
        geometry = initialise(self.region.mem, self.session_id)
        self.max_record = geometry.max_record
        self.consumer = RingConsumer(self.region.mem, geometry.guest_to_host, geometry.max_record)
        self.producer = RingProducer(self.region.mem, geometry.host_to_guest, geometry.max_record)
        chunk = min(CHUNK_SIZE, geometry.max_record - CHUNK_HEADER_SIZE)
        self.channel = HostChannel(chunk_size=chunk, timeout_s=self.timeout_s)
        self._epoch = 0
        self._stopped = False
        self._heartbeat_seen_at = None
        self._caps_mirrored = -1

    # Status ----------------------------------------------------------------
    def attachment(self, now: float) -> Attachment:
        if self._is_faulty:
            return Attachment.FAULTY
        if self._stopped:
            return Attachment.STOPPED
        if self._heartbeat_seen_at is None:
            return Attachment.NEVER
        if now - self._heartbeat_seen_at > STALE_AFTER_S:
            return Attachment.STALE
        return Attachment.ATTACHED

    def heartbeat_age(self, now: float) -> float | None:
        return None if self._heartbeat_seen_at is None else now - self._heartbeat_seen_at

    @property
    def busy(self) -> bool:
        return self.channel.capabilities != 0

    # The poll --------------------------------------------------------------
    def service(self, now: float) -> tuple[bool, list[HostEvent]]:
        """Look at the guest once: attach state, incoming records, outgoing records.

        Returns (whether anything moved, not counting records that were only
        dropped; events for the broker).  Never raises for anything the guest wrote.
        """
        if self._is_faulty and (now < self._faulty_until or not self._recover(now)):
            return False, []
        problem = self.region.size_problem()
        if problem:
            return True, self.count_dropped(self.fault(problem, now), now)
        events: list[HostEvent] = []
        try:
            if now >= self._next_look or self.busy:
                events += self._look_at_guest(now)
                self._next_look = now + ATTACH_LOOK_S
                self._check_path()

            def deliver(message: Message) -> None:
                events.extend(self.channel.receive(message, now))

            # The gate is the channel's flow: a file source's records wait for the relay (broker.files).
            taken = drain(self.consumer, deliver, max_records=MAX_RECORDS_PER_SERVICE,
                          max_bytes=MAX_BYTES_PER_SERVICE, gate=self.channel.wants_input)
            # Records we only drop are no progress: a guest flooding unsolicited records
            # must not keep the broker spinning (it backs off, and the others get the CPU).
            moved = taken - sum(isinstance(event, Dropped) for event in events)
            moved += flush(
                self.producer,
                self.channel,
                lambda: self.channel.output_done(now),
                max_records=MAX_RECORDS_PER_SERVICE,
            )
            events += self.channel.tick(now)
            self._mirror_capabilities()
        except (RingCorruptError, RemoteProtocolError, BackingLostError) as exc:
            events += self.fault(str(exc), now)
            return True, self.count_dropped(events, now)
        return moved > 0, self.count_dropped(events, now)

    def _recover(self, now: float) -> bool:
        """Re-initialise the region after a fault (restoring its size first if needed)."""
        self._is_faulty = False
        previous = self.channel
        try:
            problem = self.region.size_problem()
            if problem:
                self.region.restore_size()
                log.warning("%s: %s; restored its size", self.name, problem)
            self._reinitialise()
            self.channel.inherit_offer_limits(previous, now)  # what limits its offers carries over
        except RegionError as exc:  # BackingLostError included: truncated again meanwhile
            log.warning("%s: cannot re-initialise the region yet: %s", self.name, exc)
            self.last_fault = str(exc)
            self._is_faulty = True
            self._faulty_until = now + self._reinit_interval
            return False
        log.info("%s: region re-initialised after a fault; waiting for its driver", self.name)
        self._recovered_at = now
        return True

    def _check_path(self) -> None:
        problem = self.region.path_problem() or ""
        if problem != self.region_problem:
            if problem:
                log.warning("%s: %s (restart the broker to recreate it)", self.name, problem)
            else:
                log.info("%s: %s leads to our region again", self.name, self.region.path)
            self.region_problem = problem

    def count_dropped(self, events: list[HostEvent], now: float) -> list[HostEvent]:
        """Count the Dropped events (one log line per DROP_LOG_INTERVAL_S at most); return the others."""
        kept: list[HostEvent] = []
        for event in events:
            if isinstance(event, Dropped):
                self.counters.dropped += 1
                self._drops_unlogged += 1
                if now >= self._next_drop_log:
                    log.info("%s: dropped %d unsolicited record(s) (last: %s; %d in all)", self.name,
                             self._drops_unlogged, type(event.message).__name__, self.counters.dropped)
                    self._drops_unlogged = 0
                    self._next_drop_log = now + DROP_LOG_INTERVAL_S
            else:
                kept.append(event)
        return kept

    def _look_at_guest(self, now: float) -> list[HostEvent]:
        mem = self.region.mem
        session = mem.read(layout.GUEST_SESSION_OFF, layout.SESSION_ID_SIZE)
        epoch = mem.load_u64(layout.GUEST_EPOCH_OFF)
        heartbeat = mem.load_u64(layout.GUEST_HEARTBEAT_OFF)
        if session != self.session_id:
            return []  # no driver attached to this session (yet)
        events: list[HostEvent] = []
        if epoch == 0:  # a driver that stops says goodbye by clearing its epoch
            if self._epoch:
                self._driver_change(now, "stopped")
                events += self.channel.detach(now)
                self._epoch = 0
                self._stopped = True
            return events
        if epoch != self._epoch:
            if self._epoch:
                self._driver_change(now, "restarted")
                events += self.channel.detach(now)
            else:
                self._driver_change(now, "attached")
            self._stopped = False
            self._epoch = epoch
            self.counters.attaches += 1
            self._heartbeat = heartbeat
            self._heartbeat_seen_at = now
        elif heartbeat != self._heartbeat:
            self._heartbeat = heartbeat
            self._heartbeat_seen_at = now
        return events

    def _driver_change(self, now: float, what: str) -> None:
        """Log that the driver attached, restarted or stopped: at most one line per
        DROP_LOG_INTERVAL_S however often a guest makes it happen (each is counted)."""
        self._changes_unlogged += 1
        if now >= self._next_change_log:
            more = self._changes_unlogged - 1
            log.info("%s: driver %s%s", self.name, what, f" ({more} more changes before)" if more else "")
            self._changes_unlogged = 0
            self._next_change_log = now + DROP_LOG_INTERVAL_S

    def beat(self) -> None:
        """Bump the broker's heartbeat in the region."""
        self._my_heartbeat += 1
        # On a truncated file, the next service() finds the size changed and marks the VM faulty.
        with contextlib.suppress(BackingLostError):
            self.region.mem.store_u64(layout.BROKER_HEARTBEAT_OFF, self._my_heartbeat)
        self._caps_mirrored = -1  # the guest may have scribbled over the mirror: rewrite it

    def _mirror_capabilities(self) -> None:
        caps = self.channel.capabilities
        if caps != self._caps_mirrored:
            self.region.mem.store_u32(layout.CAPABILITIES_OFF, caps)
            self._caps_mirrored = caps

    # Faults and teardown ---------------------------------------------------
    def fault(self, reason: str, now: float) -> list[HostEvent]:
        """Mark the VM faulty: fail what is in flight, re-initialise its region soon
        (later for each fault that follows another closely, see FAULT_MEMORY_S)."""
        if self._recovered_at is not None and now - self._recovered_at < FAULT_MEMORY_S:
            self._reinit_interval = min(2 * self._reinit_interval, MAX_REINIT_INTERVAL_S)
        else:
            self._reinit_interval = REINIT_INTERVAL_S
        later = f" (again: its region is re-initialised in {self._reinit_interval:g} s)" \
            if self._reinit_interval > REINIT_INTERVAL_S else ""
        log.warning("%s: marked faulty: %s%s", self.name, reason, later)
        self.counters.faults += 1
        self.last_fault = reason
        events = self.channel.abort(FailReason.CANCELLED)
        self._is_faulty = True
        self._faulty_until = now + self._reinit_interval
        return events

    def shutdown(self, *, unlink: bool) -> None:
        """Fail what is in flight, wipe the region (no content survives us), unmap."""
        self.channel.abort(FailReason.CANCELLED)
        try:
            wipe(self.region.mem)
        except BackingLostError as exc:  # truncated: what is left of it is zeroed, or gone
            log.warning("%s: could not wipe the whole region: %s", self.name, exc)
        if unlink:
            self.region.unlink()
        self.region.close()
