"""End-to-end gesture latency: copy gesture in VM a to paste delivered in VM b.

Host-process guests: a real broker (``python -m broker serve``) and two real
guest drivers (``python -m guestdrv run``) attached to the broker's
/dev/shm regions, all as subprocesses, with names unique to this run (shm
prefix ``ivclip-bench<pid>-``, sockets in a private temporary directory).

The clipboard is printable text (the drivers' default text policy refuses
other bytes), and the limits are raised to 17 MiB: the driver's envelope
counts against them, so a 16 MiB clipboard does not pass the default 16 MiB.

One sample: set guest a's clipboard (untimed, through its driver socket),
then time the broker's ``copy a`` request plus its ``paste b`` request, spoken
directly on the control socket; then read guest b's clipboard (untimed) and
compare it with what a held.  The clock is the client's: request sent to
reply received, for both gestures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from control.errors import ControlError
from control.sockets import request

BROKER_TIMEOUT_S = 30.0
# The driver wraps a clipboard in a small typed envelope (41 bytes for one text
# item) that counts against the limits, whose default is exactly 16 MiB: a
# 16 MiB clipboard needs a little more.
LIMIT = 17 << 20


@dataclass(frozen=True, slots=True)
class GestureResult:
    size: int
    samples: int
    p50_ms: float
    p99_ms: float
    copy_p50_ms: float
    paste_p50_ms: float
    status: str = "ok"


@contextlib.contextmanager
def _stack(region_size: str) -> Iterator[tuple[Path, Path, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="ivclip-bench-"))
    os.chmod(tmp, 0o700)
    prefix = f"ivclip-bench{os.getpid()}-"
    broker_sock, ga_sock, gb_sock = tmp / "broker.sock", tmp / "a.sock", tmp / "b.sock"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    log = open(tmp / "log.txt", "wb")  # noqa: SIM115 - closed below
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--vm", "a", "--vm", "b",
             "--socket", str(broker_sock), "--size", region_size, "--shm-prefix", prefix,
             "--unlink-on-exit", "--log-level", "warning", "--clipboard-limit", str(LIMIT)],
            stdout=log, stderr=log, env=env,
        ))
        _wait_for(lambda: broker_sock.exists(), "the broker's socket")
        for vm, sock in (("a", ga_sock), ("b", gb_sock)):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "guestdrv", "run", "--device", f"/dev/shm/{prefix}{vm}",
                 "--socket", str(sock), "--log-level", "warning", "--limit", str(LIMIT)],
                stdout=log, stderr=log, env=env,
            ))
        _wait_for(lambda: _attached(broker_sock), "both guests to attach")
        yield broker_sock, ga_sock, gb_sock
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        for vm in ("a", "b"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{prefix}{vm}")
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(ready: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def _attached(broker_sock: Path) -> bool:
    try:
        reply = request(broker_sock, {"op": "status"}, timeout_s=5, max_body=0).header
    except ControlError:
        return False
    return all(vm.get("state") == "attached" for vm in reply.get("vms", ())) and bool(
        reply.get("vms")
    )


def _ok(frame_header: dict[str, object], what: str) -> None:
    if not frame_header.get("ok"):
        raise RuntimeError(f"{what} refused: {frame_header.get('message')}")


def measure_gestures(sizes: Sequence[int], samples: int, region_size: str = "4M") -> list[GestureResult]:
    """p50/p99 of copy+paste gesture latency per clipboard size."""
    results = []
    try:
        stack = _stack(region_size)
        broker_sock, ga_sock, gb_sock = stack.__enter__()
    except (OSError, TimeoutError, ControlError) as exc:
        return [GestureResult(size, 0, float("nan"), float("nan"), float("nan"), float("nan"),
                              f"could not start broker and guests: {exc}") for size in sizes]
    try:
        for size in sizes:
            # Printable ASCII: valid text under the drivers' default (strict) text policy.
            content = (np.random.default_rng(size).integers(32, 127, size, dtype=np.uint8)).tobytes()
            totals, copies, pastes = [], [], []
            status = "ok"
            try:
                for i in range(samples):
                    data = content[:-8] + b"%08d" % i
                    head = request(ga_sock, {"op": "copy"}, data, timeout_s=30, max_body=0).header
                    _ok(head, "setting guest a's clipboard")
                    t0 = time.perf_counter()
                    head = request(broker_sock, {"op": "copy", "vm": "a"},
                                   timeout_s=BROKER_TIMEOUT_S, max_body=0).header
                    t1 = time.perf_counter()
                    _ok(head, "broker copy a")
                    head = request(broker_sock, {"op": "paste", "vm": "b"},
                                   timeout_s=BROKER_TIMEOUT_S, max_body=0).header
                    t2 = time.perf_counter()
                    _ok(head, "broker paste b")
                    got = request(gb_sock, {"op": "paste"}, timeout_s=30, max_body=size + 1)
                    if got.body != data:
                        raise RuntimeError("guest b's clipboard differs from what a copied")
                    copies.append(t1 - t0)
                    pastes.append(t2 - t1)
                    totals.append(t2 - t0)
            except (ControlError, RuntimeError) as exc:
                status = str(exc)
            ms = np.array(totals) * 1000
            results.append(GestureResult(
                size, len(totals),
                float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                float(np.percentile(ms, 99)) if len(ms) else float("nan"),
                float(np.median(copies)) * 1000 if copies else float("nan"),
                float(np.median(pastes)) * 1000 if pastes else float("nan"),
                status,
            ))
    finally:
        stack.__exit__(None, None, None)
    return results
