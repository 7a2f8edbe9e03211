"""File transfers in the broker: offers, the approve / reject / send gestures, and the relay.

Authority, as for the clipboard: a guest may *announce* files (its channel
records one pending offer, shown by ``status``); nothing of them moves until
the host user approves that offer for one target (``approve alice --to bob``
or ``--to host``).  Then, and only then, the source's channel is put in
FILE_SOURCE under a fresh random transfer id and the target's in FILE_TARGET
under another, and :class:`Transfer` relays the stream between them.  Host to
guest, ``send bob PATH...`` is its own gesture.  Every decision passes through
one hook, :data:`FilePolicy` (see :func:`allow_all`).

The relay holds no file in memory.  While a VM is a source its channel does
not let the VM's normal service drain its ring (protocol.channel flow); the
relay peeks one record at a time, and takes it only when the target has room
for it: twice its span free in the target's ring, so that the push cannot fail
wherever the ring wraps.  Each record is checked against the approved stream
(order, sizes, counts: protocol.filestream) on the way, and chunk data is
copied once, from the source's ring straight into the target's ring (or into
the host file).  A source that breaks the stream is marked faulty like any
other protocol breach.  The relay never reads a source's record through its
view: fields come from one guarded copy, and the chunk data's one copy is
guarded on both mappings, so a region file truncated from outside during a
transfer fails the transfer and marks its VM faulty instead of killing the
broker with SIGBUS.

A transfer ends once, in :meth:`FileTransfers._end`: the receiver's verdict
goes back to a source VM, a target is told to cancel when the source failed,
the host's sources are deleted after a confirmed ``--move``, and the waiting
commands get one line each.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.names import HOST
from broker.vm import CHUNK_SIZE, Attachment, VmLink
from control.framing import Frame
from control.progress import HeldRequest, files_phrase, human_size
from control.server import Connection
from filexfer.errors import SourceError
from filexfer.receiver import TreeReceiver, open_receiver
from filexfer.sender import TreeSender, delete_sent, parse_send_request
from protocol.channel import (
    FailReason,
    FileOffered,
    FileOutcome,
    HostEvent,
    HostState,
    OfferWithdrawn,
)
from protocol.errors import RemoteProtocolError
from protocol.filestream import NamePolicy, display
from protocol.messages import (
    CHUNK_HEADER_SIZE,
    FILE_ENTRY_HEADER_SIZE,
    FLAG_MOVE,
    MAX_PATH,
    STREAM_KINDS,
    FileBegin,
    FileChunk,
    FileCode,
    FileOffer,
    FileResult,
    Kind,
    Message,
    StreamEnd,
    StreamMessage,
    decode,
    encode_stream,
)
from shm.errors import BackingLostError, RingCorruptError
from shm.memory import SharedBuffer
from shm.ring import record_span

log = logging.getLogger(__name__)

FILE_OPS = frozenset({"approve", "reject", "send"})
MAX_RELAY_RECORDS = 512
MAX_RELAY_BYTES = 16 << 20
"""Records and bytes one transfer moves per broker round before the other VMs are served
(bytes bound the round when the host writes them to a slow disk)."""
MAX_SKIPPED_RECORDS = 64
"""Records that are not part of the stream (dropped, or handled like any other event) the
relay takes from a source's ring in one round, beyond which the round ends: a source filling
its ring with junk costs a bounded amount of work per round like any guest."""
SWAP_WINDOW_S = 60.0
"""An offer made within this long after the same VM withdrew one is approved only by its
number (``--offer N``): the VM may have swapped the offer the user checked for another."""
LOGGED_NAMES = 5
STATUS_NAMES = 16
SHOWN_NAME_CHARS = 120
SHOWN_DETAIL_CHARS = 400
"""How many offered names a log line and a status reply show, each at most SHOWN_NAME_CHARS
characters (escaped), and how much of a transfer's failure detail an outcome shows: a
guest's names and details do not make log lines, audit records or replies huge."""
MAX_SEND_PATHS_BODY = 1 << 20
"""Bytes of paths a host send request may carry (NUL-separated)."""
FILE_SPINS = 8
"""Polling spins (shm.backoff) while files move, instead of the usual 64.  Then a full or
empty ring means waiting for a peer to process a chunk (about 0.3 ms): spinning through
it only takes CPU from that peer, which on a small host may run on the same cores.
Measured with 512 MiB guest to guest on 2 cores: broker CPU 0.57 s -> 0.21 s, 370 -> 470 MiB/s."""


