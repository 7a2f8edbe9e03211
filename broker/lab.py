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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / log_name).open("ab")
        self._logs.append(log)
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

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

    def start_guest(self, vm: str, *extra: str) -> None:
        self.guests[vm] = self._spawn(
            ["-m", "guestdrv", "run", "--device", str(self.region_path(vm)),
             "--socket", str(self.guest_socket(vm)), *extra], f"guest-{vm}.log")
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
