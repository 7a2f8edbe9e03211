"""Faults: killed drivers and brokers, faulty VMs, and region files changed under the broker.

What must hold: a failed transfer leaves the global clipboard as it was and
pastes nothing partial; a restarted broker brings no old content back and its
drivers re-attach on their own; a region file removed, replaced, re-owned,
truncated or grown under the broker gets a clear message and no crash (a
truncated file must not kill the broker with SIGBUS).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import FIGURES

from broker.lab import HostLab, trace_of
from control.sockets import request
from shm import layout
from shm.region import Region

BINARY = ("--type", "application/octet-stream")  # random bytes are no text for a strict driver

VMS = ["alice", "bob", "carol", "eve", "zed"]  # eve and zed have no driver
DRIVERS = ["alice", "bob", "carol"]
FAULTS: dict[str, int] = {}


def injected(kind: str, n: int = 1) -> None:
    FAULTS[kind] = FAULTS.get(kind, 0) + n
    FIGURES["faults injected"] = f"{sum(FAULTS.values())} ({FAULTS})"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostLab]:
    workdir = tmp_path_factory.mktemp("faults")
    with HostLab(VMS, workdir, size="1M", broker_args=["--timeout", "2"]) as lab:
        lab.start_broker()
        for vm in DRIVERS:
            lab.start_guest(vm)
        lab.wait_attached(DRIVERS)
        yield lab
        assert lab.broker is not None and lab.broker.poll() is None, "the broker died"
        assert "Traceback" not in lab.log_text("broker.log")


def fast_status(lab: HostLab) -> dict[str, Any]:
    """Status over the socket directly: milliseconds, not a process start."""
    return request(lab.socket, {"op": "status"}, timeout_s=5, max_body=0).header


def vm_state(lab: HostLab, vm: str) -> dict[str, Any]:
    return next(v for v in fast_status(lab)["vms"] if v["name"] == vm)


def wait_for(what: str, ready: Any, timeout: float = 15) -> None:
    HostLab._wait_for(ready, timeout, what, interval=0.02)


def exchange(lab: HostLab, source: str, target: str, content: bytes) -> None:
    assert lab.guest_cmd(source, "copy", *BINARY, input=content).returncode == 0
    copied = lab.broker_cmd("copy", source)
    assert copied.returncode == 0, copied.stderr
    pasted = lab.broker_cmd("paste", target)
    assert pasted.returncode == 0, pasted.stderr
    assert lab.guest_cmd(target, "paste").stdout == content


def gesture_in_thread(lab: HostLab, op: str, vm: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=lab.broker_cmd(op, vm)))
    thread.start()
    return thread, out


def test_a_faulty_vm_is_reinitialised_and_its_driver_reattaches(lab: HostLab) -> None:
    with Region.attach(lab.region_path("carol")) as region:
        old_session = region.mem.read(layout.SESSION_ID_OFF, 16)
        region.mem.store_u64(layout.G2H_TAIL_OFF, 1 << 63)  # under carol's running driver
        injected("garbage index under a live driver")
        wait_for("carol to be faulty", lambda: vm_state(lab, "carol")["state"] == "faulty")
        assert "producer index 9223372036854775808" in vm_state(lab, "carol")["last_fault"]
        assert "carol: marked faulty: producer index" in lab.log_text("broker.log")
        wait_for("carol's driver to re-attach", lambda: vm_state(lab, "carol")["state"] == "attached")
        assert region.mem.read(layout.SESSION_ID_OFF, 16) != old_session
    assert "detached: the broker re-initialised" in lab.log_text("guest-carol.log")
    exchange(lab, "carol", "bob", b"after the fault " + os.urandom(64))


def _kill_mid_transfer(lab: HostLab, op: str, vm: str, state: str) -> subprocess.CompletedProcess[str]:
    """Start `op vm`, SIGKILL vm's driver while the transfer is in `state`.

    The driver is kept stopped and let run in 2 ms slices: the transfer creeps
    forward, and its state is read while the driver is frozen, so the kill
    lands inside the transfer however fast the machine is.
    """
    pid = lab.guests[vm].pid
    os.kill(pid, signal.SIGSTOP)
    thread, out = gesture_in_thread(lab, op, vm)
    try:
        deadline = time.monotonic() + 30
        while vm_state(lab, vm)["transfer"] != state:
            assert thread.is_alive(), f"the {op} ended before the driver could be killed"
            assert time.monotonic() < deadline, f"{vm} never reached {state}"
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.01)
    finally:
        lab.stop_guest(vm, kill=True)
        thread.join(60)
    injected(f"driver SIGKILLed mid-{op}")
    result: subprocess.CompletedProcess[str] = out["result"]
    return result


def test_a_driver_killed_mid_copy_leaves_the_global_clipboard_as_it_was(lab: HostLab) -> None:
    before = b"the clipboard before " + os.urandom(2000)
    assert lab.guest_cmd("bob", "copy", *BINARY, input=before).returncode == 0
    assert lab.broker_cmd("copy", "bob").returncode == 0
    big = os.urandom(6 << 20)  # 50 chunks through a 1 MiB region: long enough to be caught
    assert lab.guest_cmd("alice", "copy", *BINARY, input=big).returncode == 0
    try:
        result = _kill_mid_transfer(lab, "copy", "alice", "receiving copy")
        assert result.returncode == 1 and "alice did not answer within 2 s" in result.stderr
        clip = fast_status(lab)["clipboard"]
        assert (clip["source"], clip["size"]) == ("bob", len(before))
        assert lab.broker_cmd("paste", "carol").returncode == 0
        assert lab.guest_cmd("carol", "paste").stdout == before  # not a byte of the partial copy
        for vm in ("bob", "carol", "eve"):
            assert trace_of(big[:1 << 16], lab.region_bytes(vm)) is None
    finally:
        lab.start_guest("alice")
        lab.wait_attached(["alice"])


def test_a_driver_killed_mid_paste_gets_nothing_partial_and_the_clipboard_is_kept(lab: HostLab) -> None:
    big = os.urandom(6 << 20)
    assert lab.guest_cmd("alice", "copy", *BINARY, input=big).returncode == 0
    assert lab.broker_cmd("copy", "alice").returncode == 0
    try:
        result = _kill_mid_transfer(lab, "paste", "bob", "sending paste")
        assert result.returncode == 1
        assert "bob did not confirm the paste within 2 s; global clipboard kept" in result.stderr
        clip = fast_status(lab)["clipboard"]
        assert (clip["source"], clip["size"]) == ("alice", len(big))
    finally:
        lab.start_guest("bob")
        lab.wait_attached(["bob"])
    nothing = lab.guest_cmd("bob", "paste")
    assert nothing.returncode == 1 and b"empty" in nothing.stderr  # nothing partial was installed
    assert lab.broker_cmd("paste", "carol").returncode == 0
    assert lab.guest_cmd("carol", "paste").stdout == big  # the kept clipboard is whole


def test_region_file_removed_replaced_and_reowned_under_the_broker(lab: HostLab) -> None:
    path = lab.region_path("eve")
    path.unlink()
    injected("region file removed")
    wait_for("the removal to be noticed", lambda: "was removed" in vm_state(lab, "eve")["region_problem"])
    assert f"eve: {path} was removed" in lab.log_text("broker.log")
    path.write_bytes(bytes(1 << 20))  # another file under the same name
    injected("region file replaced")
    wait_for("the replacement to be noticed",
             lambda: "replaced by another file" in vm_state(lab, "eve")["region_problem"])
    path.unlink()
    zed = lab.region_path("zed")
    os.chown(zed, 65534, -1)
    injected("region file given to another owner")
    try:
        wait_for("the new owner to be noticed",
                 lambda: "belongs to uid 65534" in vm_state(lab, "zed")["region_problem"])
    finally:
        os.chown(zed, os.geteuid(), -1)
    wait_for("zed's file to be ours again", lambda: vm_state(lab, "zed")["region_problem"] == "")
    exchange(lab, "alice", "bob", b"the others carry on " + os.urandom(64))  # and it is all no crash


@pytest.mark.parametrize("size", [0, 4096, 2 << 20], ids=["emptied", "truncated", "grown"])
def test_a_resized_region_file_is_a_fault_and_is_restored(lab: HostLab, size: int) -> None:
    path = lab.region_path("zed")
    faults = vm_state(lab, "zed")["faults"]
    os.truncate(path, size)
    injected("region file resized")
    wait_for("zed to be faulty", lambda: vm_state(lab, "zed")["faults"] > faults)
    assert f"resized from outside to {size} bytes" in vm_state(lab, "zed")["last_fault"]
    wait_for("zed's region to be restored", lambda: path.stat().st_size == 1 << 20
             and vm_state(lab, "zed")["state"] != "faulty")
    with path.open("rb") as f:
        assert f.read(8) == layout.MAGIC  # re-initialised


def test_truncating_in_a_loop_cannot_kill_the_broker_with_sigbus(lab: HostLab) -> None:
    """Truncate and re-grow zed's file as fast as possible while the broker reads it:
    some truncations land between its size check and its access, where only the
    SIGBUS guard stands."""
    path = lab.region_path("zed")
    rng = random.Random(3)
    # Make the broker read zed's ring on every round: play a guest that keeps a record published.
    with Region.attach(path) as region:
        region.mem.store_u64(layout.G2H_TAIL_OFF, 0)
    deadline = time.monotonic() + 3
    flips = 0
    while time.monotonic() < deadline:
        os.truncate(path, rng.choice((0, 4096, 8192)))
        time.sleep(rng.choice((0, 0, 0.0002, 0.001)))
        os.truncate(path, 1 << 20)
        flips += 1
    injected("truncations in a loop", flips)
    assert lab.broker is not None and lab.broker.poll() is None, "the broker died"
    log = lab.log_text("broker.log")
    FIGURES["truncation race"] = (
        f"{flips} truncations in 3 s: {log.count('resized from outside')} caught by the size check, "
        f"{log.count('hit a page past the end')} by the SIGBUS guard; broker alive")
    wait_for("zed to recover", lambda: vm_state(lab, "zed")["state"] != "faulty")
    exchange(lab, "alice", "bob", b"still serving " + os.urandom(64))


def test_a_restarted_broker_brings_nothing_back_and_drivers_reattach(tmp_path: Path) -> None:
    with HostLab(["alice", "bob"], tmp_path, size="1M", broker_args=["--timeout", "2"]) as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm)
        lab.wait_attached(["alice", "bob"])
        secret = b"secret before the crash " + os.urandom(3000)
        assert lab.guest_cmd("alice", "copy", *BINARY, input=secret).returncode == 0
        assert lab.broker_cmd("copy", "alice").returncode == 0  # in the global clipboard now
        assert lab.broker is not None
        lab.broker.send_signal(signal.SIGKILL)
        lab.broker.wait(10)
        injected("broker SIGKILLed")
        # The dead broker could not wipe: the secret is still in alice's ring...
        assert trace_of(secret, lab.region_bytes("alice")) is not None
        lab.socket.unlink()  # left behind by the dead broker
        lab.start_broker()
        lab.wait_attached(["alice", "bob"])  # the drivers re-attached on their own
        # ... and the new broker zeroed every region before anything else.
        for vm in ("alice", "bob"):
            assert trace_of(secret, lab.region_bytes(vm)) is None, vm
        assert lab.status()["clipboard"] == {"empty": True}
        result = lab.broker_cmd("paste", "bob")
        assert result.returncode == 1 and "nothing to paste" in result.stderr
        nothing = lab.guest_cmd("bob", "paste")
        assert nothing.returncode == 1 and b"empty" in nothing.stderr
        # Restarted drivers re-attach too.
        lab.stop_guest("bob", kill=True)
        lab.start_guest("bob")
        injected("driver SIGKILLed and restarted")
        lab.wait_attached(["bob"])
        exchange(lab, "alice", "bob", b"after the restart " + os.urandom(64))


@pytest.mark.parametrize("problem", ["wrong size", "wrong owner"])
def test_a_bad_region_file_at_start_is_refused_clearly(tmp_path: Path, problem: str) -> None:
    prefix = f"ivclip-t{os.getpid()}-start-"
    path = Path("/dev/shm") / f"{prefix}zed"
    path.write_bytes(bytes(4096 if problem == "wrong size" else 1 << 20))
    if problem == "wrong owner":
        os.chown(path, 65534, -1)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--vm", "zed", "--size", "1M", "--shm-prefix", prefix,
             "--socket", str(tmp_path / "b.sock"), "--audit-log", str(tmp_path / "audit.log")],
            capture_output=True, text=True, timeout=30)
    finally:
        path.unlink()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = "exists with 4096 bytes, not 1048576" if problem == "wrong size" else "belongs to uid 65534"
    assert expected in proc.stderr