@dataclass(frozen=True, slots=True)
class FileRequest:
    """What a policy decides on: who sends how much to whom."""

    source: str
    target: str
    entries: int
    files: int
    total_size: int
    move: bool


FilePolicy = Callable[[FileRequest], str | None]
"""Returns None to allow, or the reason for refusing.  A policy module (broker/policy.py)
plugs in here through Broker; until then the user's gesture is the only authority."""


def allow_all(request: FileRequest) -> str | None:
    return None


FileEnded = Callable[[FileRequest, str, str], None]
"""Told when an offer or transfer ends: what it was, the outcome ("ok", "failed", or
"rejected" by the host user) and the message (for the audit log, which records how
transfers end as well as the policy's decisions)."""


def describe(entries: int, files: int, size: int) -> str:
    return f"{files_phrase(files, entries)} ({human_size(size)})"


def outcome_text(result: FileResult, who: str) -> str:
    """One line for a failed FileResult; everything the peer wrote is escaped."""
    code = FileCode(result.code)
    text = f"{who}: {code.text}"
    if result.name:
        text += f": '{_shorten(display(result.name))}'"
    if result.detail:
        text += f" ({_shorten(display(result.detail), SHOWN_DETAIL_CHARS)})"
    return text


@dataclass(slots=True)
class Transfer:
    number: int
    source: str
    target: str
    entries_total: int
    files_total: int
    bytes_total: int
    move: bool
    source_vm: VmLink | None = None
    target_vm: VmLink | None = None
    sender: TreeSender | None = None  # host to guest
    receiver: TreeReceiver | None = None  # guest to host
    held: list[HeldRequest] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: bool = False
    end_relayed: bool = False  # the target VM has the whole stream: it may have placed the files

    @property
    def progress(self) -> tuple[int, int]:
        """(entries, bytes) taken from the source so far."""
        if self.sender is not None:
            return self.sender.entries, self.sender.bytes
        checker = self.source_vm.channel.stream_checker if self.source_vm else None
        return (checker.entries, checker.bytes) if checker else (0, 0)


