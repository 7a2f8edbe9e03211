"""The policy, the audit log and the clipboard's time to live, as the broker applies them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from inproc import FakeConnection, InProcessLab

from broker.audit import read_audit
from broker.lab import HostLab, trace_of
from broker.policy import parse_policy
from control.framing import Frame
from control.server import Connection
from protocol.clipformat import TEXT_MIME, TextPolicy

BINARY = ("--type", "application/octet-stream")  # random bytes are no text for a strict driver

POLICY = """\
default = "allow"
denied_paste = "{on_deny}"

[[rule]]
what = "clipboard"
source = "alice"
target = "bob"
decision = "deny"

[[rule]]
source = "carol"
target = "@source"
decision = "deny"

[[rule]]
source = "*"
target = "eve"
decision = "deny"

[limits.clipboard]
alice = 100
bob = 50
"""


@pytest.fixture(params=["keep", "wipe"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InProcessLab]:
    policy = parse_policy(POLICY.format(on_deny=request.param), "policy.toml")
    lab = InProcessLab(tmp_path, ["alice", "bob", "carol", "eve"], ["alice", "bob", "carol"],
                       policy=policy, timeout_s=2.0)
    try:
        lab.attach_all()
        yield lab
    finally:
        lab.close()


def copy(lab: InProcessLab, vm: str, content: bytes) -> dict[str, Any]:
    lab.set_clipboard(vm, content)
    return lab.gesture("copy", vm)


def test_a_denied_paste_says_so_leaks_nothing_and_treats_the_clipboard_as_configured(
    lab: InProcessLab,
) -> None:
    secret = b"alice's secret " + os.urandom(40)
    assert copy(lab, "alice", secret)["ok"]
    reply = lab.gesture("paste", "bob")
    keep = lab.broker.config.policy.keep_on_deny
    assert reply["ok"] is False and reply["denied"] is True
    assert reply["message"].startswith("paste to bob DENIED, nothing pasted: denied by policy "
                                       "(policy.toml line 4: clipboard alice -> bob deny)")
    assert reply["message"].endswith("global clipboard kept" if keep else "global clipboard wiped")
    lab.pump(20)
    assert lab.clipboard_of("bob") is None
    assert trace_of(secret, lab.region_path("bob").read_bytes()) is None
    assert lab.broker.clipboard.empty is not keep
    if keep:
        assert lab.gesture("paste", "carol")["ok"]  # still there for an allowed paste
        assert lab.clipboard_of("carol") == secret
    records = read_audit(lab.audit_path)
    denied = [r for r in records if r["outcome"] == "denied"]
    assert len(denied) == 1 and denied[0]["source"] == "alice" and denied[0]["target"] == "bob"
    assert secret.hex() not in lab.audit_path.read_text() and b"secret" not in lab.audit_path.read_bytes()


TEXT_POLICY = """\
default = "allow"

