"""Pieces both command lines share: sizes, logging, and one request with a clear outcome."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from control.errors import ControlError, NotRunningError
from control.sockets import request

_SIZE = re.compile(r"(\d+)\s*([KMG]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4M', '4MiB', '1048576' -> bytes (binary units).  For argparse `type=`."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4M, 16MiB, 65536)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def positive_size(text: str) -> int:
    """Like :func:`parse_size`, but zero is refused (a limit of nothing makes no sense)."""
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero bytes")
    return size


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; an option the chosen subcommand does not know is refused with that
    subcommand's usage line, not the program's (argparse's own way)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "command", None)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                action.choices[command].error(f"unrecognized arguments: {' '.join(extra)}")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def call(
    socket_path: Path,
    header: dict[str, Any],
    body: bytes = b"",
    *,
    timeout_s: float,
    max_body: int = 0,
    service: str,
) -> tuple[dict[str, Any], bytes]:
    """One request.  On a transport failure print a clear line and exit 1."""
    try:
        frame = request(socket_path, header, body, timeout_s=timeout_s, max_body=max_body)
    except NotRunningError:
        print(f"error: the {service} is not running (nothing listens on {socket_path})",
              file=sys.stderr)
        raise SystemExit(1) from None
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return frame.header, frame.body


def report(reply: dict[str, Any], *, as_json: bool = False) -> int:
    """Print the reply's message (stdout if it succeeded, stderr if not); return the exit code."""
    if as_json:
        print(json.dumps(reply, indent=2))
    else:
        message = reply.get("message") or reply.get("error") or "no message"
        print(message, file=sys.stdout if reply.get("ok") else sys.stderr)
    return 0 if reply.get("ok") else 1
