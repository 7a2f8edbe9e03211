"""``python -m guestdrv`` / ``ivclip-guest``: run the driver; copy and paste (headless)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from control.cli import LOG_LEVELS, call, parse_command_line, positive_size, report, setup_logging
from control.errors import ControlError
from control.sockets import runtime_dir
from filexfer.cli import paths_body, scan_sources, summary, wait_for_outcome
from filexfer.receiver import default_incoming
from guestdrv.clipboard import make_backend
from guestdrv.driver import GuestDriver
from guestdrv.errors import ClipboardError
from protocol.channel import capabilities_label
from protocol.clipformat import TEXT_MIME, TextPolicy
from shm import layout

DEFAULT_LIMIT = 16 << 20


SOCKET_ENV = "IVCLIP_GUEST_SOCKET"


def default_socket() -> Path:
    """$IVCLIP_GUEST_SOCKET if set, else $XDG_RUNTIME_DIR/ivclip/guest.sock."""
    return Path(os.environ.get(SOCKET_ENV) or runtime_dir() / "guest.sock")


def device_problem(device: Path | None) -> str | None:
    """Why `device` can never be an ivclip region, or None.  A missing or empty file may
    be a region the broker has not created yet (the driver waits for it); a directory, or
    a file with another size, is a mistake."""
    if device is None:
        return None
    try:
        st = device.stat()
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return f"--device {device} is a directory, not a region file"
    if stat.S_ISREG(st.st_mode) and st.st_size and not layout.valid_region_size(st.st_size):
        return (f"--device {device} is {st.st_size} bytes; an ivclip region is a power of two "
                f"from {layout.MIN_REGION_SIZE} to {layout.MAX_REGION_SIZE} bytes")
    return None


def status_text(status: dict[str, Any]) -> str:
    """The driver's status for a person, as `broker status` prints the broker's."""
    if status.get("attached"):
        caps = capabilities_label(int(status.get("capabilities") or 0))
        lines = [f"attached to {status['device']} (session {status['session']}), capabilities {caps}"]
    else:
        lines = [f"not attached: {status.get('waiting_for') or 'looking for the ivclip device'}"]
    lines.append(f"clipboard: {status['clipboard']}, text policy {status['text_policy']}; copies answered "
                 f"{status['copies_answered']}, pastes received {status['pastes_received']}, refused "
                 f"{status['pastes_refused']}; records dropped {status['dropped']}")
    files = f"file transfers: sent {status['files_sent']}, received {status['files_received']}"
    if status.get("send"):
        files += f"; our offer: {status['send']}"
    if status.get("receiving_from"):
        files += f"; receiving from {status['receiving_from']}"
    lines.append(files)
    return "\n".join(lines)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0 and 86400")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m guestdrv",
        description="ivclip guest driver: serves the broker over the ivshmem region.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", help="driver socket (default: $IVCLIP_GUEST_SOCKET, else "
                                        "$XDG_RUNTIME_DIR/ivclip/guest.sock)")
        p.add_argument("--limit", type=positive_size, default=DEFAULT_LIMIT,
                       help="largest clipboard handled (default 16M)")
        return p

    run = common(sub.add_parser("run", help="attach to the region and serve the broker"))
    run.add_argument("--device", type=Path,
                     help="map this file instead of finding the ivshmem PCI device "
                          "(a PCI resource2 file, or /dev/shm/ivclip-VM for a host-process guest)")
    run.add_argument("--clipboard", choices=["auto", "x11", "wayland", "headless"], default="auto",
                     help="the guest clipboard to serve (auto: $WAYLAND_DISPLAY -> wayland, "
                          "$DISPLAY -> x11, else headless)")
    run.add_argument("--text-policy", choices=[p.value for p in TextPolicy], default="strict",
                     help="strict: paste only valid UTF-8 text without control characters "
                          "(tab, newline and CRLF allowed); permissive: anything (default strict)")
    run.add_argument("--wipe-after", type=_seconds, metavar="SECONDS",
                     help="clear the clipboard SECONDS after a paste, if it still holds the paste")
    run.add_argument("--incoming", type=Path, default=default_incoming(),
                     help="where received files go, under a folder per source (default ~/ivclip-incoming)")
    run.add_argument("--allow-unsafe-names", action="store_true",
                     help="accept names with control or bidirectional characters or invalid UTF-8 "
                          "(never a path escape)")
    run.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    copy = common(sub.add_parser("copy", help="set the clipboard from standard input (Ctrl-C)"))
    copy.add_argument("--type", default=TEXT_MIME, help=f"MIME type of the content (default {TEXT_MIME})")
    paste = common(sub.add_parser("paste", help="write the clipboard to standard output (Ctrl-V)"))
    paste.add_argument("--type", help="the MIME type wanted (default: text if there is text, "
                                      "else an image, else the first type)")
    paste.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait up to SECONDS for a non-empty clipboard")
    send = common(sub.add_parser("send", help="offer files and directories; they move once the host "
                                             "user approves, and this waits for the outcome"))
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--move", action="store_true",
                      help="delete the sources once the receiver confirmed that every file arrived intact")
    status = common(sub.add_parser("status", help="show the driver's attachment and counters"))
    status.add_argument("--json", action="store_true", help="print the whole status as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        socket_path = Path(args.socket) if args.socket else default_socket()
        if args.command == "run":
            setup_logging(args.log_level)
            problem = device_problem(args.device)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 2
            try:
                clipboard = make_backend(args.clipboard)
            except ClipboardError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            driver = GuestDriver(
                socket_path=socket_path, clipboard=clipboard, limit=args.limit,
                device=args.device, text_policy=TextPolicy(args.text_policy),
                wipe_after_s=args.wipe_after,
                incoming=args.incoming.absolute(),
                allow_unsafe_names=args.allow_unsafe_names,
            )
            driver.start()
            driver.install_signal_handlers()
            try:
                driver.run()
            finally:
                driver.close()
            return 0
        if args.command == "copy":
            data = sys.stdin.buffer.read(args.limit + 1)
            if len(data) > args.limit:
                print(f"error: the content is over the limit of {args.limit} bytes; "
                      "clipboard unchanged", file=sys.stderr)
                return 1
            reply, _ = call(socket_path, {"op": "copy", "type": args.type}, data, timeout_s=30,
                            service="guest driver")
            return report(reply)
        if args.command == "paste":
            deadline = time.monotonic() + args.wait
            while True:
                header = {"op": "paste"} if args.type is None else {"op": "paste", "type": args.type}
                reply, body = call(socket_path, header, timeout_s=30,
                                   max_body=args.limit, service="guest driver")
                if reply.get("ok") or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            if not reply.get("ok"):
                return report(reply)
            sys.stdout.buffer.write(body)
            sys.stdout.buffer.flush()
            return 0
        if args.command == "send":
            found = scan_sources(args.paths, move=args.move)
            if found is None:
                return 1
            return wait_for_outcome(socket_path, {
                "op": "send", "move": args.move, "entries": found.entries, "files": found.files,
                "total_size": found.total_size}, paths_body(found), service="guest driver",
                announce=f"offering {summary(found)}; waiting for the host user")
        reply, _ = call(socket_path, {"op": "status"}, timeout_s=10, service="guest driver")
        if args.json or not reply.get("ok"):
            return report(reply, as_json=args.json)
        print(status_text(reply))
        return 0
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
