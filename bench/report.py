"""The table on stdout, the JSON rows and the log-log plot."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import Measurement

UNITS = ((1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))


def size_label(n: int) -> str:
    for unit, name in UNITS:
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def rate_label(bytes_per_s: float) -> str:
    if not bytes_per_s:
        return "-"
    for unit, name in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
        if bytes_per_s >= unit:
            return f"{bytes_per_s / unit:.2f} {name}"
    return f"{bytes_per_s:.0f} B/s"


def _num(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]], aligns: str = "") -> str:
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    aligns = aligns or "l" + "r" * (len(headers) - 1)

    def fmt(row: Sequence[str]) -> str:
        cells = zip(row, widths, aligns, strict=False)
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in cells).rstrip()

    line = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), line, *(fmt(r) for r in rows)])


CRING = "C ring, 2 threads"
CRING_ONE_COPY = "C ring one-copy, 2 threads"
REFERENCES = ("memcpy", CRING, CRING_ONE_COPY)


def ceiling_of(transport: str) -> str:
    """The bare C ring that does the same copies as an ivclip row: one copy for the
    zero-copy API (the consumer checks in place), one in and one out for the others."""
    return CRING_ONE_COPY if transport.endswith("zero-copy") else CRING


def throughput_table(
    measurements: Sequence[Measurement], sizes: Sequence[int], ivclip: Sequence[str]
) -> tuple[str, list[str]]:
    """Rows per size and transport, with the ratio columns for ivclip rows; and footnotes."""
    by: dict[tuple[str, int], Measurement] = {(m.transport, m.payload_bytes): m for m in measurements}
    names = list(dict.fromkeys(m.transport for m in measurements))
    notes: dict[str, str] = {}
    out_rows = []
    for size in sizes:
        memcpy = by.get(("memcpy", size))
        best = best_peer(measurements, size, ivclip)
        for name in names:
            m = by.get((name, size))
            if m is None:
                continue
            if not m.ok:
                mark = notes.setdefault(f"{name}: {m.status}", f"[{len(notes) + 1}]")
                out_rows.append([size_label(size), name, f"n/a {mark}", "", "", "", "", "", "", ""])
                continue
            mine = name in ivclip
            cring = by.get((ceiling_of(name), size))
            out_rows.append([
                size_label(size),
                name + (" *" if best is m else ""),
                rate_label(m.bytes_per_s),
                f"{m.msgs_per_s:,.0f}",
                _num(m.p50_us),
                _num(m.p99_us),
                ratio(m.bytes_per_s, memcpy.bytes_per_s) if memcpy and memcpy.ok and mine else "",
                ratio(m.bytes_per_s, cring.bytes_per_s) if cring and cring.ok and mine else "",
                ratio(m.bytes_per_s, best.bytes_per_s) if best and mine else "",
                best.transport if best and mine else "",
            ])
    table = render_table(
        ["payload", "transport", "throughput", "payloads/s", "p50 us", "p99 us",
         "/memcpy", "/C ring", "/best peer", "best peer"],
        out_rows,
        "llrrrrrrrl",
    )
    return table, [f"{mark} {text}" for text, mark in notes.items()]


def best_peer(
    measurements: Sequence[Measurement], size: int, ivclip: Sequence[str]
) -> Measurement | None:
    peers = [
        m for m in measurements
        if m.payload_bytes == size and m.ok and m.transport not in ivclip
        and m.transport not in REFERENCES and m.extra.get("kind") != "latency"
    ]
    return max(peers, key=lambda m: m.bytes_per_s, default=None)


def latency_table(measurements: Sequence[Measurement]) -> str:
    rows = []
    for m in measurements:
        if m.ok:
            rows.append([m.transport, _num(m.p50_us, 2), _num(m.p99_us, 2), f"{m.payloads}"])
        else:
            rows.append([m.transport, m.status, "", ""])
    return render_table(["transport", "one-way p50 us", "one-way p99 us", "round trips"], rows)


def json_rows(measurements: Sequence[Measurement], extra_rows: Sequence[dict[str, Any]]) -> str:
    rows: list[dict[str, Any]] = []
    for m in measurements:
        rows.append({
            "transport": m.transport,
            "payload_bytes": m.payload_bytes,
            "bytes_per_s": m.bytes_per_s,
            "msgs_per_s": m.msgs_per_s,
            "p50_us": None if math.isnan(m.p50_us) else m.p50_us,
            "p99_us": None if math.isnan(m.p99_us) else m.p99_us,
            "payloads": m.payloads,
            "seconds": m.seconds,
            "status": m.status,
            **m.extra,
        })
    rows.extend(extra_rows)
    return json.dumps(rows, indent=1)


def plot(measurements: Sequence[Measurement], path: Path) -> str | None:
    """Write the PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc}); pip install matplotlib"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    tab20 = plt.get_cmap("tab20")
    ax.set_prop_cycle(color=[tab20(i) for i in range(20)])  # 12+ lines: tab10 would repeat
    names = list(dict.fromkeys(m.transport for m in measurements if m.extra.get("kind") != "latency"))
    for name in names:
        points = sorted(
            (m.payload_bytes, m.bytes_per_s)
            for m in measurements
            if m.transport == name and m.ok and m.bytes_per_s and m.extra.get("kind") != "latency"
        )
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        style = "-" if name.startswith("ivclip") else ("--" if name == "memcpy" else ":")
        ax.plot(xs, ys, style, marker="o", label=name, linewidth=2 if name.startswith("ivclip") else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload size (bytes)")
    ax.set_ylabel("throughput (bytes/s)")
    ax.set_title("ivclip ring vs. memcpy and other IPC transports (producer -> consumer process)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
