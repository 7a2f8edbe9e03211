"""``python -m broker`` / ``ivclip-broker``: serve, gestures, status, attach help, demo."""

from __future__ import annotations

import argparse
import grp
import hashlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker import sway
from broker.attach import libvirt_xml, qemu_args
from broker.errors import ConfigError
from broker.hotkeys import (
    DEFAULT_COPY,
    DEFAULT_FOCUS_GUARD_S,
    DEFAULT_PASTE,
    HotkeyDaemon,
    broker_sender,
    check_x11_session,
    focused_vm,
    parse_combo,
)
from broker.names import HOST, check_vm_name
from broker.notify import Notifier
from broker.policy import ALLOW_ALL, load_policy
from broker.service import DEFAULT_CLIPBOARD_LIMIT, DEFAULT_TIMEOUT_S, Broker, BrokerConfig
from broker.windows import DEFAULT_RULES, WindowRule, load_rules
from control.cli import LOG_LEVELS, call, parse_command_line, parse_size, positive_size, report, setup_logging
from control.errors import ControlError
from control.progress import files_phrase, human_size
from control.sockets import InstanceLock, runtime_dir
from filexfer.cli import paths_body, scan_sources, summary, wait_for_outcome
from filexfer.receiver import default_incoming
from protocol.channel import capabilities_label
from shm import layout
from shm.errors import RegionError

GESTURE_MARGIN_S = 130.0


log = logging.getLogger(__name__)

SOCKET_ENV = "IVCLIP_BROKER_SOCKET"


def default_socket() -> Path:
    """$IVCLIP_BROKER_SOCKET if set, else $XDG_RUNTIME_DIR/ivclip/broker.sock."""
    return Path(os.environ.get(SOCKET_ENV) or runtime_dir() / "broker.sock")


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket()


def _region_size(text: str) -> int:
    size = parse_size(text)
    if not layout.valid_region_size(size):
        raise argparse.ArgumentTypeError(
            f"region size {text} must be a power of two between 1M and 1G (default 4M)"
        )
    return size


def _vm_name(text: str) -> str:
    try:
        return check_vm_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target(text: str) -> str:
    return text if text == HOST else _vm_name(text)


def _offer_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an offer number (1, 2, ... as status shows them)")
    return int(text)


