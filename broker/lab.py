"""A broker and host-process guests for demos, tests and benchmarks.

:class:`HostLab` runs the real command lines (``python -m broker serve``,
``python -m guestdrv run --device /dev/shm/...``) as subprocesses, with
private socket paths and a private shm prefix so that it never touches a
broker the user runs.  Everything it starts is stopped by :meth:`close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from shm.region import SHM_DIR


def trace_of(content: bytes, haystack: bytes, window: int = 16) -> str | None:
    """Describe any trace of `content` in `haystack`: the whole, or any `window`-byte slice.

    Slices are taken every `window // 2` bytes, so any run of `window * 1.5`
    bytes of the content that appears is found.  Only the parts of the
    haystack near non-zero bytes are searched (an all-zero window cannot hold a
    slice that is not one repeated byte), which keeps a scan of a mostly idle
    region fast.
    """
    if content and content in haystack:
        return "the whole content"
    if len(content) < window:
        return None
    step = max(1, window // 2)
    pieces: dict[bytes, int] = {}
    for start in range(0, len(content) - window + 1, step):
        piece = content[start : start + window]
        if piece.count(piece[:1]) != len(piece):  # a run of one byte value says nothing
            pieces.setdefault(piece, start)
    for run in re.finditer(rb"[^\x00]+", haystack):
        for at in range(max(0, run.start() - window + 1), run.end()):
            found = pieces.get(haystack[at : at + window])
            if found is not None:
                return f"{window} bytes of it (content offset {found}) at region offset {at}"
    return None


class HostLab:
    def __init__(self, vms: list[str], workdir: Path, *, size: str = "4M",
                 broker_args: list[str] | None = None) -> None:
        self.vms = vms
        self.workdir = workdir
        self.size = size
        self.prefix = f"ivclip-lab{os.getpid()}-{os.urandom(3).hex()}-"
        self.socket = workdir / "broker.sock"
        self.broker_args = broker_args or []
        self.broker: subprocess.Popen[bytes] | None = None
        self.guests: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    # Processes -------------------------------------------------------------
    def _spawn(self, args: list[str], log_name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / log_name).open("ab")
        self._logs.append(log)
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)

    def region_path(self, vm: str) -> Path:
        return SHM_DIR / f"{self.prefix}{vm}"

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.log"

    def guest_socket(self, vm: str) -> Path:
        return self.workdir / f"guest-{vm}.sock"

    def start_broker(self) -> None:
        args = ["-m", "broker", "serve", "--socket", str(self.socket), "--size", self.size,
                "--shm-prefix", self.prefix, "--unlink-on-exit", "--audit-log", str(self.audit_path),
                *self.broker_args]
        for vm in self.vms:
            args += ["--vm", vm]
        self.broker = self._spawn(args, "broker.log")
        self._wait_for(lambda: self.socket.exists(), 20, "the broker's socket")

    def start_guest(self, vm: str, *extra: str, env: dict[str, str] | None = None) -> None:
        """Start `vm`'s driver; `env` replaces the environment (e.g. its own DISPLAY).

        Raises:
            RuntimeError: `vm`'s driver is running already (it would be left behind).
        """
        running = self.guests.get(vm)
        if running is not None and running.poll() is None:
            raise RuntimeError(f"{vm}'s driver is running already; stop it first")
        self.guests[vm] = self._spawn(
            ["-m", "guestdrv", "run", "--device", str(self.region_path(vm)),
             "--socket", str(self.guest_socket(vm)), *extra], f"guest-{vm}.log", env)
        self._wait_for(lambda: self.guest_socket(vm).exists(), 20, f"{vm}'s driver socket")

    def stop_guest(self, vm: str, *, kill: bool = False) -> None:
        proc = self.guests.pop(vm)
        if kill:
            proc.kill()
        else:
            proc.terminate()
        proc.wait(10)

    def close(self) -> None:
        for vm in list(self.guests):
            with contextlib.suppress(Exception):
                self.stop_guest(vm)
        if self.broker is not None:
            self.broker.terminate()
            try:
                self.broker.wait(10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
            self.broker = None
        for vm in self.vms:  # only if the broker died without cleaning up
            with contextlib.suppress(FileNotFoundError):
                self.region_path(vm).unlink()
        for log in self._logs:
            log.close()

    def __enter__(self) -> HostLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Commands --------------------------------------------------------------
    def broker_cmd(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        """Run `python -m broker ARGS --socket ...` and return its result."""
        return subprocess.run([sys.executable, "-m", "broker", *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, timeout=timeout)

    def guest_cmd(self, vm: str, *args: str, input: bytes = b"",
                  timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "guestdrv", *args, "--socket", str(self.guest_socket(vm))],
            input=input, capture_output=True, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.broker_cmd("status", "--json", timeout=20)
        if result.returncode:
            raise RuntimeError(f"broker status failed: {result.stderr.strip()}")
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def wait_attached(self, vms: list[str], timeout: float = 30) -> None:
        def attached() -> bool:
            states = {vm["name"]: vm["state"] for vm in self.status()["vms"]}
            return all(states.get(vm) == "attached" for vm in vms)

        self._wait_for(attached, timeout, f"{', '.join(vms)} to attach", interval=0.2)

    def region_bytes(self, vm: str) -> bytes:
        return self.region_path(vm).read_bytes()

    def log_text(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _wait_for(ready: Any, timeout: float, what: str, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)


class _ServerProcess:
    """A helper server process the lab starts: ended on close, a context manager."""

    proc: subprocess.Popen[bytes]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class XServer(_ServerProcess):
    """A private Xvfb display (each host-process guest gets its own, as a VM would).

    ``-noreset``: by default the server resets when its last client leaves, and a
    client connecting during that reset has its connection reset.

    Raises (on start):
        RuntimeError: Xvfb is missing or did not come up.
    """

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-nolisten", "tcp", "-noreset",
                 "-screen", "0", "640x480x24"],
                pass_fds=[write_fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read_fd)
            raise RuntimeError(f"cannot run Xvfb: {exc.strerror or exc}") from exc
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            number = pipe.readline().strip()  # written once the server accepts clients
        if not number.isdigit():
            self.close()
            raise RuntimeError("Xvfb did not report its display number")
        self.display = f":{number.decode()}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this display (no Wayland, no other display)."""
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        return {**env, "DISPLAY": self.display, **extra}



