"""What a terminal shows during a transfer, and silence elsewhere."""

from __future__ import annotations

import io

from control.progress import ProgressBar, files_phrase, human_size


def test_human_sizes() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB"]


def test_files_phrases_count_in_good_english() -> None:
    assert [files_phrase(f, e) for f, e in ((1, 1), (2, 2), (0, 1), (1, 2), (3, 5))] == [
        "1 file", "2 files", "0 files and 1 other entry", "1 file and 1 other entry",
        "3 files and 2 other entries"]


def test_the_bar_shows_files_bytes_rate_and_time_left() -> None:
    bar = ProgressBar(io.StringIO(), enabled=True)
    info = {"phase": "sending", "entries": 3, "entries_total": 10, "bytes": 0, "bytes_total": 100 << 20}
    bar.render(info, now=100.0)
    line = bar.render({**info, "bytes": 25 << 20}, now=102.0)
    assert line.startswith("3/10 entries  25.0 MiB/100.0 MiB  [#####")
    assert "12.5 MiB/s" in line and "0:06 left" in line


def test_quiet_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)  # a StringIO is not a terminal
    bar.update({"phase": "waiting", "message": "waiting for the host user"})
    bar.close()
    assert out.getvalue() == ""


def test_on_a_terminal_one_line_is_redrawn_then_ended() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, enabled=True)
    bar.update({"phase": "waiting", "message": "waiting for the host user"})
    bar.update({"phase": "waiting", "message": "waiting"})
    bar.close()
    assert out.getvalue() == "\rwaiting for the host user\rwaiting                  \n"
