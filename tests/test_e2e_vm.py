"""The gated copy-paste in three real QEMU guests (TCG where KVM is not real).

alice copies inside her VM, the host makes the copy and paste gestures, bob
pastes inside his VM, and mallory (whose VM keeps setting its own capability
bits) learns nothing: its region is scanned at every stage and its clipboard
is checked inside the VM at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import tinyvm
from broker.demo import qemu_flow

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def assets() -> tinyvm.TinyVmAssets:
    reason = tinyvm.qemu_unavailable_reason()
    if reason:
        pytest.skip(f"real guests unavailable: {reason}")
    try:
        return tinyvm.ensure_assets()
    except tinyvm.TinyVmUnavailable as exc:
        pytest.skip(f"real guests unavailable: {exc}")


def test_gated_copy_paste_in_three_real_guests(
    assets: tinyvm.TinyVmAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qemu_flow(tmp_path)  # raises DemoFailed with the reason on any broken promise
    out = capsys.readouterr().out
    for stage in ("[1]", "[2]", "[3]", "[4]", "[mallory]"):
        assert stage in out
    assert "identical" in out and "the clipboard is empty" in out
