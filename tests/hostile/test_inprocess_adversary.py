"""The adversary against an in-process broker, one mutation per broker round.

Deterministic given the seed (``IVCLIP_HOSTILE_SEED``, default 4): the broker
is serviced between every two hostile writes, so each mutation meets the
broker in a known state, and every read the broker makes of mallory's region
is recorded to prove it never fetches a guest-written byte twice in a round.
After every round: the broker raised nothing, fetched nothing twice, holds no
copy buffer over its limit, and the global clipboard holds none of mallory's
bytes unless a copy gesture for mallory brought them.  Between the attacks,
alice and bob exchange clipboards, and each paste must arrive exact, with no
trace of it in mallory's or carol's region.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import InProcessLab, RecordingBuffer, double_fetches

from broker import vm as vm_module
from broker.hostile import MARKER, Adversary, families
from broker.lab import trace_of
from shm.region import Region

SEED = int(os.environ.get("IVCLIP_HOSTILE_SEED", "4"))
STEPS = int(os.environ.get("IVCLIP_HOSTILE_STEPS", "20000"))
LIMIT = 256 << 10


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessLab]:
    # Re-initialise a faulty region on the very next round: one fault per mutation,
    # not one per second.
    monkeypatch.setattr(vm_module, "REINIT_INTERVAL_S", 0.0)
    lab = InProcessLab(tmp_path, ["alice", "bob", "carol", "mallory"], ["alice", "bob", "carol"],
                       limit=LIMIT, timeout_s=1.0)
    try:
        lab.attach_all()
        yield lab
    finally:
        lab.close()


class Invariants:
    def __init__(self, lab: InProcessLab, recorder: RecordingBuffer) -> None:
        self.lab = lab
        self.recorder = recorder
        self.mallory_copied = False  # a copy gesture for mallory was made (and nothing since)
        self.rounds = 0

    def check_round(self) -> None:
        self.rounds += 1
        reads, self.recorder.reads = self.recorder.reads, []
        twice = double_fetches(reads, self.lab.size)
        assert not twice, f"the broker read guest-written bytes twice in one round: {twice[:3]}"
        broker = self.lab.broker
        for name, link in broker.vms.items():
            inbox = link.channel._inbox
            assert inbox is None or len(inbox.buffer) <= broker.copy_limit(name), name
        data = broker.clipboard.data
        if data is not None and MARKER in data:
            assert broker.clipboard.source == "mallory" and self.mallory_copied, \
                "mallory's bytes reached the global clipboard without a copy gesture for mallory"



def calm(adversary: Adversary, lab: InProcessLab) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the broker looks at a quiet guest every 0.1 s
        adversary.behave()
        lab.pump()
        if lab.broker.vms["mallory"].attachment(time.monotonic()).value == "attached":
            return
        time.sleep(0.002)
    raise AssertionError("mallory never looked attached again")


def test_adversary_in_process(lab: InProcessLab, figures: dict[str, Any]) -> None:
    rng = random.Random(f"honest-{SEED}")  # a stream of its own, not the adversary's
    recorder = lab.record_reads("mallory")
    region = Region.attach(lab.region_path("mallory"))
    adversary = Adversary(region.mem, random.Random(SEED), concurrent=False)
    checks = Invariants(lab, recorder)
    lab.after_pump = checks.check_round

    def attack() -> None:
        adversary.step()

    honest_rounds = mallory_gestures = 0
    outcomes: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    try:
        for step in range(STEPS):
            adversary.step()
            lab.pump()
            if step % 100 == 50:
                # An honest round, attacked between each of its broker rounds.
                # At least 24 bytes: a shorter secret could occur in mallory's bytes by chance.
                content = rng.randbytes(rng.choice((24, 100, 5000, 200_000)))
                lab.set_clipboard("alice", content)
                reply = lab.gesture("copy", "alice", between=attack)
                assert reply["ok"], reply
                checks.mallory_copied = False
                reply = lab.gesture("paste", "bob", between=attack)
                assert reply["ok"], reply
                assert lab.clipboard_of("bob") == content
                for bystander in ("mallory", "carol"):
                    found = trace_of(content, lab.region_path(bystander).read_bytes())
                    assert found is None, f"{bystander}'s region holds {found}"
                honest_rounds += 1
            elif step % 500 == 275:
                # The host user does make gestures for mallory now and then, once it
                # looks attached (it behaves for a moment, then attacks again).
                calm(adversary, lab)
                checks.mallory_copied = True  # a copy gesture for mallory is made (in flight)
                reply = lab.gesture("copy", "mallory", between=attack)
                outcomes["copy " + ("ok" if reply["ok"] else "failed")] += 1
                messages[reply["message"].split(":")[0][:60]] += 1
                checks.mallory_copied = reply["ok"]
                if reply["ok"]:
                    reply = lab.gesture("paste", "carol", between=attack)
                    assert reply["ok"], reply
                    assert MARKER in (lab.clipboard_of("carol") or b"")
                decoy = b"decoy for mallory " + rng.randbytes(64)
                lab.set_clipboard("carol", decoy)
                assert lab.gesture("copy", "carol")["ok"]
                checks.mallory_copied = False
                calm(adversary, lab)
                reply = lab.gesture("paste", "mallory", between=attack)
                messages[reply["message"].split(":")[0][:60]] += 1
                outcomes["paste " + ("ok" if reply["ok"] else "failed")] += 1
                mallory_gestures += 2
    finally:
        region.close()
    status = lab.broker.status()
    mallory = next(vm for vm in status["vms"] if vm["name"] == "mallory")
    fams = families(adversary.counts)
    figures["in-process adversary"] = (
        f"seed {SEED}: {adversary.iterations} hostile steps "
        f"({sum(n for k, n in adversary.counts.items() if k != 'attach')} mutations; "
        f"families {fams}), {len(adversary.counts) - 1} distinct mutations, {checks.rounds} broker rounds "
        f"checked (read-once, bounds, clipboard), {mallory['faults']} faults, "
        f"{mallory['dropped']} records dropped, {honest_rounds} honest alice->bob rounds exact, "
        f"{mallory_gestures} gestures for mallory ({dict(outcomes)})"
    )
    # The attack must have been real: every family used, faults and drops provoked.
    assert set(fams) >= {"index", "record", "proto", "header", "guest", "race", "answer"}
    assert mallory["faults"] > STEPS // 10 and mallory["dropped"] > STEPS // 10
    assert honest_rounds == len(range(50, STEPS, 100))
    assert outcomes["copy ok"] + outcomes["paste ok"] > 0, messages  # mallory was served too
    for name in ("alice", "bob", "carol"):
        assert next(vm for vm in status["vms"] if vm["name"] == name)["faults"] == 0
