"""The guest driver's file transfers: one outgoing send and one incoming stream at a time.

Outgoing (``python -m guestdrv send PATH...``): the command scans the paths and
asks the driver to *offer* them; the driver announces the offer to the broker
and keeps the command waiting, with progress frames, until the outcome.  It
streams only after the host user's approve gesture (FileStart), as fast as
its ring takes records.  Ctrl-C in the command (its connection closes)
withdraws the offer or cancels the stream.  ``--move`` deletes the sources
only after the receiver's OK came back through the broker.

Incoming: every stream the broker hands over is written by
:class:`filexfer.receiver.TreeReceiver` under ``<incoming>/<source>/``.
"""

from __future__ import annotations

import logging
import secrets
import selectors
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.framing import Frame
from control.progress import HeldRequest, files_phrase, human_size
from control.server import Connection
from filexfer.errors import SourceError
from filexfer.receiver import TreeReceiver, open_receiver
from filexfer.sender import Scan, TreeSender, delete_sent, parse_send_request
from protocol.channel import (
    FileIncoming,
    FileIncomingCancelled,
    FileSendApproved,
    FileSendEnded,
    FileStreamed,
    GuestChannel,
    GuestEvent,
)
from protocol.errors import LocalProtocolError
from protocol.filestream import NamePolicy, display
from protocol.messages import FileCode, FileResult

log = logging.getLogger(__name__)

FILE_SPINS = 8
"""Polling spins while files move (the broker's reasoning: broker.files.FILE_SPINS)."""


@dataclass(slots=True)
class _Send:
    held: HeldRequest
    scan: Scan
    channel: GuestChannel
    chunk_size: int
    sender: TreeSender | None = None
    started: float = 0.0


def _describe(entries: int, files: int, size: int) -> str:
    return f"{files_phrase(files, entries)} ({human_size(size)})"