class FileTransfers:
    """Every offer and transfer of one broker.  Driven by the broker's loop."""

    def __init__(
        self,
        vms: dict[str, VmLink],
        selector: selectors.BaseSelector,
        *,
        incoming: Path,
        policy: NamePolicy,
        decide: FilePolicy = allow_all,
        on_end: FileEnded | None = None,
    ) -> None:
        self.vms = vms
        self.selector = selector
        self.incoming = incoming
        self.policy = policy
        self.decide = decide
        self.on_end = on_end
        self.transfers: list[Transfer] = []
        self._offer_numbers: dict[str, tuple[FileOffer, int]] = {}  # vm -> (offer, number)
        self._skipped = 0  # records not of the stream taken from a source in this round
        self._next_number = 1
        # Which VM the next ring or protocol error in the relay would be the fault of (set
        # before each step: cheaper on this path than a try block per step).
        self._culprit: VmLink | None = None

    # Requests --------------------------------------------------------------------------
    def on_request(self, conn: Connection, frame: Frame, now: float) -> None:
        """Handle an approve, reject or send request; replies now or when the transfer ends."""
        op = frame.header.get("op")
        vm_name = frame.header.get("vm")
        if not isinstance(vm_name, str) or vm_name not in self.vms:
            known = ", ".join(self.vms)
            conn.reply({"ok": False, "message": f"unknown VM {vm_name!r}; this broker serves {known}"})
            return
        vm = self.vms[vm_name]
        if op == "reject":
            self._reject(conn, vm)
        elif op == "approve":
            self._approve(conn, frame.header, vm, now)
        else:
            self._send(conn, frame, vm, now)

    def _offer_number(self, vm: VmLink) -> int:
        """The number the user knows the VM's pending offer by: a new one for every offer
        that arrives (the same offer id again, after a withdrawal, is another offer)."""
        offer = vm.channel.pending_offer
        if offer is None:
            return 0
        known = self._offer_numbers.get(vm.name)
        if known is None or known[0] is not offer:
            known = (offer, self._next_number)
            self._next_number += 1
            self._offer_numbers[vm.name] = known
        return known[1]

    def _reject(self, conn: Connection, vm: VmLink) -> None:
        number = self._offer_number(vm)
        offer = vm.channel.reject_offer()
        if offer is None:
            conn.reply({"ok": False, "message": f"{vm.name} has no pending file offer"})
            return
        log.info("%s: file offer #%d rejected", vm.name, number)
        message = (f"rejected {vm.name}'s offer #{number}: "
                   f"{describe(offer.entries, offer.files, offer.total_size)}")
        if self.on_end is not None:
            self.on_end(FileRequest(vm.name, "", offer.entries, offer.files, offer.total_size,
                                    bool(offer.flags & FLAG_MOVE)), "rejected", message)
        conn.reply({"ok": True, "message": message})

    def _endpoint_refusal(self, vm: VmLink, now: float) -> str | None:
        if vm.busy or any(vm in (t.source_vm, t.target_vm) for t in self.transfers):
            return f"{vm.name} is busy with another transfer; try again"
        state = vm.attachment(now)
        if state is Attachment.ATTACHED:
            return None
        if state is Attachment.FAULTY:
            return f"{vm.name} is faulty ({vm.last_fault}); waiting for its driver to re-attach"
        return f"{vm.name} did not answer: its driver is {state.value}"

    def _approve(self, conn: Connection, header: dict[str, Any], source: VmLink, now: float) -> None:
        target_name = header.get("to")
        number = self._offer_number(source)
        offer = source.channel.pending_offer
        wanted = header.get("offer")
        refusal = None
        if offer is None:
            refusal = f"{source.name} has no pending file offer"
        elif wanted is not None and wanted != number:
            refusal = f"{source.name}'s pending offer is #{number}, not #{wanted}; check status again"
        elif wanted is None and source.channel.offer_withdrawn_at is not None \
                and source.channel.offer_seen_at - source.channel.offer_withdrawn_at < SWAP_WINDOW_S:
            # It may have swapped the offer the user checked for another: make them name it.
            refusal = (f"{source.name} withdrew an offer and made this one (#{number}) soon after; check "
                       f"it with status and approve it by number: approve {source.name} --to "
                       f"{target_name} --offer {number}")
        elif not isinstance(target_name, str) or (target_name != HOST and target_name not in self.vms):
            refusal = f"unknown target {target_name!r}: name a VM of this broker or '{HOST}'"
        elif target_name == source.name:
            refusal = f"{source.name} cannot send files to itself"
        else:
            refusal = self._endpoint_refusal(source, now)
            if refusal is None and target_name != HOST:
                refusal = self._endpoint_refusal(self.vms[target_name], now)
        if refusal is None:
            assert offer is not None and isinstance(target_name, str)
            denial = self.decide(FileRequest(source.name, target_name, offer.entries, offer.files,
                                             offer.total_size, bool(offer.flags & FLAG_MOVE)))
            if denial:
                refusal = (f"{source.name}'s offer #{number} to {target_name} DENIED, nothing sent: "
                           f"{denial}; the offer stays pending (reject {source.name} to drop it)")
        if refusal:
            log.info("approve %s: refused: %s", source.name, refusal)
            conn.reply({"ok": False, "message": refusal})
            return
        assert offer is not None and isinstance(target_name, str)
        transfer = Transfer(number, source.name, target_name, offer.entries, offer.files, offer.total_size,
                            bool(offer.flags & FLAG_MOVE), source_vm=source)
        begin = FileBegin(_draw_id(), offer.entries, offer.files, offer.total_size, offer.flags, source.name)
        if target_name == HOST:
            # Opened first: a refusal here (no space...) leaves the offer pending for another try.
            receiver = open_receiver(self.incoming, begin, policy=self.policy)
            if isinstance(receiver, FileResult):
                message = outcome_text(receiver, "the host") + f"; {source.name}'s offer stays pending"
                log.info("approve %s: %s", source.name, message)
                conn.reply({"ok": False, "message": message})
                return
            transfer.receiver = receiver
        else:
            transfer.target_vm = self.vms[target_name]
            transfer.target_vm.channel.start_file_target(
                begin.transfer_id, entries=begin.entries, files=begin.files, total_size=begin.total_size,
                flags=begin.flags, source=source.name, now=now)
        source.channel.start_file_source(_draw_id(), now)
        self._hold(transfer, conn)
        self.transfers.append(transfer)
        log.info("%s: file offer #%d approved to %s: %s", source.name, number, target_name,
                 describe(offer.entries, offer.files, offer.total_size))

    def _send(self, conn: Connection, frame: Frame, target: VmLink, now: float) -> None:
        try:
            request = parse_send_request(frame.header, frame.body)
        except SourceError as exc:
            conn.reply({"ok": False, "message": str(exc)})
            return
        sources, move = request.sources, request.move
        entries, files, total = request.entries, request.files, request.total_size
        refusal = self._endpoint_refusal(target, now)
        if refusal is None:
            denial = self.decide(FileRequest(HOST, target.name, entries, files, total, move))
            if denial:
                refusal = f"send to {target.name} DENIED, nothing sent: {denial}"
        if refusal:
            log.info("send to %s: refused: %s", target.name, refusal)
            conn.reply({"ok": False, "message": refusal})
            return
        transfer_id = _draw_id()
        chunk = min(CHUNK_SIZE, target.max_record - CHUNK_HEADER_SIZE)
        sender = TreeSender(sources, transfer_id, chunk_size=chunk, max_entries=entries, max_files=files,
                            max_bytes=total, move=move)
        transfer = Transfer(0, HOST, target.name, entries, files, total, move, target_vm=target,
                            sender=sender)
        target.channel.start_file_target(transfer_id, entries=entries, files=files, total_size=total,
                                         flags=FLAG_MOVE if move else 0, source=HOST, now=now)
        self._hold(transfer, conn)
        self.transfers.append(transfer)
        log.info("sending %s from the host to %s", describe(entries, files, total), target.name)

    def _hold(self, transfer: Transfer, conn: Connection) -> None:
        def hung_up() -> None:
            if not transfer.ended:
                self._cancel(transfer, "cancelled on the host (the command was interrupted)")

        transfer.held.append(HeldRequest(conn, self.selector, hung_up))

    # Events from the VMs' own service ------------------------------------------------------
    def on_event(self, vm: VmLink, event: HostEvent, now: float) -> bool:
        """Take a file event of `vm` (protocol.channel.FILE_EVENTS); False for any other event."""
        match event:
            case FileOffered(offer):
                number = self._offer_number(vm)
                log.info("%s offers %s as #%d (names: %s); approve or reject it", vm.name,
                         describe(offer.entries, offer.files, offer.total_size), number,
                         shown_names(offer.names, LOGGED_NAMES))
                return True
            case OfferWithdrawn():
                log.info("%s withdrew its file offer", vm.name)
                self._offer_numbers.pop(vm.name, None)
                return True
            case FileOutcome():
                transfer = self._transfer_of(vm)
                if transfer is not None:
                    self._on_outcome(transfer, vm, event)
                return True
        return False

    def _transfer_of(self, vm: VmLink) -> Transfer | None:
        return next((t for t in self.transfers if vm in (t.source_vm, t.target_vm)), None)

    def _on_outcome(self, transfer: Transfer, vm: VmLink, event: FileOutcome) -> None:
        side = "source" if vm is transfer.source_vm else "target"
        result = event.result
        if result is None:  # the VM cancelled, timed out, went away or misbehaved
            reason = event.reason or FailReason.CANCELLED
            if reason is FailReason.CANCELLED and vm.last_fault and vm.attachment(time.monotonic()) \
                    is Attachment.FAULTY:
                detail = f"{vm.name} misbehaved ({vm.last_fault})"
            else:  # (`who` names the VM; a plain cancel says it all with its code)
                detail = "" if reason is FailReason.CANCELLED else reason.value
            code = FileCode.TIMEOUT if reason is FailReason.TIMEOUT else FileCode.CANCELLED
            result = FileResult(0, code, detail=detail.encode()[:512])
            self._end(transfer, result, who=vm.name, failed_side=side)
        else:
            if side == "target" and result.code != FileCode.OK:
                transfer.end_relayed = False  # the receiver's own verdict: it removed what it had
            self._end(transfer, result, who=vm.name, failed_side=side if result.code != FileCode.OK else "")

    # The loop ------------------------------------------------------------------------------
    def pump(self, now: float) -> bool:
        """Move records for every transfer; end the ones whose VM went away.  True if anything moved."""
        moved = False
        for transfer in list(self.transfers):
            if transfer.ended:
                continue
            for vm in (transfer.source_vm, transfer.target_vm):
                if vm is not None and vm.attachment(now) is Attachment.STALE:
                    for event in vm.channel.detach(now):
                        if isinstance(event, OfferWithdrawn):
                            self.on_event(vm, event, now)
                    self._end(transfer, FileResult(0, FileCode.CANCELLED, detail=(
                        f"{vm.name}'s driver stopped responding").encode()), who=vm.name,
                        failed_side="source" if vm is transfer.source_vm else "target")
                    break
            if transfer.ended:
                continue
            moved |= self._relay(transfer, now)
            if not transfer.ended and transfer.receiver is not None and transfer.receiver.done is False:
                late = transfer.receiver.poll()
                if late is not None:
                    self._end(transfer, late, who="the host")
            if not transfer.ended:
                entries, size = transfer.progress
                for held in transfer.held:
                    held.progress(now, phase="sending", entries=entries, entries_total=transfer.entries_total,
                                  bytes=size, bytes_total=transfer.bytes_total)
        self.transfers = [t for t in self.transfers if not t.ended]
        return moved

    def _relay(self, transfer: Transfer, now: float) -> bool:
        source, target = transfer.source_vm, transfer.target_vm
        moved = 0
        self._culprit = None
        self._skipped = 0
        taken = 0
        try:
            while moved < MAX_RELAY_RECORDS and taken < MAX_RELAY_BYTES and not transfer.ended:
                room = -1  # the host receiver always has room (it writes synchronously)
                if target is not None:
                    if target.channel.output_pending or target.channel.state is not HostState.FILE_TARGET:
                        break  # its FileBegin goes first; or it already ended
                    self._culprit = target
                    room = target.producer.free_space()
                message = self._next_record(transfer, source, room, now)
                if message is None:
                    break
                if type(message) is FileChunk:
                    taken += len(message.data)
                if target is not None:
                    transfer.end_relayed = type(message) is StreamEnd
                    kind, parts = encode_stream(message, target.channel.give_stream(message, now))
                    self._culprit = target
                    if not target.producer.try_push(kind, parts, publish=False):
                        # Cannot happen (twice the span was free): a bug, so stop this transfer only.
                        log.error("%s's ring refused a record it had room for", target.name)
                        self._end(transfer, FileResult(0, FileCode.CANCELLED,
                                                       detail=b"internal error in the relay; see the log"),
                                  who="the broker", failed_side="host")
                        break
                elif transfer.receiver is not None:
                    if source is not None and type(message) is FileChunk:
                        # The receiver hashes the data and writes it: two reads, so it gets a
                        # private copy, made once (and guarded like every broker access).
                        self._culprit = source
                        mem, view = source.region.mem, memoryview(message.data)
                        data = mem.read(mem.offset_of(view), view.nbytes)
                        message = FileChunk(message.transfer_id, message.offset, data)
                    result = transfer.receiver.feed(message)
                    if result is not None:
                        self._end(transfer, result, who="the host")
                if source is not None:
                    source.consumer.consume(release=False)
                moved += 1
        except (RingCorruptError, RemoteProtocolError) as exc:
            assert self._culprit is not None
            self._fault(transfer, self._culprit, exc, now)
        except BackingLostError as exc:
            # A region file was truncated from outside: the error says whose mapping faulted.
            ends = [vm for vm in (source, target) if vm is not None]
            culprit = next((vm for vm in ends if vm.region.mem is exc.buffer), self._culprit or ends[0])
            self._fault(transfer, culprit, exc, now)
        finally:
            # Hand back the source's space and publish the target's records once per round.
            # A file truncated meanwhile: its VM's next round finds the size changed and faults it.
            with contextlib.suppress(BackingLostError):
                if source is not None and source.attachment(now) is not Attachment.FAULTY:
                    source.consumer.release()
            with contextlib.suppress(BackingLostError):
                if target is not None and target.attachment(now) is not Attachment.FAULTY:
                    target.producer.publish()
        return moved > 0

    def _next_record(self, transfer: Transfer, source: VmLink | None, room: int,
                     now: float) -> StreamMessage | None:
        """The next stream record to relay; a VM's stays in its ring until it is consumed.

        Raises:
            RingCorruptError, RemoteProtocolError: the source's ring or stream is invalid.
        """
        if source is None:
            sender = transfer.sender
            assert sender is not None
            if 0 <= room < 2 * record_span(max(sender.chunk_size + CHUNK_HEADER_SIZE, _LARGEST_ENTRY)):
                return None
            message = sender.next_message()
            if message is None and sender.failure is not None:
                self._end(transfer, sender.failure, who="the host", failed_side="source")
            return message  # type: ignore[return-value]
        self._culprit = source
        while not transfer.ended and self._skipped < MAX_SKIPPED_RECORDS:
            found = source.consumer.peek()
            if found is None:
                return None
            kind, view = found
            if kind in STREAM_KINDS:
                if 0 <= room < 2 * record_span(view.nbytes):
                    return None  # the target is full: the record waits in the source's ring
                message = _decode_in_ring(source.region.mem, kind, view)
                if message.transfer_id == source.channel.transfer_id:  # type: ignore[union-attr]
                    source.channel.take_stream(message, now)  # type: ignore[arg-type]
                    return message  # type: ignore[return-value]
            else:
                message = decode(kind, source.region.mem.read(source.region.mem.offset_of(view), view.nbytes))
            # Not a record of the approved stream: what the channel makes of it.
            source.consumer.consume(release=False)
            self._skipped += 1
            for event in source.count_dropped(source.channel.receive(message, now), now):
                self.on_event(source, event, now)
            self._culprit = source
        return None

    def _fault(self, transfer: Transfer, vm: VmLink, error: Exception, now: float) -> None:
        """`vm` broke its ring or the stream: mark it faulty (like any protocol breach), end the transfer."""
        for event in vm.fault(str(error), now):
            if isinstance(event, FileOutcome):
                self._on_outcome(transfer, vm, event)
        if not transfer.ended:
            self._end(transfer, FileResult(0, FileCode.BAD_STREAM, detail=str(error).encode()[:512]),
                      who=vm.name, failed_side="source" if vm is transfer.source_vm else "target")

    # Ending ---------------------------------------------------------------------------------
    def _cancel(self, transfer: Transfer, why: str) -> None:
        self._end(transfer, FileResult(0, FileCode.CANCELLED, detail=why.encode()[:512]), who="the host",
                  failed_side="host")

    def _end(self, transfer: Transfer, result: FileResult, *, who: str, failed_side: str = "") -> None:
        """The one place a transfer ends: tell both ends, clean up, answer the waiting commands.

        `result` is the receiver's verdict, or the failure of `failed_side`
        ("source", "target", or "host" for a cancel on the host).
        """
        if transfer.ended:
            return
        transfer.ended = True
        ok = result.code == FileCode.OK and not failed_side
        # The source learns the outcome (a VM: its FileResult; the host: delete after a move).
        if transfer.source_vm is not None and failed_side != "source":
            transfer.source_vm.channel.finish_file(result)
        if transfer.target_vm is not None and failed_side != "target" and not ok:
            transfer.target_vm.channel.finish_file(None)
        placed_on_host = transfer.receiver is not None and transfer.receiver.placed
        if transfer.receiver is not None and not transfer.receiver.done:
            transfer.receiver.abort()
        moved_note = ""
        if transfer.sender is not None:
            transfer.sender.close()
            if ok and transfer.move:
                moved_note = "; " + delete_sent(transfer.sender).summary()
        what = describe(transfer.entries_total, transfer.files_total, transfer.bytes_total)
        elapsed = time.monotonic() - transfer.started
        if ok:
            verb = "moved" if transfer.move else "sent"
            where = f" into {self.incoming / transfer.source}" if transfer.target == HOST else ""
            message = f"{verb} {what} from {transfer.source} to {transfer.target}{where}{moved_note}"
            if transfer.move and transfer.source != HOST:
                message += f" ({transfer.source} deletes its copy)"
        else:
            if placed_on_host:  # a --move transfer failed while its files were being flushed
                written = f"the files had already arrived in {self.incoming / transfer.source} and stay there"
            elif transfer.end_relayed:
                written = f"{transfer.target} may have kept the files (they had all reached it)"
            else:
                written = "nothing was written"
            message = (f"{transfer.source} to {transfer.target} failed: "
                       f"{outcome_text(result, who)}; {written}, and no source was deleted")
        log.info("file transfer: %s (%.1f s)", message, elapsed)
        if self.on_end is not None:
            self.on_end(FileRequest(transfer.source, transfer.target, transfer.entries_total,
                                    transfer.files_total, transfer.bytes_total, transfer.move),
                        "ok" if ok else "failed", message)
        reply: dict[str, Any] = {
            "ok": ok, "message": message, "elapsed_s": round(elapsed, 3), "source": transfer.source,
            "target": transfer.target, "entries": transfer.entries_total, "files": transfer.files_total,
            "bytes": transfer.bytes_total, "move": transfer.move}
        if ok and transfer.target == HOST:
            reply["incoming"] = str(self.incoming / transfer.source)
        for held in transfer.held:
            held.finish(reply)

    def close(self) -> None:
        """Cancel everything in flight (the broker is stopping)."""
        for transfer in self.transfers:
            self._cancel(transfer, "the broker is shutting down")
        self.transfers.clear()

    # Status -------------------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """Pending offers and transfers; names escaped, never content."""
        offers = []
        for vm in self.vms.values():
            offer = vm.channel.pending_offer
            if offer is None:
                continue
            offers.append({
                "vm": vm.name, "offer": self._offer_number(vm), "entries": offer.entries,
                "files": offer.files, "total_size": offer.total_size, "move": bool(offer.flags & FLAG_MOVE),
                "roots": offer.roots, "names": [_shorten(display(n)) for n in offer.names[:STATUS_NAMES]],
                "age_s": round(now - vm.channel.offer_seen_at, 1),
            })
        transfers = []
        for transfer in self.transfers:
            entries, size = transfer.progress
            transfers.append({
                "source": transfer.source, "target": transfer.target, "entries": entries,
                "entries_total": transfer.entries_total, "bytes": size, "bytes_total": transfer.bytes_total,
                "move": transfer.move, "age_s": round(now - transfer.started, 1),
            })
        return {"offers": offers, "transfers": transfers}


