"""The audit log: one JSON line per gesture and per transfer outcome, never content.

Each line holds::

    {"time": "2026-12-03T16:26:32.123Z", "gesture": "paste", "source": "alice",
     "target": "bob", "size": 71, "outcome": "ok", "reason": "pasted 71 bytes to bob, ..."}

``gesture`` is what the host user asked for ("copy", "paste"), or what the
broker did on its own ("expire": the clipboard's time to live ran out;
"fault": a VM was marked faulty, failing what it had in flight).  ``source``
and ``target`` are VM names, or "clipboard" for the global clipboard.
``outcome`` is one of :data:`OUTCOMES`.  ``reason`` is the one-line message
the user got; it carries sizes and VM names, never a byte of content (the
broker's messages are built from sizes, names and reasons only).

The file is opened in append mode, created mode 0600, written one whole line
per ``write`` and flushed at once, so lines from a broker killed mid-way are
whole.  A write that fails (disk full) is reported in the broker's log and
the broker carries on: refusing gestures because the disk is full would turn
a full disk into a denial of service of the clipboard.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "refused", "denied", "failed", "wiped", "approved", "rejected")
"""ok: done; refused: not started (busy, not attached, empty); denied: the policy
said no; failed: started but did not complete; wiped: the global clipboard was wiped;
approved: a file transfer the user approved (or sent) passed the policy and starts."""


class AuditLog:
    """Appends audit records to a file (or only to the log, with no path)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self.records = 0
        self.failures = 0

    def open(self) -> None:
        """Open (create mode 0600) the file for appending.

        Raises:
            OSError: it cannot be opened.
        """
        if self.path is None or self._fd is not None:
            return
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                           0o600)

    def record(self, gesture: str, *, source: str | None, target: str | None, size: int | None,
               outcome: str, reason: str = "") -> dict[str, Any]:
        """Write one record; returns it.  Never raises for I/O: a failure is logged."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown audit outcome {outcome!r}")
        now = datetime.datetime.now(datetime.UTC)
        entry: dict[str, Any] = {
            "time": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
            "gesture": gesture,
            "source": source,
            "target": target,
            "size": size,
            "outcome": outcome,
            "reason": reason,
        }
        self.records += 1
        log.info("audit: %s %s -> %s, %s bytes: %s%s", gesture, source or "-", target or "-",
                 "-" if size is None else size, outcome, f" ({reason})" if reason else "")
        if self._fd is not None:
            line = json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n"
            try:
                os.write(self._fd, line.encode())
            except OSError as exc:
                self.failures += 1
                log.error("cannot write the audit log %s: %s", self.path, exc.strerror)
        return entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log file, oldest first (for tests and tools).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a JSON object.
    """
    records = []
    for line in path.read_text(encoding="ascii").splitlines():
        entry = json.loads(line)
        if not isinstance(entry, dict):
            raise ValueError(f"audit line is not an object: {line[:80]!r}")
        records.append(entry)
    return records
