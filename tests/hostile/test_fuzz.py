"""A short atheris run of tests/fuzz/fuzz_vmlink.py (the long run is documented there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from inproc import FIGURES

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("IVCLIP_FUZZ_SECONDS", "20"))


def test_a_short_fuzz_run_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris; "
                                          "it ships wheels for Linux x86_64 only)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_vmlink.py"), f"-max_total_time={SECONDS}",
         "-print_final_stats=1", f"-artifact_prefix={tmp_path}/crash-", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 120)
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    assert proc.returncode == 0 and done, proc.stderr[-3000:]
    FIGURES["atheris fuzz"] = f"{done.group(1)} inputs in {done.group(2)} s (seed 1), 0 crashes"
    assert not list(tmp_path.glob("crash-*"))
