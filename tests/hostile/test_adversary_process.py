"""The adversary as a process, racing the real broker while honest VMs work.

alice, bob and carol run real guest drivers; mallory's region is attacked by
``python -m broker.hostile`` (seed ``IVCLIP_HOSTILE_SEED``, default 7) for
``IVCLIP_HOSTILE_SECONDS`` (default 20): every mutation family, fields
flipped for milliseconds at a time between a good and a bad value to catch a
double fetch.  Meanwhile the host user keeps copying from alice and pasting
to bob, and now and then makes gestures for mallory.  What must hold: every
alice->bob paste arrives exact; no trace of it in mallory's or carol's
region; mallory's content reaches the clipboard only through a copy gesture
for mallory; the broker survives, with no traceback in its log and bounded
memory; mallory was really attacked (faults, drops, mutations counted).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from broker.hostile import MARKER
from broker.lab import HostLab, trace_of

BINARY = ("--type", "application/octet-stream")  # random bytes are no text for a strict driver

SEED = int(os.environ.get("IVCLIP_HOSTILE_SEED", "7"))
SECONDS = float(os.environ.get("IVCLIP_HOSTILE_SECONDS", "20"))
LIMIT = 1 << 20
# The broker's peak resident memory may not pass this: about 30 MiB of
# interpreter, 4 x 1 MiB regions, a copy buffer and the global clipboard of at
# most LIMIT each, and a ring's worth of records in flight.  A guest able to
# make the broker allocate what it announces (up to 1 TiB) would blow it.
MAX_RSS_KIB = 120 << 10


def vm_status(lab: HostLab, name: str) -> dict[str, Any]:
    return next(vm for vm in lab.status()["vms"] if vm["name"] == name)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hostile_process_races_the_broker_while_honest_vms_work(tmp_path: Path,
                                                                  figures: dict[str, Any]) -> None:
    # Not random.Random(SEED): the adversary draws its bytes from that very stream.
    rng = random.Random(f"honest-{SEED}")
    report_path = tmp_path / "hostile.json"
    with HostLab(["alice", "bob", "carol", "mallory"], tmp_path, size="1M",
                 broker_args=["--timeout", "1", "--clipboard-limit", str(LIMIT)]) as lab:
        lab.start_broker()
        for vm in ("alice", "bob", "carol"):
            lab.start_guest(vm)
        lab.wait_attached(["alice", "bob", "carol"])
        hostile = subprocess.Popen(
            [sys.executable, "-m", "broker.hostile", "--region", str(lab.region_path("mallory")),
             "--seed", str(SEED), "--duration", str(SECONDS), "--report", str(report_path)],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "hostile.log").open("wb"))
        rounds = 0
        mallory: Counter[str] = Counter()
        secrets_sent: list[bytes] = []
        try:
            while hostile.poll() is None:
                content = f"round {rounds} ".encode() + rng.randbytes(rng.choice((24, 3000, 300_000)))
                secrets_sent.append(content)
                assert lab.guest_cmd("alice", "copy", *BINARY, input=content).returncode == 0
                copied = lab.broker_cmd("copy", "alice")
                assert copied.returncode == 0, copied.stderr
                pasted = lab.broker_cmd("paste", "bob")
                assert pasted.returncode == 0, pasted.stderr
                assert lab.guest_cmd("bob", "paste").stdout == content
                for bystander in ("mallory", "carol"):
                    found = trace_of(content, lab.region_bytes(bystander))
                    assert found is None, f"{bystander}'s region holds {found} of round {rounds}"
                if rounds % 3 == 2:
                    # Gestures for mallory: whatever it answers, it gets no one else's bytes.
                    result = lab.broker_cmd("copy", "mallory")
                    mallory["copy ok" if result.returncode == 0 else "copy failed"] += 1
                    clip = lab.status()["clipboard"]
                    if result.returncode == 0:
                        assert clip["source"] == "mallory"
                        assert lab.broker_cmd("paste", "carol").returncode == 0
                        assert MARKER in lab.guest_cmd("carol", "paste").stdout
                    else:
                        assert clip.get("source") in (None, "alice")
                    decoy = b"decoy " + rng.randbytes(40)
                    assert lab.guest_cmd("carol", "copy", *BINARY, input=decoy).returncode == 0
                    assert lab.broker_cmd("copy", "carol").returncode == 0
                    result = lab.broker_cmd("paste", "mallory")
                    mallory["paste ok" if result.returncode == 0 else "paste failed"] += 1
                rounds += 1
        finally:
            if hostile.poll() is None:
                hostile.kill()
            hostile.wait(30)
        assert hostile.returncode == 0, (tmp_path / "hostile.log").read_text()
        report = json.loads(report_path.read_text())
        assert lab.broker is not None and lab.broker.poll() is None, "the broker died"
        rss = peak_rss_kib(lab.broker.pid)
        status = vm_status(lab, "mallory")
        log = lab.log_text("broker.log")
        audit = lab.audit_path.read_bytes()
        for content in secrets_sent:
            assert trace_of(content, audit) is None, "content in the audit log"
        faults = log.count("mallory: marked faulty")
        figures["process adversary"] = (
            f"seed {SEED}, {report['seconds']} s: {report['iterations']} hostile steps, "
            f"{report['mutations']} mutations ({len(report['labels'])} distinct; families "
            f"{report['families']}), {report['sessions']} sessions, {faults} faults, "
            f"{status['dropped']} records dropped; {rounds} honest alice->bob rounds exact; "
            f"gestures for mallory {dict(mallory)}; broker peak RSS {rss // 1024} MiB"
        )
        assert "Traceback" not in log
        assert rounds >= 3
        assert faults >= 3 and status["faults"] == faults and status["dropped"] > 0
        assert {"index", "record", "proto", "header", "guest", "race"} <= set(report["families"])
        assert rss < MAX_RSS_KIB, f"broker peak RSS {rss} KiB"
        for vm in ("alice", "bob", "carol"):
            assert vm_status(lab, vm)["faults"] == 0
