"""broker.audit: whole JSON lines, mode 0600, never content, carries on when the disk fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.audit import AuditLog, read_audit


def test_records_are_whole_json_lines_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.open()
    audit.record("copy", source="alice", target="clipboard", size=71, outcome="ok",
                 reason="copied 71 bytes from alice")
    audit.record("paste", source="alice", target="bob", size=71, outcome="denied", reason="no")
    audit.close()
    audit.close()  # twice is fine
    records = read_audit(path)
    assert [r["gesture"] for r in records] == ["copy", "paste"]
    assert set(records[0]) == {"time", "gesture", "source", "target", "size", "outcome", "reason"}
    assert records[1]["outcome"] == "denied" and records[1]["target"] == "bob"
    assert records[0]["time"].endswith("Z") and "T" in records[0]["time"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_reopened_log_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for n in range(2):
        audit = AuditLog(path)
        audit.open()
        audit.record("expire", source="alice", target="clipboard", size=n, outcome="wiped")
        audit.close()
    assert [r["size"] for r in read_audit(path)] == [0, 1]


def test_an_unknown_outcome_is_a_bug_not_a_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit outcome"):
        AuditLog(None).record("copy", source="a", target="b", size=1, outcome="great")


def test_a_failing_disk_is_logged_and_the_broker_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(Path("/dev/full"))
    audit.open()
    try:
        entry = audit.record("copy", source="a", target="clipboard", size=1, outcome="ok")
    finally:
        audit.close()
    assert entry["outcome"] == "ok" and audit.failures == 1
    assert "cannot write the audit log /dev/full" in caplog.text


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "audit.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        AuditLog(tmp_path / "audit.log").open()