[text]
"*" = "permissive"
bob = "strict"
"""


def test_the_policy_files_text_policy_refuses_before_any_byte_moves(tmp_path: Path) -> None:
    lab = InProcessLab(tmp_path, ["alice", "bob", "carol"], ["alice", "bob", "carol"],
                       policy=parse_policy(TEXT_POLICY, "policy.toml"), timeout_s=2.0)
    try:
        lab.attach_all()
        # carol's driver would refuse it on its own: make it permissive, as the file says.
        lab.drivers["carol"].text_policy = TextPolicy.PERMISSIVE
        trick = b"ls\x1b]0;pwned\x07 " + os.urandom(8).hex().encode()
        lab.set_clipboard("alice", trick, TEXT_MIME)
        assert lab.gesture("copy", "alice")["ok"]
        reply = lab.gesture("paste", "bob")
        assert reply["ok"] is False and reply["denied"] is True
        assert reply["message"] == (
            f"paste to bob REFUSED, nothing pasted: not valid text for bob ({TEXT_MIME} holds the "
            "control character U+001B; text policy strict, policy.toml line 5); global clipboard kept")
        lab.pump(20)
        assert lab.clipboard_of("bob") is None
        assert trace_of(trick, lab.region_path("bob").read_bytes()) is None
        assert [r["outcome"] for r in read_audit(lab.audit_path)][-1] == "refused"
        # Valid text passes the same check, and carol (permissive) takes the trick as it is.
        assert lab.gesture("paste", "carol")["ok"] and lab.clipboard_of("carol") == trick
        lab.set_clipboard("alice", "caf\u00e9 \u2014 ok\r\n".encode(), TEXT_MIME)
        assert lab.gesture("copy", "alice")["ok"]
        assert lab.gesture("paste", "bob")["ok"]
        assert lab.clipboard_of("bob") == "caf\u00e9 \u2014 ok\r\n".encode()
    finally:
        lab.close()


def test_pasting_back_into_the_source(lab: InProcessLab) -> None:
    # No rule against it for alice (the default allows): alice gets her own content back.
    assert copy(lab, "alice", b"mine" * 10)["ok"]
    assert lab.gesture("paste", "alice")["ok"]
    # carol's rule denies it.
    assert copy(lab, "carol", b"carol's own" * 3)["ok"]
    reply = lab.gesture("paste", "carol")
    assert not reply["ok"] and "carol -> @source deny" in reply["message"]


def test_a_denial_does_not_depend_on_the_target_being_attached(lab: InProcessLab) -> None:
    assert copy(lab, "carol", b"for nobody " * 3)["ok"]
    reply = lab.gesture("paste", "eve")  # eve has no driver at all
    assert reply["denied"] and "* -> eve deny" in reply["message"]


def test_per_vm_size_limits_hold_on_copy_and_on_paste(lab: InProcessLab) -> None:
    assert lab.broker.copy_limit("alice") == 100
    reply = copy(lab, "alice", b"x" * 101)  # the broker asked alice for at most 100 bytes
    assert not reply["ok"] and "over the limit of 100 bytes" in reply["message"]
    assert copy(lab, "carol", b"y" * 60)["ok"]
    reply = lab.gesture("paste", "bob")
    assert reply["denied"] and "over the clipboard limit of 50 bytes for bob, the target" in reply["message"]


def test_every_gesture_is_audited_once_with_its_outcome(lab: InProcessLab) -> None:
    assert copy(lab, "carol", b"z" * 30)["ok"]
    assert lab.gesture("paste", "alice")["ok"]
    assert not lab.gesture("paste", "alice")["ok"]  # nothing to paste: refused
    assert not lab.gesture("copy", "eve")["ok"]  # not attached: refused
    records = read_audit(lab.audit_path)
    assert [(r["gesture"], r["source"], r["target"], r["outcome"]) for r in records] == [
        ("copy", "carol", "clipboard", "ok"),
        ("paste", "carol", "alice", "ok"),
        ("paste", None, "alice", "refused"),
        ("copy", "eve", "clipboard", "refused"),
    ]
    assert records[0]["size"] == 30 and records[1]["size"] == 30


def test_the_clipboard_expires_unpasted_but_never_under_a_paste(tmp_path: Path) -> None:
    lab = InProcessLab(tmp_path, ["alice", "bob"], ["alice", "bob"], ttl_s=0.3)
    try:
        lab.attach_all()
        assert copy(lab, "alice", b"short-lived " * 4)["ok"]
        assert lab.broker.status()["clipboard"]["expires_in_s"] <= 0.3
        deadline = time.monotonic() + 10
        while not lab.broker.clipboard.empty and time.monotonic() < deadline:
            lab.pump()
        assert lab.broker.clipboard.empty
        assert lab.gesture("paste", "bob")["message"] == "nothing to paste: the global clipboard is empty"
        expired = [r for r in read_audit(lab.audit_path) if r["gesture"] == "expire"]
        assert expired and expired[0]["outcome"] == "wiped" and expired[0]["source"] == "alice"
        # A paste in flight when the time runs out completes first.
        content = os.urandom(200_000)
        assert copy(lab, "alice", content)["ok"]
        conn = FakeConnection()
        lab.broker._on_request(cast(Connection, conn), Frame({"op": "paste", "vm": "bob"}))
        time.sleep(0.35)
        lab.broker.expire_clipboard(time.monotonic())  # bob has not read anything yet
        assert not lab.broker.clipboard.empty
        while not conn.replies:
            lab.pump()
        assert conn.replies[0]["ok"] and lab.clipboard_of("bob") == content
    finally:
        lab.close()


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--vm", "alice", "--vm", "bob", "--size", "1M",
         "--shm-prefix", f"ivclip-t{os.getpid()}-cli-", "--socket", str(tmp_path / "b.sock"),
         "--audit-log", str(tmp_path / "audit.log"), *args],
        capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("text", "words"), [
    ('default = "allow"\n\n[[rule]]\nsource = "alice"\ntarget = "bob"\ndecision = "nope"\n',
     "line 6: decision must be 'allow' or 'deny', not 'nope'"),
    ('[[rule]]\nsource = "alice"\ntarget = "carol"\ndecision = "deny"\n',
     "line 1: the rule names 'carol', which this broker does not serve"),
    ('[limits.clipboard]\nalice = "1G"\n', "line 2: the clipboard limit for alice"),
    ("default = allow\n", "line 1: not valid TOML"),
])
def test_a_bad_policy_file_refuses_to_start_with_its_line(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(text)
    proc = serve(tmp_path, "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {config}: ") and words in proc.stderr


def test_the_cli_reports_a_denied_paste_as_a_failure(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text('default = "deny"\n')
    with HostLab(["alice", "bob"], tmp_path, size="1M", broker_args=["--config", str(config)]) as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm)
        lab.wait_attached(["alice", "bob"])
        assert lab.guest_cmd("alice", "copy", *BINARY, input=b"hello bob").returncode == 0
        assert lab.broker_cmd("copy", "alice").returncode == 0
        result = lab.broker_cmd("paste", "bob")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.strip() == (
            f"paste to bob DENIED, nothing pasted: denied by policy ({config}: default deny); "
            "global clipboard kept")
        assert lab.status()["policy"] == str(config)


def test_a_denial_that_wipes_never_corrupts_a_paste_in_flight(tmp_path: Path) -> None:
    policy = parse_policy('denied_paste = "wipe"\n[[rule]]\nsource = "*"\ntarget = "carol"\n'
                          'decision = "deny"\n[[rule]]\nsource = "*"\ntarget = "*"\ndecision = "allow"\n')
    lab = InProcessLab(tmp_path, ["alice", "bob", "carol"], ["alice", "bob", "carol"], policy=policy,
                       limit=1 << 20)
    try:
        lab.attach_all()
        content = os.urandom(900_000)  # more than the ring holds: the paste is still streaming below
        assert copy(lab, "alice", content)["ok"]
        conn = FakeConnection()
        lab.broker._on_request(cast(Connection, conn), Frame({"op": "paste", "vm": "bob"}))
        lab.broker.poll_once(time.monotonic())  # the first chunks go out; bob has read nothing
        denied = lab.gesture("paste", "carol")
        assert denied["denied"] and denied["message"].endswith(
            "global clipboard wiped once the paste in progress ends")
        while not conn.replies:
            lab.pump()
        assert conn.replies[0]["ok"] and lab.clipboard_of("bob") == content  # whole, not zeros
        assert lab.broker.clipboard.empty
    finally:
        lab.close()


def test_the_policy_file_decides_file_transfers_too_and_they_are_audited(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text('[[rule]]\nwhat = "file"\nsource = "host"\ntarget = "bob"\ndecision = "allow"\n'
                      '[[rule]]\nwhat = "file"\nsource = "*"\ntarget = "*"\ndecision = "deny"\n'
                      '[limits.file]\n"*" = "1K"\n')
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_bytes(b"x" * 100)
    (source / "big.txt").write_bytes(b"y" * 5000)
    with HostLab(["alice", "bob"], tmp_path, size="1M", broker_args=["--config", str(config)]) as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm, "--incoming", str(tmp_path / f"in-{vm}"))
        lab.wait_attached(["alice", "bob"])
        allowed = lab.broker_cmd("send", "bob", str(source / "small.txt"))
        assert allowed.returncode == 0, allowed.stderr
        assert (tmp_path / "in-bob" / "host" / "small.txt").read_bytes() == b"x" * 100
        too_big = lab.broker_cmd("send", "bob", str(source / "big.txt"))
        assert too_big.returncode == 1 and "denied by policy" in too_big.stderr
        assert "denied by policy (denied" not in too_big.stderr  # said once
        denied = lab.broker_cmd("send", "alice", str(source / "small.txt"))
        assert denied.returncode == 1
        assert denied.stderr.startswith("send to alice DENIED, nothing sent: denied by policy"), denied.stderr
        assert not (tmp_path / "in-alice").exists() or not any((tmp_path / "in-alice").rglob("*.txt"))
        records = [json.loads(line) for line in lab.audit_path.read_text().splitlines()]
        files = [(r["target"], r["outcome"]) for r in records if r["gesture"] == "file"]
        # The decision, and for the transfer that ran, its end.
        assert files == [("bob", "approved"), ("bob", "ok"), ("bob", "denied"), ("alice", "denied")]
        ended = next(r for r in records if r["gesture"] == "file" and r["outcome"] == "ok")
        assert ended["size"] == 100 and ended["reason"].startswith("sent 1 file (100 B) from host to bob")
