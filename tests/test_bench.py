"""bench: its command line refuses bad input clearly, and its reference rows and targets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import report
from bench.cli import _targets
from bench.cring import cring_row
from bench.harness import Measurement, Spec, prepared_payload


@pytest.mark.parametrize(("args", "words"), [
    (["--region-size", "2M"], "less than the benchmark's 256 KiB chunks"),
    (["--region-size", "3M"], "must be a power of two"),
    (["--sizes", "abc"], "'abc' is not a size"),
    (["--sizes", "64,7"], "payload size 7 must be a multiple of 8"),
    (["--sizes", "300K"], "a multiple of 256 KiB above that"),
])
def test_bad_arguments_get_a_usage_error(args: list[str], words: str) -> None:
    result = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("one_copy", [False, True])
def test_the_c_rings_move_every_chunk(one_copy: bool) -> None:
    spec = Spec(64 << 10, 200)
    m = cring_row(spec, 1 << 20, prepared_payload(spec.size), one_copy=one_copy)
    if not m.ok:
        pytest.skip(m.status)  # no C compiler: the row says why instead
    assert m.transport == (report.CRING_ONE_COPY if one_copy else report.CRING)
    assert m.payloads == 200 and m.bytes_per_s > 0


def test_zero_copy_rows_are_held_against_the_one_copy_ring() -> None:
    assert report.ceiling_of("ivclip ring zero-copy") == report.CRING_ONE_COPY
    assert report.ceiling_of("ivclip ring copy") == report.CRING
    assert report.ceiling_of("ivclip ring batch") == report.CRING


def test_targets_report_ivclip_beside_the_bare_c_ceilings() -> None:
    def row(name: str, gb_per_s: float) -> Measurement:
        return Measurement(name, 1 << 20, payloads=int(gb_per_s * 1000), seconds=(1 << 20) / 1e6)

    rows = [row("memcpy", 40), row(report.CRING, 12), row(report.CRING_ONE_COPY, 24),
            row("ivclip ring copy", 10), row("ivclip ring zero-copy", 16), row("ivclip ring batch", 9),
            row("iceoryx2", 20)]
    found = {label: (state, text) for label, state, text in _targets(rows, [], [1 << 20])}
    assert found["copy API >= 50% of memcpy (>= 64 KiB)"] == ("NOT met", "1 MiB 25% (bare C ring: 30%)")
    assert found["zero-copy API >= 70% of memcpy (>= 64 KiB)"] == (
        "NOT met", "1 MiB 40% (bare C ring one-copy: 60%)")
    assert found["ivclip >= 2x the best peer (4 KiB..16 MiB)"] == (
        "NOT met", "1 MiB 0.8x (zero-copy vs iceoryx2; bare C one-copy ring 1.2x)")
