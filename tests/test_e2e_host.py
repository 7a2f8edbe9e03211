"""End to end on the host: the real broker and guest drivers as processes.

alice, bob and mallory run real drivers on /dev/shm regions; eve has no
driver: the test plays a hostile eve by writing into eve's region directly.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.lab import HostLab, trace_of
from protocol.messages import DataBegin, DataChunk, DataEnd, encode
from shm import layout
from shm.region import Region, read_identity
from shm.ring import RingProducer

VMS = ["alice", "bob", "mallory", "eve"]
BINARY = ("--type", "application/octet-stream")  # random bytes are no text for a strict driver
DRIVERS = ["alice", "bob", "mallory"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostLab]:
    workdir = tmp_path_factory.mktemp("lab")
    with HostLab(VMS, workdir, size="1M", broker_args=["--timeout", "2"]) as lab:
        lab.start_broker()
        for vm in DRIVERS:
            lab.start_guest(vm)
        lab.wait_attached(DRIVERS)
        yield lab


def random_content() -> bytes:
    text = f"pass {secrets.token_hex(8)} — █ ✓ ünïcødé\r\nline two\r\n".encode()
    return text + os.urandom(secrets.randbelow(3000) + 1) + text


def assert_mallory_clean(lab: HostLab, content: bytes) -> None:
    found = trace_of(content, lab.region_bytes("mallory"))
    assert found is None, f"mallory's region holds {found}"


def gesture(lab: HostLab, op: str, vm: str) -> tuple[int, str]:
    result = lab.broker_cmd(op, vm)
    return result.returncode, (result.stdout + result.stderr).strip()


def test_four_stages_move_exact_bytes_and_mallory_learns_nothing(lab: HostLab) -> None:
    content = random_content()
    copied = lab.guest_cmd("alice", "copy", *BINARY, input=content)
    assert copied.returncode == 0, copied.stderr
    assert_mallory_clean(lab, content)

    code, line = gesture(lab, "copy", "alice")
    assert (code, line) == (0, f"copied {len(content)} bytes from alice (application/octet-stream)")
    assert_mallory_clean(lab, content)
    clip = lab.status()["clipboard"]
    assert clip["source"] == "alice" and clip["size"] == len(content)
    assert content.hex() not in str(lab.status())

    code, line = gesture(lab, "paste", "bob")
    assert (code, line) == (0, f"pasted {len(content)} bytes to bob, global clipboard wiped")
    assert_mallory_clean(lab, content)
    assert lab.status()["clipboard"] == {"empty": True}

    pasted = lab.guest_cmd("bob", "paste")
    assert pasted.returncode == 0 and pasted.stdout == content
    mallory = lab.guest_cmd("mallory", "paste")
    assert mallory.returncode == 1 and b"empty" in mallory.stderr
    assert_mallory_clean(lab, content)


def test_paste_with_nothing_copied_says_so(lab: HostLab) -> None:
    code, line = gesture(lab, "paste", "bob")
    assert code == 1 and line == "nothing to paste: the global clipboard is empty"


def test_copy_of_an_empty_guest_clipboard_is_refused(lab: HostLab) -> None:
    code, line = gesture(lab, "copy", "mallory")
    assert code == 1 and "clipboard is empty" in line
    assert lab.status()["clipboard"] == {"empty": True}


def test_large_content_travels_in_chunks_through_a_small_region(lab: HostLab) -> None:
    content = os.urandom(3 << 20)  # three times the whole 1 MiB region
    assert lab.guest_cmd("alice", "copy", *BINARY, input=content).returncode == 0
    assert gesture(lab, "copy", "alice")[0] == 0
    assert gesture(lab, "paste", "bob")[0] == 0
    assert lab.guest_cmd("bob", "paste").stdout == content
    assert_mallory_clean(lab, content)


def test_content_of_exactly_the_limit_travels(lab: HostLab) -> None:
    content = os.urandom(16 << 20)  # the default limit on content; the container adds a little
    assert lab.guest_cmd("alice", "copy", *BINARY, input=content).returncode == 0
    code, line = gesture(lab, "copy", "alice")
    assert code == 0, line
    assert gesture(lab, "paste", "bob")[0] == 0
    assert lab.guest_cmd("bob", "paste").stdout == content


def test_content_over_the_limit_is_refused_and_the_global_clipboard_wiped(lab: HostLab) -> None:
    small = random_content()
    assert lab.guest_cmd("alice", "copy", *BINARY, input=small).returncode == 0
    assert gesture(lab, "copy", "alice")[0] == 0
    # bob's driver takes anything up to 16 MiB; the broker's limit is 16 MiB too.
    big = os.urandom((16 << 20) + 1)
    assert lab.guest_cmd("bob", "copy", *BINARY, input=big).returncode == 1  # the guest CLI refuses
    lab.stop_guest("bob")
    lab.start_guest("bob", "--limit", "32M")
    lab.wait_attached(["bob"])
    stored = lab.guest_cmd("bob", "copy", *BINARY, "--limit", "32M", input=big)
    assert stored.returncode == 0, stored.stderr
    code, line = gesture(lab, "copy", "bob")
    assert code == 1 and "over the limit" in line and "wiped" in line
    assert lab.status()["clipboard"] == {"empty": True}
    lab.stop_guest("bob")
    lab.start_guest("bob")
    lab.wait_attached(["bob"])


def test_copy_from_a_vm_without_a_driver_fails_clearly(lab: HostLab) -> None:
    code, line = gesture(lab, "copy", "eve")
    assert code == 1 and line == "eve did not answer: its driver is not attached"


def test_copy_from_a_killed_driver_times_out_clearly(lab: HostLab) -> None:
    assert lab.guest_cmd("mallory", "copy", *BINARY, input=b"x" * 10).returncode == 0
    lab.stop_guest("mallory", kill=True)
    try:
        started = time.monotonic()
        code, line = gesture(lab, "copy", "mallory")
        assert code == 1 and "mallory did not answer" in line, line
        assert time.monotonic() - started < 10
        assert lab.status()["clipboard"] == {"empty": True}
    finally:
        lab.start_guest("mallory")
        lab.wait_attached(["mallory"])


def test_a_cleanly_stopped_driver_is_known_at_once(lab: HostLab) -> None:
    lab.stop_guest("mallory")  # SIGTERM: the driver says goodbye
    try:
        lab._wait_for(lambda: next(vm for vm in lab.status()["vms"] if vm["name"] == "mallory")["state"]
                      == "stopped", 1.5, "mallory to be shown stopped")  # before its heartbeat goes stale
        started = time.monotonic()
        code, line = gesture(lab, "copy", "mallory")
        assert (code, line) == (1, "mallory did not answer: its driver stopped")
        assert time.monotonic() - started < 4  # no 5 s wait for an answer that cannot come
    finally:
        lab.start_guest("mallory")
        lab.wait_attached(["mallory"])


def test_unknown_vm_and_bad_names_get_clear_errors(lab: HostLab) -> None:
    code, line = gesture(lab, "copy", "nobody")
    assert code == 1 and "unknown VM 'nobody'" in line
    result = lab.broker_cmd("copy", "../etc")
    assert result.returncode == 2 and "not a safe identifier" in result.stderr
    assert "Traceback" not in result.stderr


# Hostile eve: the test writes eve's region itself -------------------------------------
def attach_as(lab: HostLab, vm: str) -> tuple[Region, RingProducer]:
    region = Region.attach(lab.region_path(vm))
    identity = read_identity(region.mem)
    geometry = identity.geometry
    producer = RingProducer(region.mem, geometry.guest_to_host, geometry.max_record)
    region.mem.store_u64(layout.GUEST_EPOCH_OFF, 12345)
    region.mem.store_u64(layout.GUEST_HEARTBEAT_OFF, 1)
    region.mem.write(layout.GUEST_SESSION_OFF, identity.session_id)
    return region, producer


def push(producer: RingProducer, *messages: object) -> None:
    for message in messages:
        kind, parts = encode(message)  # type: ignore[arg-type]
        assert producer.try_push(kind, parts)


def eve_state(lab: HostLab) -> dict[str, object]:
    return next(vm for vm in lab.status()["vms"] if vm["name"] == "eve")


def test_unsolicited_data_is_dropped_counted_and_never_reaches_the_clipboard(lab: HostLab) -> None:
    region, producer = attach_as(lab, "eve")
    try:
        # eve also claims both capability bits in its region: it must gain nothing.
        region.mem.store_u32(layout.CAPABILITIES_OFF, 0xFFFFFFFF)
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "attached", 5, "eve to attach")
        before = int(eve_state(lab)["dropped"])  # type: ignore[call-overload]
        forged = b"forged by eve " * 10
        push(producer, DataBegin(7, len(forged)), DataChunk(7, 0, forged), DataEnd(7))
        HostLab._wait_for(lambda: int(eve_state(lab)["dropped"]) >= before + 3, 5,  # type: ignore[call-overload]
                          "the broker to drop eve's records")
        assert lab.status()["clipboard"] == {"empty": True}
        code, line = gesture(lab, "paste", "bob")
        assert code == 1 and "nothing to paste" in line
        assert eve_state(lab)["state"] == "attached"  # well-formed, so not a fault
    finally:
        region.close()


def test_garbage_marks_the_vm_faulty_and_the_others_carry_on(lab: HostLab) -> None:
    region, _ = attach_as(lab, "eve")
    old_session = region.mem.read(layout.SESSION_ID_OFF, 16)
    try:
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "attached", 5, "eve to attach")
        region.mem.store_u64(layout.G2H_TAIL_OFF, 1 << 63)  # far past the capacity
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "faulty", 5, "eve to be faulty")
        assert "producer index" in str(eve_state(lab)["last_fault"])
        assert "eve: marked faulty" in lab.log_text("broker.log")
        content = random_content()
        assert lab.guest_cmd("alice", "copy", *BINARY, input=content).returncode == 0
        assert gesture(lab, "copy", "alice")[0] == 0
        assert gesture(lab, "paste", "bob")[0] == 0
        assert lab.guest_cmd("bob", "paste").stdout == content
        # eve's region is re-initialised under a new session, ready for a driver.
        HostLab._wait_for(lambda: region.mem.read(layout.SESSION_ID_OFF, 16) != old_session, 5,
                          "eve's region to be re-initialised")
        assert region.mem.load_u64(layout.G2H_TAIL_OFF) == 0
    finally:
        region.close()


def test_broker_refuses_a_second_instance_and_a_busy_region(lab: HostLab, tmp_path: Path) -> None:
    second = HostLab(["alice"], tmp_path)
    second.prefix = lab.prefix  # the same regions
    try:
        second.socket = tmp_path / "other.sock"
        result = second.broker_cmd("status")
        assert result.returncode == 1 and "not running" in result.stderr
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--vm", "alice", "--size", "1M",
             "--shm-prefix", lab.prefix, "--socket", str(second.socket)],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and "locked by another live ivclip broker" in proc.stderr
        proc = subprocess.run(  # a refused start leaves no region it made itself
            [sys.executable, "-m", "broker", "serve", "--vm", "zed", "--vm", "alice", "--size", "1M",
             "--shm-prefix", lab.prefix, "--socket", str(second.socket)],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and not lab.region_path("zed").exists()
        assert lab.region_path("alice").exists()
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--vm", "zed", "--socket", str(lab.socket)],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and "another ivclip broker is already running" in proc.stderr
    finally:
        second.prefix = "unused-"
        second.close()


def test_a_second_driver_on_the_same_region_waits_and_takes_over(lab: HostLab, tmp_path: Path) -> None:
    """Two producers on one ring would corrupt it: the second driver (another socket,
    so its socket lock does not stop it) waits until the first is gone."""
    log_path = tmp_path / "second-driver.log"
    with log_path.open("wb") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "guestdrv", "run", "--device", str(lab.region_path("alice")),
             "--socket", str(tmp_path / "second.sock")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "another guest driver is attached" not in log_path.read_text():
            assert time.monotonic() < deadline and second.poll() is None, log_path.read_text()
            time.sleep(0.05)
        content = random_content()
        assert lab.guest_cmd("alice", "copy", input=content).returncode == 0
        assert gesture(lab, "copy", "alice")[0] == 0  # the first driver answers, alone
        alice = next(vm for vm in lab.status()["vms"] if vm["name"] == "alice")
        assert alice["faults"] == 0 and alice["state"] == "attached"
        lab.stop_guest("alice")
        while "attached to" not in log_path.read_text():
            assert time.monotonic() < deadline + 20, log_path.read_text()
            time.sleep(0.05)
    finally:
        second.terminate()
        second.wait(10)
        if "alice" not in lab.guests:
            lab.start_guest("alice")
        lab.wait_attached(["alice"])


def test_status_shows_every_vm_and_never_content(lab: HostLab) -> None:
    status = lab.status()
    assert [vm["name"] for vm in status["vms"]] == VMS
    for vm in status["vms"]:
        assert set(vm) >= {"state", "heartbeat_age_s", "capabilities", "dropped", "faults"}
    human = lab.broker_cmd("status")
    assert human.returncode == 0 and "alice" in human.stdout and "global clipboard" in human.stdout


def test_sigterm_wipes_the_regions(tmp_path: Path) -> None:
    lab = HostLab(["solo"], tmp_path, size="1M")
    lab.start_broker()
    lab.start_guest("solo")
    lab.wait_attached(["solo"])
    secret = random_content()
    assert lab.guest_cmd("solo", "copy", *BINARY, input=secret).returncode == 0
    assert lab.broker_cmd("copy", "solo").returncode == 0
    path = lab.region_path("solo")
    with path.open("rb") as f:
        assert f.read(8) == layout.MAGIC
    assert lab.broker is not None
    lab.broker.terminate()
    assert lab.broker.wait(10) == 0
    lab.broker = None
    assert not path.exists()  # --unlink-on-exit; and before that it was wiped
    lab.close()


def test_one_gesture_at_a_time(lab: HostLab) -> None:
    region, _ = attach_as(lab, "eve")  # attached, but never answers
    try:
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "attached", 5, "eve to attach")
        outcome: dict[str, tuple[int, str]] = {}
        waiting = threading.Thread(target=lambda: outcome.update(eve=gesture(lab, "copy", "eve")))
        waiting.start()
        HostLab._wait_for(lambda: eve_state(lab)["capabilities"] == 1, 5, "the copy from eve to start")
        code, line = gesture(lab, "copy", "alice")
        assert code == 1 and line == "another gesture is in progress (copy eve); try again"
        waiting.join(30)
        assert outcome["eve"] == (1, "eve did not answer within 2 s")
    finally:
        region.close()


def test_a_copy_that_is_not_typed_content_is_refused_without_a_fault(lab: HostLab) -> None:
    from protocol.messages import CopyRequest, decode
    from shm.ring import RingConsumer

    region, producer = attach_as(lab, "eve")
    region.mem.store_u64(layout.GUEST_EPOCH_OFF, secrets.randbits(63) + 1)  # a new driver start
    try:
        geometry = read_identity(region.mem).geometry
        consumer = RingConsumer(region.mem, geometry.host_to_guest, geometry.max_record,
                                start_index=region.mem.load_u64(layout.H2G_TAIL_OFF) & ~7)
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "attached", 5, "eve to attach")
        outcome: dict[str, tuple[int, str]] = {}
        waiting = threading.Thread(target=lambda: outcome.update(eve=gesture(lab, "copy", "eve")))
        waiting.start()
        request: list[CopyRequest] = []

        def take_request() -> bool:
            record = consumer.poll()
            if record is not None:
                message = decode(record.kind, record.payload)
                assert isinstance(message, CopyRequest)
                request.append(message)
            return bool(request)

        HostLab._wait_for(take_request, 5, "the copy request")
        untyped = b"raw bytes from an old or hostile driver"
        tid = request[0].transfer_id
        push(producer, DataBegin(tid, len(untyped)), DataChunk(tid, 0, untyped), DataEnd(tid))
        waiting.join(30)
        code, line = outcome["eve"]
        assert code == 1 and line.startswith("eve sent content that is not a valid typed clipboard")
        assert "refused, global clipboard wiped" in line
        assert lab.status()["clipboard"] == {"empty": True}
        assert eve_state(lab)["state"] == "attached"  # the ring protocol was kept: no fault
    finally:
        region.close()