class SwaySession(_ServerProcess):
    """A private headless sway (a Wayland host desktop) with its IPC socket.

    sway refuses to run as root, so as root it runs as `nobody`, in a runtime
    folder of its own under /tmp (a test's folder is root's alone); clients
    started by root can still reach its sockets.

    Raises (on start):
        RuntimeError: sway is missing or did not come up.
    """

    def __init__(self, workdir: Path, config: str = "") -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="ivclip-sway-"))
        (self.runtime / "config").write_text(config)
        (self.runtime / "config").chmod(0o644)
        as_nobody: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.runtime, 65534, 65534)
            as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.runtime),
               "XDG_RUNTIME_DIR": str(self.runtime), "WLR_BACKENDS": "headless",
               "WLR_LIBINPUT_NO_DEVICES": "1", "WLR_RENDERER": "pixman"}
        self._log = (workdir / "sway.log").open("ab")
        try:
            self.proc = subprocess.Popen([*as_nobody, "sway", "-c", str(self.runtime / "config")],
                                         env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
        except OSError as exc:
            self._log.close()
            raise RuntimeError(f"cannot run sway: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + 20
        while not (self._socket("wayland-*[0-9]") and self._socket("sway-ipc.*.sock")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"sway did not come up (see {workdir / 'sway.log'})")
            time.sleep(0.05)
        self.wayland_display = self._socket("wayland-*[0-9]")
        self.ipc_socket = str(self.runtime / self._socket("sway-ipc.*.sock"))

    def _socket(self, pattern: str) -> str:
        found = sorted(path.name for path in self.runtime.glob(pattern) if path.is_socket())
        return found[0] if found else ""

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this session (no X display)."""
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SWAYSOCK")}
        return {**env, "WAYLAND_DISPLAY": self.wayland_display, "XDG_RUNTIME_DIR": str(self.runtime),
                "SWAYSOCK": self.ipc_socket, **extra}

    def command(self, command: str) -> None:
        """Run a sway command (swaymsg), e.g. '[app_id="foot"] focus'.

        Raises:
            RuntimeError: sway refused it.
        """
        result = subprocess.run(["swaymsg", "-s", self.ipc_socket, command], capture_output=True,
                                text=True, timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"swaymsg {command!r}: {result.stdout.strip()} {result.stderr.strip()}")

    def close(self) -> None:
        super().close()
        self._log.close()
        shutil.rmtree(self.runtime, ignore_errors=True)


class DesktopSession(Protocol):
    """An X server or a compositor: what a guest's driver needs of its desktop."""

    def env(self) -> dict[str, str]: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=DesktopSession)


@contextlib.contextmanager
def guests_in_sessions(guests: dict[str, list[str]], workdir: Path,
                       session: Callable[[], S]) -> Iterator[tuple[HostLab, dict[str, S]]]:
    """A broker and host-process guests (VM name -> driver options), each driver in a desktop
    session of its own made by `session()`, all attached; everything stopped afterwards."""
    sessions: dict[str, S] = {}
    try:
        for vm in guests:
            sessions[vm] = session()
        with HostLab(list(guests), workdir, size="4M") as lab:
            lab.start_broker()
            for vm, args in guests.items():
                lab.start_guest(vm, *args, env=sessions[vm].env())
            lab.wait_attached(list(guests))
            yield lab, sessions
    finally:
        for running in sessions.values():
            running.close()


class SessionBus:
    """A private D-Bus session bus (dbus-daemon), so tests never touch the user's desktop.

    Raises (on start):
        RuntimeError: dbus-daemon is missing or did not come up.
    """

    def __init__(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise RuntimeError(f"cannot run dbus-daemon: {exc.strerror or exc}") from exc
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().decode().strip()
        if not self.address:
            self.close()
            raise RuntimeError("dbus-daemon did not print its address")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> SessionBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NotificationReceiver:
    """A minimal org.freedesktop.Notifications service on a bus, recording every Notify call.

    Runs in a thread of the calling process; `received` holds (summary, body, urgency).
    """

    def __init__(self, bus_address: str) -> None:
        import threading

        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection

        self.received: list[tuple[str, str, int]] = []
        self._conn = open_dbus_connection(bus=bus_address)
        granted = self._conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.Notifications"))
        if granted.body != (1,):  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
            raise RuntimeError(f"could not own the notifications name: {granted.body}")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from jeepney import MessageType, new_error, new_method_return

        while not self._stopping.is_set():
            try:
                msg = self._conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            except OSError:
                return
            if msg.header.message_type is not MessageType.method_call:
                continue
            from jeepney import HeaderFields

            member = msg.header.fields.get(HeaderFields.member)
            if member == "Notify":
                _app, _replaces, _icon, summary, body, _actions, hints, _expire = msg.body
                self.received.append((summary, body, int(hints.get("urgency", ("y", 1))[1])))
                self._conn.send(new_method_return(msg, "u", (len(self.received),)))
            else:
                self._conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))

    def wait_for(self, count: int, timeout: float = 20) -> list[tuple[str, str, int]]:
        """The notifications once there are at least `count` (fewer after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._conn.close()
