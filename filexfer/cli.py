"""What both command lines do around a file transfer: scan, explain, wait with progress.

Used by ``python -m guestdrv send`` and ``python -m broker send`` / ``approve``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from control.errors import ControlError, NotRunningError
from control.progress import ProgressBar, human_size, request_with_progress
from filexfer.errors import SourceError
from filexfer.sender import Scan, scan, sources_from_paths


def scan_sources(paths: list[str], *, move: bool) -> Scan | None:
    """Scan the paths a user named; print notices and problems to standard error.

    Returns None (after saying why) when nothing should be sent.
    """
    if any(not p for p in paths):
        print("error: an empty path names nothing to send", file=sys.stderr)
        return None
    try:
        sources = sources_from_paths([os.fsencode(p) for p in paths])
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    found = scan(sources, move=move)
    for notice in found.notices:
        print(f"notice: {notice}", file=sys.stderr)
    if found.notice_count > len(found.notices):
        print(f"notice: ... and {found.notice_count - len(found.notices)} more", file=sys.stderr)
    if found.problem_count:
        for problem in found.problems:
            print(f"error: {problem}", file=sys.stderr)
        if found.problem_count > len(found.problems):
            print(f"error: ... and {found.problem_count - len(found.problems)} more problems",
                  file=sys.stderr)
        print("nothing was sent", file=sys.stderr)
        return None
    if found.entries == 0:
        print("error: nothing to send (only skipped entries)", file=sys.stderr)
        return None
    return found


def summary(found: Scan) -> str:
    parts = [f"{found.files} file{'s' if found.files != 1 else ''}"]
    if found.dirs:
        parts.append(f"{found.dirs} director{'ies' if found.dirs != 1 else 'y'}")
    if found.links:
        parts.append(f"{found.links} link{'s' if found.links != 1 else ''}")
    return f"{', '.join(parts)}, {human_size(found.total_size)}"


def paths_body(found: Scan) -> bytes:
    """The sources, absolute, NUL-separated (a path may hold any byte but NUL)."""
    return b"\0".join(source.path for source in found.sources)


def wait_for_outcome(socket_path: Path, header: dict[str, Any], body: bytes = b"", *,
                     service: str, as_json: bool = False, announce: str | None = None) -> int:
    """Send a long request; show its progress on a terminal; print its outcome.

    Returns the exit code: 0 on success, 1 on failure, 130 after Ctrl-C (which
    closes the connection: the other side cancels the transfer).  `as_json`
    prints the whole final reply (with ``elapsed_s``) instead of its message.
    `announce` goes to standard error with the first progress report, once the
    other side has taken the request on (a refusal is said alone).
    """
    bar = ProgressBar()
    pending = [announce] if announce else []

    def on_progress(report: dict[str, Any]) -> None:
        if pending:
            print(pending.pop(), file=sys.stderr)
        bar.update(report)

    try:
        frame = request_with_progress(socket_path, header, body, on_progress=on_progress)
    except KeyboardInterrupt:
        bar.close()
        print("cancelled", file=sys.stderr)
        return 130
    except NotRunningError:
        bar.close()
        print(f"error: the {service} is not running (nothing listens on {socket_path})", file=sys.stderr)
        return 1
    except ControlError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bar.close()
    reply = frame.header
    if as_json:
        print(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    message = str(reply.get("message") or reply.get("error") or "no message")
    print(message, file=sys.stdout if reply.get("ok") else sys.stderr)
    return 0 if reply.get("ok") else 1
