"""File transfers end to end: the real broker, guest drivers and command lines as processes.

alice and bob run ordinary drivers, dave one started with --allow-unsafe-names,
and eve has no driver: the test plays a hostile eve by writing her region.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import read_audit
from broker.lab import HostLab
from protocol.messages import (
    EntryType,
    FileChunk,
    FileEnd,
    FileEntry,
    FileOffer,
    FileStart,
    Kind,
    Message,
    StreamEnd,
    decode,
    encode,
)
from shm import layout
from shm.region import Region, read_identity
from shm.ring import RingConsumer, RingProducer

VMS = ["alice", "bob", "dave", "eve"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostLab]:
    workdir = tmp_path_factory.mktemp("files")
    with HostLab(VMS, workdir, size="1M",
                 broker_args=["--timeout", "2", "--incoming", str(workdir / "in-host")]) as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm, "--incoming", str(workdir / f"in-{vm}"))
        lab.start_guest("dave", "--incoming", str(workdir / "in-dave"), "--allow-unsafe-names")
        lab.wait_attached(["alice", "bob", "dave"])
        yield lab


def incoming(lab: HostLab, vm: str, source: str = "alice") -> Path:
    return lab.workdir / f"in-{vm}" / source


def visible(folder: Path) -> list[str]:
    """Everything under `folder`, hidden staging directories included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