class GuestFiles:
    def __init__(self, *, incoming: Path, policy: NamePolicy, selector: selectors.BaseSelector) -> None:
        self.incoming = incoming
        self.policy = policy
        self.selector = selector
        self.sent = 0
        self.received = 0
        self._send: _Send | None = None
        self._receiver: TreeReceiver | None = None
        self._receiver_channel: GuestChannel | None = None

    @property
    def active(self) -> bool:
        """A stream is moving (the driver then polls its ring often)."""
        return self._receiver is not None or (self._send is not None and self._send.sender is not None)

    # Outgoing ----------------------------------------------------------------------------
    def request_send(self, conn: Connection, frame: Frame, channel: GuestChannel | None,
                     chunk_size: int) -> None:
        """Handle ``send``: offer the paths in the request's body; reply when the transfer ends."""
        if channel is None:
            conn.reply({"ok": False, "message": "the driver is not attached to a broker; nothing was sent"})
            return
        if self._send is not None:
            conn.reply({"ok": False, "message": "another send is already under way in this VM"})
            return
        try:
            request = parse_send_request(frame.header, frame.body)
        except SourceError as exc:
            conn.reply({"ok": False, "message": str(exc)})
            return
        scan = Scan(request.sources, move=request.move, entries=request.entries, files=request.files,
                    total_size=request.total_size)
        offer = scan.offer(secrets.randbits(64) or 1)
        try:
            channel.announce(offer, time.monotonic())
        except LocalProtocolError as exc:
            conn.reply({"ok": False, "message": str(exc)})
            return
        held = HeldRequest(conn, self.selector, self._hung_up)
        self._send = _Send(held, scan, channel, chunk_size)
        what = _describe(request.entries, request.files, request.total_size)
        log.info("offered %s; waiting for the host user", what)
        held.progress(time.monotonic(), phase="waiting",
                      message=f"offered {what}; waiting for the host user to approve")

    def _hung_up(self) -> None:
        send = self._send
        if send is None:
            return
        log.info("the send command was interrupted: %s",
                 "stream cancelled" if send.sender else "offer withdrawn")
        send.channel.cancel_send(time.monotonic())
        self._close_send()

    def _close_send(self) -> None:
        if self._send is not None and self._send.sender is not None:
            self._send.sender.close()
        self._send = None

    def _finish_send(self, ok: bool, message: str) -> None:
        send = self._send
        if send is None:
            return
        log.info("send: %s", message)
        elapsed = time.monotonic() - send.started if send.started else 0.0
        send.held.finish({"ok": ok, "message": message, "elapsed_s": round(elapsed, 3)})
        if ok:
            self.sent += 1
        self._close_send()

    def _on_approved(self, transfer_id: int) -> None:
        send = self._send
        if send is None:
            return
        scan = send.scan
        send.sender = TreeSender(scan.sources, transfer_id, chunk_size=send.chunk_size,
                                 max_entries=scan.entries, max_files=scan.files, max_bytes=scan.total_size,
                                 move=scan.move)
        send.started = time.monotonic()
        send.channel.stream(send.sender.next_message)
        log.info("the host user approved the offer: streaming")

    def _on_ended(self, result: FileResult) -> None:
        send = self._send
        if send is None:
            return
        scan = send.scan
        what = _describe(scan.entries, scan.files, scan.total_size)
        if result.code != FileCode.OK:
            text = FileCode(result.code).text
            if result.name:
                text += f": '{display(result.name)}'"
            if result.detail:
                text += f" ({display(result.detail)})"
            self._finish_send(False, f"sending failed: {text}; no source was deleted")
            return
        message = f"sent {what}; the receiver confirmed every file"
        if scan.move and send.sender is not None:
            message = f"moved {what}; " + delete_sent(send.sender).summary()
        self._finish_send(True, message)

    # Incoming ----------------------------------------------------------------------------
    def _on_incoming(self, channel: GuestChannel, event: FileIncoming) -> None:
        begin = event.begin
        if self._receiver is not None:
            log.warning("a new incoming transfer replaces one that never ended")
            self._receiver.abort()
            self._receiver = None
        receiver = open_receiver(self.incoming, begin, policy=self.policy)
        if isinstance(receiver, FileResult):
            log.warning("refused files from %s: %s", begin.source, display(receiver.detail))
            channel.file_result(receiver)
            return
        log.info("receiving %s from %s into %s",
                 _describe(begin.entries, begin.files, begin.total_size), begin.source, receiver.where)
        self._receiver = receiver
        self._receiver_channel = channel

    def _deliver(self, result: FileResult) -> None:
        if self._receiver_channel is not None:
            self._receiver_channel.file_result(result)
        if result.code == FileCode.OK:
            self.received += 1
        self._receiver = None
        self._receiver_channel = None

    # Driving -------------------------------------------------------------------------------
    def on_event(self, channel: GuestChannel, event: GuestEvent) -> bool:
        """Take a file event; False for any other event."""
        match event:
            case FileSendApproved(transfer_id):
                self._on_approved(transfer_id)
            case FileSendEnded(_, result):
                self._on_ended(result)
            case FileIncoming():
                self._on_incoming(channel, event)
            case FileStreamed(message):
                if self._receiver is not None:
                    verdict = self._receiver.feed(message)
                    if verdict is not None:
                        self._deliver(verdict)
            case FileIncomingCancelled():
                if self._receiver is not None:
                    if self._receiver.placed:
                        log.info("the incoming transfer was cancelled after its files were complete in "
                                 "%s; they stay there", self._receiver.where)
                    else:
                        log.info("the incoming transfer was cancelled; nothing of it was kept")
                    self._receiver.abort()
                    self._receiver = None
                    self._receiver_channel = None
            case _:
                return False
        return True

    def poll(self, now: float) -> None:
        """Progress frames, a sender that failed, a receiver that finished flushing."""
        send = self._send
        if send is not None and send.sender is not None:
            sender = send.sender
            if sender.failure is not None:
                send.channel.fail_send(sender.failure)
                failure = sender.failure
                self._finish_send(False, f"could not send '{display(failure.name)}': "
                                  f"{display(failure.detail)}; the transfer was stopped, "
                                  "no source was deleted")
            else:
                send.held.progress(now, phase="sending", entries=sender.entries,
                                   entries_total=send.scan.entries, bytes=sender.bytes,
                                   bytes_total=send.scan.total_size)
        if self._receiver is not None:
            late = self._receiver.poll()
            if late is not None:
                self._deliver(late)

    def detached(self, why: str) -> None:
        """The region went away (broker stopped or restarted): end everything, delete nothing."""
        if self._send is not None:
            self._finish_send(False, f"the transfer ended: {why}; no source was deleted")
        if self._receiver is not None:
            self._receiver.abort()
            self._receiver = None
            self._receiver_channel = None

    def status(self) -> dict[str, Any]:
        send = self._send
        out: dict[str, Any] = {"files_sent": self.sent, "files_received": self.received}
        if send is not None:
            out["send"] = "streaming" if send.sender else "offered, waiting for approval"
        if self._receiver is not None:
            out["receiving_from"] = self._receiver.begin.source
        return out

