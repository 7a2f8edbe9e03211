"""The broker: owns the regions, serves gestures, moves the global clipboard.

One thread, one selector.  Each round it services every VM (bounded work per
VM, see broker.vm), then waits on the control socket for as long as the
polling backoff allows: at most 1 ms while a transfer is in flight, up to
`idle_wait_s` when all is quiet.

Gestures arrive only on the control socket (owner-only, peer-credential
checked).  A copy gesture for VM X is the only way X's data enters the global
clipboard; a paste gesture for VM Y is the only way the global clipboard
leaves the broker, into Y's region alone, after which it is wiped.

The policy (broker.policy) is asked before a paste starts; a denied paste
never touches any region.  Every gesture and every outcome goes to the audit
log (broker.audit), as do faults and expiries of the global clipboard.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import selectors
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit import AuditLog
from broker.clipboard import GlobalClipboard
from broker.errors import ConfigError
from broker.files import FILE_OPS, FILE_SPINS, MAX_SEND_PATHS_BODY, FileRequest, FileTransfers
from broker.names import GLOBAL_CLIPBOARD, shm_name
from broker.policy import (
    ALLOW_ALL,
    Policy,
    Request,
    check_ceiling,
    check_names,
    decide,
    size_limit,
    text_refusal,
)
from broker.vm import Attachment, VmLink
from control.framing import Frame
from control.server import Connection, ControlServer
from control.sockets import InstanceLock
from control.stop import StopSignal
from filexfer.receiver import default_incoming, sweep_partials
from protocol import clipformat
from protocol.channel import (
    FILE_EVENTS,
    CopyCompleted,
    CopyFailed,
    Dropped,
    FailReason,
    HostEvent,
    PasteCompleted,
    PasteFailed,
)
from protocol.errors import ClipFormatError
from protocol.filestream import LENIENT, STRICT
from protocol.messages import RefusedBecause
from shm import layout
from shm.backoff import Backoff
from shm.region import Region

log = logging.getLogger(__name__)

DEFAULT_CLIPBOARD_LIMIT = 16 << 20
DEFAULT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class BrokerConfig:
    vms: list[str]
    socket_path: Path
    region_size: int = layout.DEFAULT_REGION_SIZE
    shm_prefix: str = "ivclip-"
    clipboard_limit: int = DEFAULT_CLIPBOARD_LIMIT
    timeout_s: float = DEFAULT_TIMEOUT_S
    idle_wait_s: float = 0.05
    unlink_on_exit: bool = False
    shm_mode: int = 0o600
    shm_group: int | None = None
    policy: Policy = ALLOW_ALL
    audit_path: Path | None = None
    clipboard_ttl_s: float | None = None
    incoming: Path = field(default_factory=default_incoming)
    allow_unsafe_names: bool = False


@dataclass(slots=True)
class _Gesture:
    kind: str  # "copy" or "paste"
    conn: Connection
    transfer_id: int
    started: float = field(default_factory=time.monotonic)
    source: str = ""  # for the audit log: where the content comes from
    size: int = 0
    limit: int = 0


def _echo(value: object, most: int = 60) -> str:
    """A client's value quoted back in a reply, cut short: a 64 KiB request must not
    make a reply over the frame limit."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _forbid_core_dumps() -> None:
    """The global clipboard must never reach the disk, so no core dumps of us."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_dumpable = 4
        libc.prctl(pr_set_dumpable, 0, 0, 0, 0)
    except OSError:  # not Linux or no libc: nothing to do
        log.debug("could not disable core dumps")


_REFUSALS = {
    RefusedBecause.TEXT_POLICY: "not valid text for {vm} (its text policy)",
    RefusedBecause.BAD_FORMAT: "{vm}'s driver cannot read the content (an older driver?)",
    RefusedBecause.CLIPBOARD_FAILED: "{vm}'s clipboard could not take the content",
}


def _kinds(types: list[tuple[str, int]]) -> str:
    return ", ".join(mime for mime, _ in types)


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.clipboard = GlobalClipboard()
        self.vms: dict[str, VmLink] = {}
        self._gestures: dict[str, _Gesture] = {}
        self._selector = selectors.DefaultSelector()
        self._lock = InstanceLock(Path(str(config.socket_path) + ".lock"))
        self._server: ControlServer | None = None
        self._stop = StopSignal(self._selector)
        self.audit = AuditLog(config.audit_path)
        self._clipboard_expires: float | None = None
        self._wipe_after_paste = False  # a denial asked for a wipe while a paste streamed
        self._faults_seen: dict[str, int] = {}
        self.files = FileTransfers(self.vms, self._selector, incoming=config.incoming,
                                   policy=LENIENT if config.allow_unsafe_names else STRICT,
                                   decide=self._decide_file, on_end=self._file_ended)

    # Lifetime --------------------------------------------------------------
    def start(self) -> None:
        """Take the lock, create and initialise every region, listen.

        Raises:
            ConfigError: the policy names a VM we do not serve, has a limit over ours, or
                the audit log cannot be opened.
            ControlError: another broker holds the socket's lock, or the socket cannot be bound.
            RegionError: a region cannot be created (RegionBusyError: another broker owns it).
        """
        _forbid_core_dumps()
        check_names(self.config.policy, self.config.vms)
        check_ceiling(self.config.policy, self.config.clipboard_limit)
        try:
            self.audit.open()
        except OSError as exc:
            raise ConfigError(f"cannot open the audit log {self.config.audit_path}: {exc.strerror}") from exc
        self._lock.acquire("ivclip broker")
        try:
            for name in self.config.vms:
                region = Region.create(
                    shm_name(name, self.config.shm_prefix),
                    self.config.region_size,
                    mode=self.config.shm_mode,
                    group=self.config.shm_group,
                )
                self.vms[name] = VmLink(name, region, timeout_s=self.config.timeout_s)
                log.info("%s: region %s ready (%d bytes)", name, region.path, region.size)
            self._server = ControlServer(
                self.config.socket_path,
                self._selector,
                self._on_request,
                max_body=MAX_SEND_PATHS_BODY,
            )
            sweep_partials(self.config.incoming)
        except BaseException:
            # A refused start leaves nothing behind that it made itself.
            made = [vm.region for vm in self.vms.values() if vm.region.created]
            self.close()
            for region in made:
                region.unlink()
            raise

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the loop cleanly."""
        self._stop.install()

    def stop(self) -> None:
        self._stop.stop()

    def close(self) -> None:
        """Fail pending gestures, wipe the global clipboard and every region, release all."""
        for vm_name, gesture in list(self._gestures.items()):
            message = f"{vm_name}: the broker is shutting down"
            self._audit(gesture, vm_name, "failed", message)
            gesture.conn.reply({"ok": False, "message": message})
        self._gestures.clear()
        self.files.close()
        self.clipboard.wipe()
        self.audit.close()
        for vm in self.vms.values():
            vm.shutdown(unlink=self.config.unlink_on_exit)
        if self.vms:
            log.info("stopped: global clipboard and the regions of %s wiped", ", ".join(self.vms))
        self.vms.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._lock.release()

    # The loop --------------------------------------------------------------
    def run(self) -> None:
        backoff = Backoff(max_sleep_s=self.config.idle_wait_s)
        spins = backoff.spins
        next_beat = 0.0
        log.info("broker serving %s on %s", ", ".join(self.vms), self.config.socket_path)
        while not self._stop.stopping:
            now = time.monotonic()
            moved = self.poll_once(now)
            if now >= next_beat:
                for vm in self.vms.values():
                    vm.beat()
                next_beat = now + layout.HEARTBEAT_PERIOD_S
                if self._server is not None:
                    self._server.expire(now)
            self.expire_clipboard(now)
            if moved:
                backoff.reset()
            busy = any(vm.busy for vm in self.vms.values())
            backoff.spins = FILE_SPINS if self.files.transfers else spins
            wait = backoff.next_wait(cap_s=0.001 if busy else None)
            for key, _ in self._selector.select(wait):
                key.data()

    def poll_once(self, now: float) -> bool:
        """Service every VM once; returns whether any records moved."""
        moved = False
        for vm in self.vms.values():
            did_move, events = vm.service(now)
            moved |= did_move
            if vm.counters.faults != self._faults_seen.get(vm.name, 0):
                self._faults_seen[vm.name] = vm.counters.faults
                self.audit.record("fault", source=vm.name, target=None, size=None, outcome="failed",
                                  reason=f"{vm.name} marked faulty: {vm.last_fault}")
            for event in events:
                self._on_event(vm, event)
        moved |= self.files.pump(now)
        return moved

    def copy_limit(self, vm: str) -> int:
        """The most a copy from `vm` may bring: the broker's limit, or the policy's if lower."""
        limit = size_limit(self.config.policy, "clipboard", vm)
        return self.config.clipboard_limit if limit is None else min(limit, self.config.clipboard_limit)

    def expire_clipboard(self, now: float) -> None:
        """Wipe the global clipboard once its time to live is over (never under a paste)."""
        if self._clipboard_expires is None or now < self._clipboard_expires:
            return
        if self._paste_in_flight():
            return  # the paste streams from it; it expires when that paste ends, if it fails
        if not self.clipboard.empty:
            self.audit.record("expire", source=self.clipboard.source, target=GLOBAL_CLIPBOARD,
                              size=self.clipboard.content_size, outcome="wiped",
                              reason=f"nobody pasted it within {self.config.clipboard_ttl_s:g} s")
            log.info("global clipboard expired unpasted after %g s; wiped", self.config.clipboard_ttl_s)
        self.clipboard.wipe()
        self._clipboard_expires = None

    def _paste_in_flight(self) -> bool:
        """A paste streams straight from the global clipboard's buffer: wiping it (in
        place) now would send zeros in its stead."""
        return any(g.kind == "paste" for g in self._gestures.values())

    def _audit(self, gesture: _Gesture, vm: str, outcome: str, reason: str, size: int | None = None) -> None:
        source, target = (vm, GLOBAL_CLIPBOARD) if gesture.kind == "copy" else (gesture.source, vm)
        self.audit.record(gesture.kind, source=source or None, target=target,
                          size=gesture.size if size is None else size, outcome=outcome, reason=reason)

    def _deny_paste(self, vm: VmLink) -> dict[str, Any] | None:
        """Ask the policy about a paste of the global clipboard to `vm`; act on a denial."""
        source, size = self.clipboard.source, self.clipboard.content_size
        decision = decide(self.config.policy, Request("clipboard", source, vm.name, size))
        if decision.allow:
            assert self.clipboard.data is not None
            # The items are interpreted here only for a VM the policy file gives a text policy.
            refusal = text_refusal(self.config.policy, vm.name, clipformat.parse(self.clipboard.data))
            if refusal is None:
                return None
            reason, outcome = refusal, "refused"
        else:
            reason, outcome = decision.reason, "denied"
        if self.config.policy.keep_on_deny:
            after = "global clipboard kept"
        elif self._paste_in_flight():
            self._wipe_after_paste = True
            after = "global clipboard wiped once the paste in progress ends"
        else:
            self.clipboard.wipe()
            after = "global clipboard wiped"
        message = f"paste to {vm.name} {outcome.upper()}, nothing pasted: {reason}; {after}"
        log.info("gesture paste %s: %s", vm.name, message)
        self.audit.record("paste", source=source, target=vm.name, size=size, outcome=outcome,
                          reason=message)
        return {"ok": False, "denied": True, "message": message}

    def _decide_file(self, request: FileRequest) -> str | None:
        """The policy file's word on a file transfer the user approved (or sent); audited."""
        decision = decide(self.config.policy,
                          Request("file", request.source, request.target, request.total_size))
        outcome = "approved" if decision.allow else "denied"
        self.audit.record("file", source=request.source, target=request.target,
                          size=request.total_size, outcome=outcome, reason=decision.reason)
        return None if decision.allow else decision.reason

    def _file_ended(self, request: FileRequest, outcome: str, message: str) -> None:
        """The audit's record of how a file offer or transfer ended."""
        self.audit.record("file", source=request.source, target=request.target or None,
                          size=request.total_size, outcome=outcome, reason=message)

    # Gestures --------------------------------------------------------------
    def _on_request(self, conn: Connection, frame: Frame) -> None:
        op = frame.header.get("op")
        vm_name = frame.header.get("vm")
        if op == "status":
            conn.reply(self.status())
            return
        if isinstance(op, str) and op in FILE_OPS:
            self.files.on_request(conn, frame, time.monotonic())
            return
        if op not in ("copy", "paste"):
            conn.reply({"ok": False, "message": f"unknown request {_echo(op)}"})
            return
        if not isinstance(vm_name, str) or vm_name not in self.vms:
            known = ", ".join(self.vms)
            conn.reply({"ok": False, "message": f"unknown VM {_echo(vm_name)}; this broker serves {known}"})
            return
        vm = self.vms[vm_name]
        # The policy first: a denied paste is denied whatever state the target is in.
        denial = self._deny_paste(vm) if op == "paste" and not self.clipboard.empty else None
        if denial:
            conn.reply(denial)
            return
        source = vm_name if op == "copy" else self.clipboard.source
        size = 0 if op == "copy" else self.clipboard.content_size
        gesture = _Gesture(op, conn, secrets.randbits(64) or 1, source=source, size=size,
                           limit=self.copy_limit(vm_name))
        refusal = self._refuse_gesture(op, vm)
        if refusal:
            log.info("gesture %s %s refused: %s", op, vm_name, refusal)
            self._audit(gesture, vm_name, "refused", refusal, size=None if op == "copy" else size)
            conn.reply({"ok": False, "message": refusal})
            return
        now = time.monotonic()
        if op == "copy":
            # The limit is on content; the wire also carries the container around it.
            vm.channel.start_copy(gesture.transfer_id, gesture.limit + clipformat.MAX_OVERHEAD, now)
        else:
            assert self.clipboard.data is not None
            vm.channel.start_paste(gesture.transfer_id, self.clipboard.data, now)
        log.info("gesture %s %s started", op, vm_name)
        self._gestures[vm_name] = gesture

    def _refuse_gesture(self, op: str, vm: VmLink) -> str | None:
        # The policy, the policy file's text policy included, was asked before this
        # (see _on_request); the receiving driver applies its own --text-policy too.
        now = time.monotonic()
        if op == "paste" and self.clipboard.empty:
            return "nothing to paste: the global clipboard is empty"
        if self._gestures:
            # One gesture at a time: a copy replaces (and wipes) the global clipboard,
            # which a paste in flight is still streaming from.
            other, gesture = next(iter(self._gestures.items()))
            return f"another gesture is in progress ({gesture.kind} {other}); try again"
        if vm.busy:
            return f"{vm.name} is busy with another transfer; try again"
        state = vm.attachment(now)
        if state is Attachment.ATTACHED:
            return None
        if state is Attachment.STALE:
            age = vm.heartbeat_age(now) or 0.0
            return f"{vm.name} did not answer: its driver has not responded for {age:.0f} s"
        if state is Attachment.FAULTY:
            return f"{vm.name} is faulty ({vm.last_fault}); waiting for its driver to re-attach"
        if state is Attachment.STOPPED:
            return f"{vm.name} did not answer: its driver stopped"
        return f"{vm.name} did not answer: its driver is not attached"

    def _on_event(self, vm: VmLink, event: HostEvent) -> None:
        if isinstance(event, FILE_EVENTS):
            self.files.on_event(vm, event, time.monotonic())
            return
        gesture = self._gestures.get(vm.name)
        if isinstance(event, Dropped) or gesture is None or gesture.transfer_id != event.transfer_id:
            return
        del self._gestures[vm.name]
        reply = self._conclude(vm, event, gesture.limit)
        log.info("gesture %s %s: %s", gesture.kind, vm.name, reply["message"])
        # A paste's size is the content's (the event's may count the container around it).
        size = reply.get("size", gesture.size if gesture.kind == "paste" else getattr(event, "size", None))
        self._audit(gesture, vm.name, "ok" if reply["ok"] else "failed", reply["message"], size=size)
        if self._wipe_after_paste and not self._paste_in_flight():
            self._wipe_after_paste = False
            self.clipboard.wipe()
        gesture.conn.reply(reply)

    def _conclude(self, vm: VmLink, event: HostEvent, limit: int) -> dict[str, Any]:
        timeout = f"{self.config.timeout_s:g}"
        match event:
            case CopyCompleted(_, data):
                if not data:
                    return {"ok": False, "message": f"{vm.name}'s clipboard is empty; nothing copied"}
                try:
                    # Sizes and types only: the broker never interprets the items themselves.
                    types = clipformat.check_bounds(data)
                except ClipFormatError as exc:
                    data[:] = bytes(len(data))
                    self.clipboard.wipe()
                    return {"ok": False, "message": (
                        f"{vm.name} sent content that is not a valid typed clipboard ({exc}); "
                        "refused, global clipboard wiped")}
                content = sum(size for _, size in types)
                if content > limit:
                    data[:] = bytes(len(data))
                    self.clipboard.wipe()
                    return {"ok": False, "message": (
                        f"{vm.name}'s clipboard ({content} bytes) is over the limit of {limit} "
                        "bytes; refused, global clipboard wiped")}
                self.clipboard.take(data, vm.name, types)
                if self.config.clipboard_ttl_s is not None:
                    self._clipboard_expires = time.monotonic() + self.config.clipboard_ttl_s
                size = self.clipboard.content_size
                return {"ok": True, "message": f"copied {size} bytes from {vm.name} ({_kinds(types)})",
                        "size": size, "types": [mime for mime, _ in types]}
            case CopyFailed(_, FailReason.TOO_LARGE, size):
                self.clipboard.wipe()
                return {"ok": False, "message": (
                    f"{vm.name}'s clipboard ({size} bytes) is over the limit of "
                    f"{limit} bytes; refused, global clipboard wiped")}
            case CopyFailed(_, FailReason.EMPTY, _):
                return {"ok": False, "message": f"{vm.name}'s clipboard is empty; nothing copied"}
            case CopyFailed(_, FailReason.TIMEOUT, _):
                return {"ok": False, "message": f"{vm.name} did not answer within {timeout} s"}
            case CopyFailed(_, FailReason.REFUSED, _):
                return {"ok": False, "message": f"{vm.name}'s clipboard could not be read; nothing copied"}
            case CopyFailed(_, reason, _):
                return {"ok": False, "message": self._failure(vm, "copy from", reason)}
            case PasteCompleted(_, _):
                size = self.clipboard.content_size
                self.clipboard.wipe()
                return {"ok": True, "message": f"pasted {size} bytes to {vm.name}, global clipboard wiped",
                        "size": size}
            case PasteFailed(_, FailReason.REFUSED, _, because) if because in _REFUSALS:
                return {"ok": False, "message": f"refused: {_REFUSALS[because].format(vm=vm.name)}; "
                                                "global clipboard kept"}
            case PasteFailed(_, FailReason.TIMEOUT, _):
                return {"ok": False, "message": (
                    f"{vm.name} did not confirm the paste within {timeout} s; "
                    "global clipboard kept")}
            case PasteFailed(_, reason, _):
                return {"ok": False, "message": self._failure(vm, "paste to", reason)
                        + "; global clipboard kept"}
        return {"ok": False, "message": f"unexpected outcome {event!r}"}

    @staticmethod
    def _failure(vm: VmLink, what: str, reason: FailReason) -> str:
        if reason is FailReason.CANCELLED and vm.last_fault:
            return f"{what} {vm.name} failed: {vm.name} misbehaved ({vm.last_fault})"
        return f"{what} {vm.name} failed: {reason.value}"

    def status(self) -> dict[str, Any]:
        """Everything about the VMs and the global clipboard except its content."""
        now = time.monotonic()
        vms = []
        for vm in self.vms.values():
            age = vm.heartbeat_age(now)
            vms.append({
                "name": vm.name,
                "state": vm.attachment(now).value,
                "heartbeat_age_s": None if age is None else round(age, 3),
                "capabilities": vm.channel.capabilities,
                "transfer": vm.channel.state.value,
                "dropped": vm.counters.dropped,
                "faults": vm.counters.faults,
                "last_fault": vm.last_fault,
                "region": str(vm.region.path),
                "region_problem": vm.region_problem,
            })
        clip: dict[str, Any] = {"empty": self.clipboard.empty}
        if not self.clipboard.empty:
            clip.update(source=self.clipboard.source, size=self.clipboard.content_size,
                        types=[mime for mime, _ in self.clipboard.types],
                        age_s=round(time.time() - self.clipboard.copied_at, 1))
            if self._clipboard_expires is not None:
                clip["expires_in_s"] = round(max(0.0, self._clipboard_expires - now), 1)
        return {"ok": True, "message": "status", "vms": vms, "clipboard": clip,
                "policy": self.config.policy.origin, "files": self.files.status(now)}