def _shorten(text: str, most: int = SHOWN_NAME_CHARS) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def shown_names(names: tuple[bytes, ...], most: int) -> str:
    """Up to `most` offered names, escaped and shortened, for one line of text."""
    shown = ", ".join(f"'{_shorten(display(n))}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _draw_id() -> int:
    return secrets.randbits(64) or 1


_LARGEST_ENTRY = FILE_ENTRY_HEADER_SIZE + 2 * MAX_PATH
"""The largest FileEntry record: the host sender's next record may be one."""


def _decode_in_ring(mem: SharedBuffer, kind: int, view: memoryview) -> Message:
    """Decode a stream record that stays in the source's ring until it is relayed.

    Its fields come from one guarded copy (each read once, and a truncated file
    raises BackingLostError there instead of SIGBUS in Python); a chunk's data
    stays a view, whose one copy (into the target's ring or the host receiver's
    buffer) is guarded too.

    Raises:
        RemoteProtocolError: the record does not decode.
        BackingLostError: the source's file was truncated under the record.
    """
    at = mem.offset_of(view)
    if kind == Kind.FILE_CHUNK:
        head = decode(kind, mem.read(at, min(view.nbytes, CHUNK_HEADER_SIZE)))
        assert isinstance(head, FileChunk)
        return FileChunk(head.transfer_id, head.offset, view[CHUNK_HEADER_SIZE:])
    return decode(kind, mem.read(at, view.nbytes))