class Send:
    """`python -m guestdrv send` running in the background."""

    def __init__(self, lab: HostLab, vm: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestdrv", "send", *args, "--socket", str(lab.guest_socket(vm))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, (out + err).strip()


def offers(lab: HostLab) -> list[dict[str, object]]:
    return lab.status()["files"]["offers"]  # type: ignore[no-any-return]


def wait_offer(lab: HostLab, vm: str) -> dict[str, object]:
    HostLab._wait_for(lambda: any(o["vm"] == vm for o in offers(lab)), 20, f"{vm}'s offer")
    return next(o for o in offers(lab) if o["vm"] == vm)


def wait_no_transfer(lab: HostLab) -> None:
    HostLab._wait_for(lambda: not lab.status()["files"]["transfers"], 20, "the transfers to end")


def output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip()


# The gated path ------------------------------------------------------------------------
def test_guest_to_guest_waits_for_approval_and_arrives_intact(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "تقارير \uff5c -x", {
        "שלום.txt": b"shalom\n", "sub/" + "n" * 255: os.urandom(300_000), "--help": b"dash\n"})
    (top / "empty").mkdir()
    os.link(top / "--help", top / "hard")
    (top / "sub" / "inside").symlink_to("../שלום.txt")
    os.mkfifo(top / "pipe")
    send = Send(lab, "alice", str(top))
    offer = wait_offer(lab, "alice")
    assert offer["names"] == ["تقارير \uff5c -x"] and offer["files"] == 4 and offer["entries"] == 8
    assert visible(incoming(lab, "bob")) == []  # nothing moves before the gesture
    human = lab.broker_cmd("status").stdout
    assert "file offer #" in human and "from alice: 4 files and 4 other entries" in human

    approved = lab.broker_cmd("approve", "alice", "--to", "bob", "--offer", str(offer["offer"]))
    assert approved.returncode == 0, output(approved)
    assert "sent 4 files and 4 other entries" in approved.stdout and "to bob" in approved.stdout
    code, text = send.result()
    assert code == 0 and "the receiver confirmed every file" in text
    assert "skipped تقارير \uff5c -x/pipe: a FIFO" in text
    assert "\r" not in text  # no progress line when not on a terminal
    out = incoming(lab, "bob") / top.name
    for name in ("שלום.txt", "sub/" + "n" * 255, "--help", "hard"):
        assert (out / name).read_bytes() == (top / name).read_bytes()
    assert (out / "hard").stat().st_ino != (out / "--help").stat().st_ino
    assert os.readlink(out / "sub" / "inside") == "../שלום.txt"
    assert (out / "empty").is_dir() and not (out / "pipe").exists()
    assert offers(lab) == [] and visible(lab.workdir / "in-dave") == []  # dave saw nothing


def test_links_out_of_the_tree_are_refused_before_anything_is_offered(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "links", {"f": b"f"})
    (top / "abs").symlink_to("/etc/passwd")
    (top / "sub").mkdir()
    (top / "sub" / "up").symlink_to("../../../outside")
    code, text = Send(lab, "alice", str(top)).result()
    assert code == 1 and "nothing was sent" in text
    assert "links/abs: the receiver would refuse it: its target is an absolute path" in text
    assert "links/sub/up: the receiver would refuse it: its target climbs out of the copied tree" in text
    assert offers(lab) == []


def test_reject_and_a_stale_offer_number(lab: HostLab, tmp_path: Path) -> None:
    f = make_tree(tmp_path, {"secret.txt": b"x"}) / "secret.txt"
    send = Send(lab, "alice", str(f))
    offer = wait_offer(lab, "alice")
    wrong = lab.broker_cmd("approve", "alice", "--to", "bob", "--offer", str(int(offer["offer"]) + 7))  # type: ignore[call-overload]
    assert wrong.returncode == 1 and "check status again" in wrong.stderr
    refused = lab.broker_cmd("reject", "alice")
    assert refused.returncode == 0 and f"rejected alice's offer #{offer['offer']}" in refused.stdout
    last = read_audit(lab.audit_path)[-1]
    assert (last["gesture"], last["source"], last["target"], last["size"], last["outcome"]) == (
        "file", "alice", None, 1, "rejected")
    code, text = send.result()
    assert code == 1 and "rejected" in text
    assert not (incoming(lab, "bob") / "secret.txt").exists()
    again = lab.broker_cmd("approve", "alice", "--to", "bob")
    assert again.returncode == 1 and "alice has no pending file offer" in again.stderr


def test_host_to_guest_and_guest_to_host(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "from-host", {"a.bin": os.urandom(2 << 20), "b/c.txt": b"c"})
    sent = lab.broker_cmd("send", "bob", str(top))
    assert sent.returncode == 0 and "from host to bob" in sent.stdout, output(sent)
    assert (incoming(lab, "bob", "host") / "from-host" / "a.bin").read_bytes() == (top / "a.bin").read_bytes()

    send = Send(lab, "alice", str(top / "a.bin"))
    wait_offer(lab, "alice")
    approved = lab.broker_cmd("approve", "alice", "--to", "host", "--json")
    assert approved.returncode == 0, output(approved)
    reply = json.loads(approved.stdout)
    assert {k: reply[k] for k in ("ok", "source", "target", "entries", "files", "bytes", "move")} == {
        "ok": True, "source": "alice", "target": "host", "entries": 1, "files": 1, "bytes": 2 << 20,
        "move": False}
    assert reply["incoming"] == str(lab.workdir / "in-host" / "alice") and "into" in reply["message"]
    assert send.result()[0] == 0
    assert (lab.workdir / "in-host" / "alice" / "a.bin").read_bytes() == (top / "a.bin").read_bytes()


def test_a_send_to_an_unknown_vm_says_only_why_it_was_refused(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "nowhere", {"x": b"x"})
    sent = lab.broker_cmd("send", "carol", str(top))
    assert sent.returncode == 1
    assert sent.stderr.startswith("unknown VM 'carol'; this broker serves"), output(sent)
    assert "sending" not in sent.stderr  # not announced before the broker took it on


def test_a_second_send_while_one_is_offered_is_refused_and_not_announced(
        lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "twice", {"one": b"1"})
    send = Send(lab, "alice", str(top / "one"))
    wait_offer(lab, "alice")
    second = lab.guest_cmd("alice", "send", str(top / "one"))
    assert second.returncode == 1
    assert second.stderr.decode() == "another send is already under way in this VM\n"
    assert lab.broker_cmd("reject", "alice").returncode == 0
    assert send.result()[0] == 1


def test_move_deletes_the_sources_only_after_confirmation(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "moving", {"one": b"1", "deep/two": b"2"})
    send = Send(lab, "alice", "--move", str(top))
    assert wait_offer(lab, "alice")["move"] is True
    assert top.exists()
    assert lab.broker_cmd("approve", "alice", "--to", "bob").returncode == 0
    code, text = send.result()
    assert code == 0 and "moved" in text and "deleted 4 source entries" in text
    assert not top.exists()
    assert (incoming(lab, "bob") / "moving" / "deep" / "two").read_bytes() == b"2"

    host_top = make_tree(tmp_path / "host-moving", {"x": b"x"})
    moved = lab.broker_cmd("send", "bob", "--move", str(host_top))
    assert moved.returncode == 0 and "deleted 2 source entries" in moved.stdout
    assert not host_top.exists()


def test_a_name_clash_is_an_error_and_nothing_is_overwritten(lab: HostLab, tmp_path: Path) -> None:
    clash = incoming(lab, "bob") / "report.txt"
    clash.parent.mkdir(parents=True, exist_ok=True)
    clash.write_bytes(b"precious")
    f = make_tree(tmp_path, {"report.txt": b"newer"}) / "report.txt"
    send = Send(lab, "alice", "--move", str(f))
    wait_offer(lab, "alice")
    approved = lab.broker_cmd("approve", "alice", "--to", "bob")
    assert approved.returncode == 1 and "already exists" in approved.stderr
    assert "nothing was written" in approved.stderr and "may have kept" not in approved.stderr
    assert "'report.txt'" in approved.stderr
    code, text = send.result()
    assert code == 1 and "report.txt" in text and "no source was deleted" in text
    assert clash.read_bytes() == b"precious" and f.read_bytes() == b"newer"


def test_unsafe_names_refused_by_default_allowed_by_the_option_and_escaped(
        lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "gnp.\u202eexe", {"line\nbreak": b"n"})
    send = Send(lab, "alice", str(top))
    offer = wait_offer(lab, "alice")
    assert offer["names"] == ["gnp.\\u202eexe"]
    assert "\u202e" not in lab.broker_cmd("status").stdout
    refused = lab.broker_cmd("approve", "alice", "--to", "bob")
    assert refused.returncode == 1 and "refuses this name" in refused.stderr
    assert "\\u202e" in refused.stderr and "\u202e" not in refused.stderr
    code, text = send.result()
    assert code == 1
    notices = [line for line in text.splitlines() if line.startswith("notice:")]
    assert len(notices) == 2 and all("unless it allows unsafe names" in n for n in notices), text
    assert "\\u202e" in notices[0] and "\\n" in notices[1]  # escaped, never shown raw
    assert not (incoming(lab, "bob") / top.name).exists()
    assert not any("ivclip-partial" in p for p in visible(incoming(lab, "bob")))
    send = Send(lab, "alice", str(top))
    wait_offer(lab, "alice")
    assert lab.broker_cmd("approve", "alice", "--to", "dave").returncode == 0
    assert send.result()[0] == 0
    assert (incoming(lab, "dave") / top.name / "line\nbreak").read_bytes() == b"n"


# Failures -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(lab: HostLab) -> Iterator[Path]:
    mount = incoming(lab, "bob")
    mount.mkdir(parents=True, exist_ok=True)
    if any(mount.iterdir()):
        for child in mount.iterdir():
            subprocess.run(["rm", "-rf", str(child)], check=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "ivclip-test", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_cleanly_and_a_move_keeps_the_sources(
        lab: HostLab, tmp_path: Path, small_disk: Path) -> None:
    f = make_tree(tmp_path, {"big.bin": os.urandom(2 << 20)}) / "big.bin"
    send = Send(lab, "alice", "--move", str(f))
    wait_offer(lab, "alice")
    approved = lab.broker_cmd("approve", "alice", "--to", "bob")
    assert approved.returncode == 1 and "not enough free space" in approved.stderr
    code, text = send.result()
    assert code == 1 and "no source was deleted" in text
    assert f.stat().st_size == 2 << 20 and visible(small_disk) == []


def test_move_with_an_unreadable_source_deletes_nothing(lab: HostLab, tmp_path: Path) -> None:
    top = make_tree(tmp_path / "mixed", {"a.txt": b"a", "locked.txt": b"l", "z.txt": b"z"})
    (top / "locked.txt").chmod(0)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    # A command without the power to read it refuses before anything is offered...
    scan = subprocess.run([*drop, sys.executable, "-m", "guestdrv", "send", "--move", str(top),
                           "--socket", str(lab.guest_socket("alice"))], capture_output=True, text=True)
    if "setpriv" in scan.stderr and "Operation not permitted" in scan.stderr:
        pytest.skip(f"cannot drop capabilities here: {scan.stderr.strip()}")
    assert scan.returncode == 1 and "cannot read mixed/locked.txt: Permission denied" in scan.stderr
    assert offers(lab) == []
    # ...and a driver that cannot read it stops the stream: no source is deleted.
    lab.stop_guest("alice")
    log = (lab.workdir / "guest-alice-nocaps.log").open("ab")
    lab.guests["alice"] = subprocess.Popen(
        [*drop, sys.executable, "-m", "guestdrv", "run", "--device", str(lab.region_path("alice")),
         "--socket", str(lab.guest_socket("alice")), "--incoming", str(lab.workdir / "in-alice")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        HostLab._wait_for(lambda: lab.guest_socket("alice").exists(), 20, "alice's driver")
        lab.wait_attached(["alice"])
        send = Send(lab, "alice", "--move", str(top))
        wait_offer(lab, "alice")
        approved = lab.broker_cmd("approve", "alice", "--to", "bob")
        assert approved.returncode == 1 and "could not read" in approved.stderr
        assert "mixed/locked.txt" in approved.stderr and "Permission denied" in approved.stderr
        code, text = send.result()
        assert code == 1 and "no source was deleted" in text
        assert sorted(p.name for p in top.iterdir()) == ["a.txt", "locked.txt", "z.txt"]
        assert not (incoming(lab, "bob") / "mixed").exists()
        assert [p for p in visible(incoming(lab, "bob")) if "ivclip-partial" in p] == []
    finally:
        (top / "locked.txt").chmod(0o644)
        lab.stop_guest("alice")
        lab.start_guest("alice", "--incoming", str(lab.workdir / "in-alice"))
        lab.wait_attached(["alice"])


def big_sparse(tmp_path: Path, name: str = "big.img", size: int = 512 << 20) -> Path:
    """Reads as zeros at memory speed; long enough to kill something in the middle."""
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
    return path


def start_transfer(lab: HostLab, path: Path, *, move: bool = False) -> tuple[Send, subprocess.Popen[str]]:
    send = Send(lab, "alice", *(["--move"] if move else []), str(path))
    wait_offer(lab, "alice")
    approve = subprocess.Popen([sys.executable, "-m", "broker", "approve", "alice", "--to", "bob",
                                "--socket", str(lab.socket)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    HostLab._wait_for(lambda: any(t["bytes"] > 0 for t in lab.status()["files"]["transfers"]), 20,
                      "the transfer to be under way")
    return send, approve


def test_the_sender_killed_mid_way_leaves_nothing_on_the_receiver(lab: HostLab, tmp_path: Path) -> None:
    send, approve = start_transfer(lab, big_sparse(tmp_path))
    lab.guests["alice"].kill()
    _out, err = approve.communicate(timeout=30)
    assert approve.returncode == 1 and "alice's driver stopped responding" in err
    assert send.result()[0] != 0
    wait_no_transfer(lab)
    HostLab._wait_for(lambda: not any("ivclip-partial" in p for p in visible(incoming(lab, "bob"))), 10,
                      "bob to remove the partial transfer")
    assert not (incoming(lab, "bob") / "big.img").exists()
    lab.guests.pop("alice").wait(10)
    lab.start_guest("alice", "--incoming", str(lab.workdir / "in-alice"))
    lab.wait_attached(["alice"])


def test_the_receiver_killed_mid_way_deletes_no_source(lab: HostLab, tmp_path: Path) -> None:
    path = big_sparse(tmp_path)
    send, approve = start_transfer(lab, path, move=True)
    lab.guests["bob"].kill()
    _out, err = approve.communicate(timeout=30)
    assert approve.returncode == 1 and "bob's driver stopped responding" in err
    code, text = send.result()
    assert code == 1 and "no source was deleted" in text and path.exists()
    lab.guests.pop("bob").wait(10)
    assert any("ivclip-partial" in p for p in visible(incoming(lab, "bob")))  # hidden, and...
    lab.start_guest("bob", "--incoming", str(lab.workdir / "in-bob"))
    lab.wait_attached(["bob"])
    assert not any("ivclip-partial" in p for p in visible(incoming(lab, "bob")))  # ...swept at start
    assert not (incoming(lab, "bob") / "big.img").exists()


@pytest.mark.parametrize("who", ["sender", "approver"])
def test_ctrl_c_on_either_command_cancels_cleanly(lab: HostLab, tmp_path: Path, who: str) -> None:
    path = big_sparse(tmp_path)
    send, approve = start_transfer(lab, path, move=True)
    (send.proc if who == "sender" else approve).send_signal(signal.SIGINT)
    code, text = send.result()
    _out, err = approve.communicate(timeout=30)
    assert code != 0 and approve.returncode != 0
    assert "cancelled" in (text if who == "sender" else err)
    assert "cancelled" in (err if who == "sender" else text)
    assert "Traceback" not in text + err
    wait_no_transfer(lab)
    HostLab._wait_for(lambda: not any("ivclip-partial" in p for p in visible(incoming(lab, "bob"))), 10,
                      "bob to remove the partial transfer")
    assert path.exists() and not (incoming(lab, "bob") / "big.img").exists()
    status = {vm["name"]: vm for vm in lab.status()["vms"]}
    assert status["alice"]["faults"] == 0 and status["bob"]["faults"] == 0


def test_the_broker_relays_in_constant_memory(lab: HostLab, tmp_path: Path) -> None:
    path = big_sparse(tmp_path, "sparse-256.img", 256 << 20)
    assert lab.broker is not None
    send = Send(lab, "alice", str(path))
    wait_offer(lab, "alice")
    assert lab.broker_cmd("approve", "alice", "--to", "bob").returncode == 0
    assert send.result()[0] == 0
    assert (incoming(lab, "bob") / path.name).stat().st_size == 256 << 20
    peaks = {}
    for name, proc in [("broker", lab.broker), ("alice", lab.guests["alice"]), ("bob", lab.guests["bob"])]:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[name] = int(line.split()[1]) // 1024  # MiB
    print("peak RSS (MiB):", peaks)
    assert all(peak < 100 for peak in peaks.values()), peaks  # 256 MiB went through each of them
    (incoming(lab, "bob") / path.name).unlink()


# A hostile eve ------------------------------------------------------------------------------
class FakeGuest:
    """eve's region driven by the test: a heartbeat, and whatever records the test writes."""

    def __init__(self, lab: HostLab, vm: str) -> None:
        self.region = Region.attach(lab.region_path(vm))
        identity = read_identity(self.region.mem)
        geometry = identity.geometry
        mem = self.region.mem
        self.producer = RingProducer(mem, geometry.guest_to_host, geometry.max_record,
                                     start_index=mem.load_u64(layout.G2H_TAIL_OFF) & ~7)
        self.consumer = RingConsumer(mem, geometry.host_to_guest, geometry.max_record,
                                     start_index=mem.load_u64(layout.H2G_TAIL_OFF) & ~7)
        mem.store_u64(layout.H2G_HEAD_OFF, self.consumer.head)
        mem.store_u64(layout.GUEST_EPOCH_OFF, int.from_bytes(os.urandom(8), "little") | 1)
        mem.store_u64(layout.GUEST_HEARTBEAT_OFF, 1)
        mem.write(layout.GUEST_SESSION_OFF, identity.session_id)
        self.beating = True
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        beat = 1
        while self.beating:
            beat += 1
            self.region.mem.store_u64(layout.GUEST_HEARTBEAT_OFF, beat)
            time.sleep(0.1)

    def push(self, *messages: Message) -> None:
        for message in messages:
            kind, parts = encode(message)
            assert self.producer.try_push(kind, parts)

    def wait_for(self, kind: Kind, timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.consumer.poll()
            if record is not None and record.kind == kind:
                return decode(record.kind, record.payload)
            if record is None:
                time.sleep(0.01)
        raise TimeoutError(f"no {kind.name} record for eve")

    def close(self) -> None:
        self.beating = False
        self._thread.join()
        self.region.close()


@pytest.fixture
def eve(lab: HostLab) -> Iterator[FakeGuest]:
    fake = FakeGuest(lab, "eve")
    try:
        HostLab._wait_for(lambda: eve_state(lab)["state"] == "attached", 10, "eve to attach")
        yield fake
    finally:
        fake.close()


def eve_state(lab: HostLab) -> dict[str, object]:
    return next(vm for vm in lab.status()["vms"] if vm["name"] == "eve")


def offer_and_approve(lab: HostLab, eve: FakeGuest, entries: int = 3, files: int = 2,
                      total: int = 10) -> tuple[int, subprocess.Popen[str]]:
    eve.push(FileOffer(99, entries, files, total, 0, 1, (b"loot",)))
    wait_offer(lab, "eve")
    approve = subprocess.Popen([sys.executable, "-m", "broker", "approve", "eve", "--to", "bob",
                                "--socket", str(lab.socket)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    start = eve.wait_for(Kind.FILE_START)
    assert isinstance(start, FileStart) and start.offer_id == 99
    return start.transfer_id, approve


def test_unsolicited_file_records_are_dropped_and_counted(lab: HostLab, eve: FakeGuest) -> None:
    before = int(eve_state(lab)["dropped"])  # type: ignore[call-overload]
    eve.push(FileEntry(5, EntryType.FILE, 0o644, 0, 4, b"pushed"), FileChunk(5, 0, b"data"),
             FileEnd(5, b"\0" * 32), StreamEnd(5, 1, 4))
    HostLab._wait_for(lambda: int(eve_state(lab)["dropped"]) >= before + 4, 10,  # type: ignore[call-overload]
                      "the broker to drop eve's records")
    assert eve_state(lab)["state"] == "attached"
    assert not (incoming(lab, "bob", "eve")).exists() or visible(incoming(lab, "bob", "eve")) == []


@pytest.mark.parametrize(("lie", "why"), [
    ("dotdot", "'..' component"),
    ("size", "declared"),
    ("more-than-announced", "announced"),
])
def test_a_lying_sender_is_stopped_by_the_broker_and_leaves_nothing(
        lab: HostLab, eve: FakeGuest, lie: str, why: str) -> None:
    tid, approve = offer_and_approve(lab, eve)
    top = FileEntry(tid, EntryType.DIRECTORY, 0o755, 0, 0, b"loot")
    if lie == "dotdot":
        eve.push(top, FileEntry(tid, EntryType.FILE, 0o644, 0, 3, b"loot/../../../etc/evil"))
    elif lie == "size":
        eve.push(top, FileEntry(tid, EntryType.FILE, 0o644, 0, 3, b"loot/f"), FileChunk(tid, 0, b"much more"))
    else:
        eve.push(top, FileEntry(tid, EntryType.FILE, 0o644, 0, 100, b"loot/f"))
    _out, err = approve.communicate(timeout=30)
    assert approve.returncode == 1 and why in err and "nothing was written" in err
    HostLab._wait_for(lambda: eve_state(lab)["state"] == "faulty", 10, "eve to be marked faulty")
    HostLab._wait_for(lambda: not any("ivclip-partial" in p for p in visible(incoming(lab, "bob", "eve"))),
                      10, "bob to drop the partial transfer")
    assert visible(incoming(lab, "bob", "eve")) == []
    HostLab._wait_for(lambda: eve_state(lab)["state"] != "faulty", 10, "eve's region to be re-initialised")


def test_a_stream_without_its_end_marker_never_appears(lab: HostLab, eve: FakeGuest) -> None:
    tid, approve = offer_and_approve(lab, eve)
    data = b"0123456789"
    eve.push(FileEntry(tid, EntryType.DIRECTORY, 0o755, 0, 0, b"loot"),
             FileEntry(tid, EntryType.FILE, 0o644, 0, 10, b"loot/f"), FileChunk(tid, 0, data),
             FileEnd(tid, hashlib.sha256(data).digest()))
    HostLab._wait_for(lambda: any("ivclip-partial" in p for p in visible(incoming(lab, "bob", "eve"))), 10,
                      "bob to start writing")
    eve.beating = False  # eve goes silent: no end marker will ever come
    _out, err = approve.communicate(timeout=30)
    assert approve.returncode == 1 and "eve's driver stopped responding" in err
    HostLab._wait_for(lambda: visible(incoming(lab, "bob", "eve")) == [], 10,
                      "bob to drop the partial transfer")