def _shm_prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"shm prefix {text!r} must be letters, digits, '.', '-', '_'")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _group(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def _milliseconds(text: str) -> int:
    if not text.isdigit() or int(text) > 60_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds from 0 to 60000")
    return int(text)


def _rules(path: Path | None) -> list[WindowRule]:
    return list(DEFAULT_RULES) if path is None else load_rules(path)


def _hotkeys(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    socket_path = _socket(args)
    if not socket_path.exists():
        log.warning("no broker listens on %s yet: gestures fail until one does", socket_path)
    daemon: HotkeyDaemon | sway.SwayHotkeys
    lock: InstanceLock | None = None
    if os.environ.get("WAYLAND_DISPLAY") and os.environ.get("SWAYSOCK"):
        if (args.copy, args.paste) != (DEFAULT_COPY, DEFAULT_PASTE):
            raise ConfigError("under sway the keys are bound in sway's config "
                              "('bindsym Ctrl+Shift+c nop ivclip copy', see the README); "
                              "--copy and --paste are for X11")
        # No grab stops a second daemon here, and both would act on every binding.
        digest = hashlib.sha256(os.environ["SWAYSOCK"].encode()).hexdigest()[:16]
        lock = InstanceLock(runtime_dir() / f"hotkeys-sway-{digest}.lock")
        lock.acquire("hotkeys daemon for this sway session")
        daemon = sway.SwayHotkeys(
            socket_path=os.environ["SWAYSOCK"], rules=_rules(args.window_map),
            send=broker_sender(socket_path), notifier=Notifier(enabled=not args.no_notify),
            focus_guard_s=args.focus_guard_ms / 1000)
    else:
        daemon = HotkeyDaemon(
            display_name=check_x11_session(), rules=_rules(args.window_map),
            send=broker_sender(socket_path), notifier=Notifier(enabled=not args.no_notify),
            copy=parse_combo(args.copy), paste=parse_combo(args.paste),
            focus_guard_s=args.focus_guard_ms / 1000)
    daemon.install_signal_handlers()
    try:
        daemon.run()
    finally:
        daemon.close()
        if lock is not None:
            lock.release()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        description="ivclip host broker: a gated clipboard between VMs over ivshmem.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", help="control socket (default: $IVCLIP_BROKER_SOCKET, else "
                                        "$XDG_RUNTIME_DIR/ivclip/broker.sock)")
        return p

    serve = with_socket(sub.add_parser("serve", help="run the broker for some VMs"))
    serve.add_argument("--vm", action="append", type=_vm_name, required=True,
                       help="a VM to serve (repeat for each VM)")
    serve.add_argument("--size", type=_region_size, default=layout.DEFAULT_REGION_SIZE,
                       help="region size per VM, a power of two >= 1M (default 4M)")
    serve.add_argument("--clipboard-limit", type=positive_size, default=DEFAULT_CLIPBOARD_LIMIT,
                       help="largest clipboard accepted (default 16M)")
    serve.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S,
                       help="seconds a VM may stay silent during a gesture (default 5)")
    serve.add_argument("--shm-group", type=_group,
                       help="group of the /dev/shm files (e.g. the group QEMU runs as); "
                            "makes them mode 0660")
    serve.add_argument("--shm-prefix", default="ivclip-", type=_shm_prefix,
                       help="name prefix of the /dev/shm files (default ivclip-: /dev/shm/ivclip-VM)")
    serve.add_argument("--unlink-on-exit", action="store_true",
                       help="remove the /dev/shm files on exit (running VMs keep a dead copy)")
    serve.add_argument("--config", type=Path, metavar="PATH",
                       help="policy file (TOML): who may paste where, size limits, the default; "
                            "without it every paste is allowed")
    serve.add_argument("--audit-log", type=Path, metavar="PATH",
                       help="append one JSON line per gesture and outcome here "
                            "(default: $XDG_RUNTIME_DIR/ivclip/audit.log)")
    serve.add_argument("--clipboard-ttl", type=_seconds, metavar="SECONDS",
                       help="wipe the global clipboard if nobody pastes it within SECONDS")
    serve.add_argument("--incoming", type=Path, default=default_incoming(),
                       help="where files approved --to host arrive, under a folder per VM "
                            "(default ~/ivclip-incoming)")
    serve.add_argument("--allow-unsafe-names", action="store_true",
                       help="accept incoming names with control or bidirectional characters or "
                            "invalid UTF-8 (never a path escape)")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    for name, text in (("copy", "copy gesture: take VM's clipboard into the global clipboard"),
                       ("paste", "paste gesture: hand the global clipboard to VM, then wipe it")):
        p = with_socket(sub.add_parser(name, help=text))
        p.add_argument("vm", type=_vm_name, nargs="?", help="the VM (or --focused)")
        p.add_argument("--focused", action="store_true",
                       help="the VM whose viewer window has the focus (X11, or sway on Wayland)")
        p.add_argument("--window-map", type=Path, metavar="FILE",
                       help="TOML rules mapping window class and title to VMs (see broker.windows)")
        p.add_argument("--notify", action="store_true",
                       help="also show the outcome as a desktop notification (for shortcut bindings)")

    keys = with_socket(sub.add_parser(
        "hotkeys", help="gestures from key combinations: grabbed on the host X server, or bound in "
                   "sway's config (see broker.sway)"))
    keys.add_argument("--copy", default=DEFAULT_COPY, metavar="COMBO",
                      help=f"copy gesture combination (default {DEFAULT_COPY}; 'none' disables it)")
    keys.add_argument("--paste", default=DEFAULT_PASTE, metavar="COMBO",
                      help=f"paste gesture combination (default {DEFAULT_PASTE}; 'none' disables it)")
    keys.add_argument("--focus-guard-ms", type=_milliseconds, default=int(DEFAULT_FOCUS_GUARD_S * 1000),
                      metavar="MS", help="refuse a paste into a window focused less than MS ago "
                                         "(default 500; 0 turns the guard off)")
    keys.add_argument("--window-map", type=Path, metavar="FILE",
                      help="TOML rules mapping window class and title to VMs (see broker.windows)")
    keys.add_argument("--no-notify", action="store_true", help="log outcomes instead of notifying")
    keys.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    approve = with_socket(sub.add_parser(
        "approve", help="file gesture: let VM's pending file offer go to a VM or the host"))
    approve.add_argument("vm", type=_vm_name)
    approve.add_argument("--to", required=True, metavar="TARGET", type=_target,
                         help=f"the VM that receives the files, or '{HOST}'")
    approve.add_argument("--offer", type=_offer_number, metavar="N",
                         help="approve only if the pending offer is still #N (as status shows it)")
    approve.add_argument("--json", action="store_true", help="print the outcome as JSON")
    reject = with_socket(sub.add_parser("reject", help="refuse VM's pending file offer"))
    reject.add_argument("vm", type=_vm_name)
    send = with_socket(sub.add_parser("send", help="file gesture: send host files and directories to VM"))
    send.add_argument("vm", type=_vm_name)
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--move", action="store_true",
                      help="delete the sources once VM confirmed that every file arrived intact")
    send.add_argument("--json", action="store_true", help="print the outcome as JSON")

    status = with_socket(sub.add_parser("status", help="show VMs, the global clipboard and file offers"))
    status.add_argument("--json", action="store_true", help="machine-readable output")

    for name, text in (("qemu-args", "print the QEMU options that attach VM's region"),
                       ("libvirt-xml", "print the libvirt <shmem> element for VM")):
        p = sub.add_parser(name, help=text)
        p.add_argument("vm", type=_vm_name)
        p.add_argument("--size", type=_region_size, default=layout.DEFAULT_REGION_SIZE)
        p.add_argument("--shm-prefix", default="ivclip-", type=_shm_prefix)

    demo = sub.add_parser("demo", help="run the gated copy-paste with three guests")
    demo.add_argument("--qemu", action="store_true",
                      help="use three real QEMU guests instead of host processes")
    demo.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    return parser


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if len(set(args.vm)) != len(args.vm):
        twice = sorted({vm for vm in args.vm if args.vm.count(vm) > 1})
        print(f"error: a VM is named twice: {', '.join(twice)}", file=sys.stderr)
        return 2
    try:
        policy = ALLOW_ALL if args.config is None else load_policy(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = BrokerConfig(
        vms=args.vm,
        socket_path=_socket(args),
        region_size=args.size,
        shm_prefix=args.shm_prefix,
        clipboard_limit=args.clipboard_limit,
        timeout_s=args.timeout,
        unlink_on_exit=args.unlink_on_exit,
        shm_mode=0o600 if args.shm_group is None else 0o660,
        shm_group=args.shm_group,
        policy=policy,
        audit_path=args.audit_log or runtime_dir() / "audit.log",
        clipboard_ttl_s=args.clipboard_ttl,
        incoming=args.incoming.absolute(),
        allow_unsafe_names=args.allow_unsafe_names,
    )
    broker = Broker(config)
    try:
        broker.start()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ControlError, RegionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    broker.install_signal_handlers()
    try:
        broker.run()
    finally:
        broker.close()
    return 0


def _print_status(reply: dict[str, Any]) -> None:
    print(f"{'VM':<16} {'STATE':<16} {'HEARTBEAT':>9} {'CAPS':<5} {'TRANSFER':<22} {'DROPPED':>7}  FAULT")
    for vm in reply.get("vms", []):
        age = vm["heartbeat_age_s"]
        caps_text = capabilities_label(vm["capabilities"])
        print(f"{vm['name']:<16} {vm['state']:<16} {'-' if age is None else f'{age:.1f}s':>9} "
              f"{caps_text:<5} {vm['transfer']:<22} {vm['dropped']:>7}  "
              f"{vm['last_fault'] or vm.get('region_problem') or '-'}")
    clip = reply.get("clipboard", {})
    if clip.get("empty", True):
        print("global clipboard: empty")
    else:
        expiry = f", wiped in {clip['expires_in_s']:.0f} s unless pasted" if "expires_in_s" in clip else ""
        print(f"global clipboard: {clip['size']} bytes from {clip['source']}, "
              f"copied {clip['age_s']:.0f} s ago{expiry}")
    _print_files(reply.get("files", {}))


def _print_files(files: dict[str, Any]) -> None:
    """Offers and transfers.  Names arrive escaped by the broker (protocol.filestream.display)."""
    for offer in files.get("offers", []):
        names = ", ".join(f"'{n}'" for n in offer["names"])
        more = offer["roots"] - len(offer["names"])
        if more:
            names += f" and {more} more"
        counts = files_phrase(offer["files"], offer["entries"])
        size = human_size(offer["total_size"])
        print(f"file offer #{offer['offer']} from {offer['vm']}: {counts}, {size}"
              f"{', --move' if offer['move'] else ''}: {names} ({offer['age_s']:.0f} s ago)")
        print(f"    approve with: python -m broker approve {offer['vm']} --to <VM or host> "
              f"--offer {offer['offer']}   (or: reject {offer['vm']})")
    for t in files.get("transfers", []):
        print(f"file transfer {t['source']} -> {t['target']}: {t['entries']}/{t['entries_total']} entries, "
              f"{human_size(t['bytes'])}/{human_size(t['bytes_total'])}, {t['age_s']:.0f} s")


def focused_session_vm(rules: list[WindowRule], environ: Mapping[str, str] = os.environ) -> str:
    """The VM of the focused window: through sway's IPC in a sway session, else through X11.

    Raises:
        ConfigError: no way to know the focused window here, or it belongs to no VM.
    """
    if environ.get("WAYLAND_DISPLAY") and environ.get("SWAYSOCK"):
        return sway.focused_vm(environ["SWAYSOCK"], rules)
    return focused_vm(check_x11_session(environ), rules)


def _gesture(args: argparse.Namespace, socket_path: Path, notifier: Notifier) -> int:
    """Send one copy or paste gesture; print (and optionally notify) the outcome.

    Raises:
        ConfigError: --focused and the focused window belongs to no VM, or no X11 session.
    """
    vm = focused_session_vm(_rules(args.window_map)) if args.focused else args.vm
    started = time.monotonic()
    reply, _ = call(socket_path, {"op": args.command, "vm": vm},
                    timeout_s=GESTURE_MARGIN_S, service="broker")
    reply.setdefault("elapsed_s", round(time.monotonic() - started, 3))
    notifier.notify(f"ivclip {args.command}", str(reply.get("message") or "no answer"),
                    ok=bool(reply.get("ok")))
    return report(reply)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "qemu-args":
            print(shlex.join(qemu_args(args.vm, args.size, args.shm_prefix)))
            return 0
        if args.command == "libvirt-xml":
            print(libvirt_xml(args.vm, args.size, args.shm_prefix))
            return 0
        if args.command == "demo":
            from broker.demo import run_demo

            return run_demo(qemu=args.qemu, log_level=args.log_level)
        if args.command == "hotkeys":
            return _hotkeys(args)
        socket_path = _socket(args)
        if args.command == "status":
            reply, _ = call(socket_path, {"op": "status"}, timeout_s=10, service="broker")
            if args.json or not reply.get("ok"):
                return report(reply, as_json=args.json)
            _print_status(reply)
            return 0
        if args.command == "approve":
            header: dict[str, Any] = {"op": "approve", "vm": args.vm, "to": args.to}
            if args.offer is not None:
                header["offer"] = args.offer
            return wait_for_outcome(socket_path, header, service="broker", as_json=args.json)
        if args.command == "send":
            found = scan_sources(args.paths, move=args.move)
            if found is None:
                return 1
            return wait_for_outcome(socket_path, {
                "op": "send", "vm": args.vm, "move": args.move, "entries": found.entries,
                "files": found.files, "total_size": found.total_size}, paths_body(found), service="broker",
                as_json=args.json, announce=f"sending {summary(found)} to {args.vm}")
        if args.command == "reject":
            reply, _ = call(socket_path, {"op": "reject", "vm": args.vm},
                            timeout_s=GESTURE_MARGIN_S, service="broker")
            return report(reply)
        if args.focused and args.vm is not None:
            print(f"error: give a VM or --focused, not both (python -m broker {args.command} VM)",
                  file=sys.stderr)
            return 2
        if not args.focused and args.vm is None:
            print(f"error: name the VM or give --focused (python -m broker {args.command} VM)",
                  file=sys.stderr)
            return 2
        notifier = Notifier(enabled=args.notify, log_outcomes=False)
        try:
            return _gesture(args, socket_path, notifier)
        except (ControlError, ConfigError) as exc:
            notifier.notify(f"ivclip {args.command}", str(exc), ok=False)
            raise
        except SystemExit:  # call() printed why the broker could not be reached
            notifier.notify(f"ivclip {args.command}", "the broker is not reachable", ok=False)
            raise
        finally:
            notifier.close()
    except (ControlError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
