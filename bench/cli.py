"""``python -m bench``: run everything side by side in one process tree and print the tables."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import copies, gesture, idle, report
from bench.cring import cring_row
from bench.harness import (
    CHUNK,
    SIZES,
    Measurement,
    Spec,
    prepared_payload,
    run_pingpong,
    run_throughput,
)
from bench.transports import IVCLIP, all_transports
from shm import layout

MAX_PAYLOADS = 5_000_000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_size(text: str) -> int:
    """'64', '4K', '1M', '16MiB' -> bytes.

    Raises:
        argparse.ArgumentTypeError: anything else, or not a positive size.
    """
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, value in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if number.endswith(suffix):
            number, mult = number[:-1], value
            break
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 64, 4K, 1M)")
    return int(number) * mult


def _sizes(text: str) -> list[int]:
    """Payload sizes: each at least 16 bytes (a stamp at both ends), a multiple of 8, and
    a multiple of the chunk when larger than it (every chunk is whole)."""
    sizes = [_parse_size(part) for part in text.split(",")]
    for size in sizes:
        if size < 16 or size % 8 or (size > CHUNK and size % CHUNK):
            raise argparse.ArgumentTypeError(
                f"payload size {size} must be a multiple of 8 from 16 bytes, and a multiple of "
                f"{CHUNK // 1024} KiB above that")
    return sizes


def _region_size(text: str) -> int:
    size = _parse_size(text)
    if not layout.valid_region_size(size):
        raise argparse.ArgumentTypeError(f"region size {text} must be a power of two from 1M to 1G")
    max_record = layout.expected_geometry(size).max_record
    if max_record < CHUNK:
        raise argparse.ArgumentTypeError(
            f"a {text} region holds records of at most {max_record} bytes, less than the benchmark's "
            f"{CHUNK // 1024} KiB chunks: use 4M or more")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="ivclip's ring against memcpy and other IPC transports, measured side by side",
    )
    p.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write one JSON row per measurement")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a log-log PNG of throughput")
    p.add_argument("--region-size", type=_region_size, default=layout.DEFAULT_REGION_SIZE,
                   help="ivclip region size (default: the broker's, 4M)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget per throughput cell (default 0.6, --quick 0.12)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="run only transports whose name contains NAME (repeatable)")
    p.add_argument("--sizes", type=_sizes, default=None, help="comma-separated payload sizes (e.g. 64,4K,1M)")
    p.add_argument("--repeats", type=int, default=None,
                   help="measured runs per cell, the best is kept (default 2, --quick 1)")
    for part in ("copies", "throughput", "latency", "idle", "gesture"):
        p.add_argument(f"--no-{part}", action="store_true", help=f"skip the {part} section")
    return p


def _calibrated(run: Callable[[Spec], Measurement], size: int, budget_s: float,
                repeats: int) -> Measurement:
    """A short probe to learn the rate, then `repeats` runs of about `budget_s`; the best wins.

    Noise from other work on the machine only ever slows a run down, so the
    fastest of a few runs is the least disturbed one.
    """
    first = max(1, min(2000, (4 << 20) // size))
    probe = run(Spec(size, first))
    if not probe.ok:
        return probe
    count = int(min(MAX_PAYLOADS, max(first, probe.msgs_per_s * budget_s)))
    runs = [run(Spec(size, count)) for _ in range(repeats)]
    good = [m for m in runs if m.ok]
    if not good:
        return runs[0]
    best = max(good, key=lambda m: m.bytes_per_s)
    best.extra["runs_bytes_per_s"] = [m.bytes_per_s for m in good]
    return best


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{model or platform.processor()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def _targets(
    measurements: Sequence[Measurement], latency: Sequence[Measurement], sizes: Sequence[int]
) -> list[tuple[str, str, str]]:
    by = {(m.transport, m.payload_bytes): m for m in measurements}
    out: list[tuple[str, str, str]] = []

    def rate(name: str, size: int) -> float:
        m = by.get((name, size))
        return m.bytes_per_s if m and m.ok else 0.0

    def best_peer(size: int) -> tuple[str, float]:
        best = report.best_peer(measurements, size, IVCLIP)
        return (best.transport, best.bytes_per_s) if best else ("-", 0.0)

    for name, want, label in (
        ("ivclip ring copy", 0.5, "copy API >= 50% of memcpy"),
        ("ivclip ring zero-copy", 0.7, "zero-copy API >= 70% of memcpy"),
    ):
        ceiling = report.ceiling_of(name)
        parts, met = [], True
        for size in (s for s in sizes if s >= 65536):
            memcpy = rate("memcpy", size)
            r = rate(name, size) / memcpy if memcpy else 0.0
            c = rate(ceiling, size) / memcpy if memcpy else 0.0
            parts.append(f"{report.size_label(size)} {r:.0%} (bare {ceiling.removesuffix(', 2 threads')}: "
                         f"{c:.0%})")
            met &= r >= want
        if parts:
            out.append((label + " (>= 64 KiB)", "met" if met else "NOT met", ", ".join(parts)))
    parts, met = [], True
    for size in (s for s in sizes if s >= 4096):
        ours = max((rate(n, size), n) for n in IVCLIP)
        peer, theirs = best_peer(size)
        r = ours[0] / theirs if theirs else math.inf
        c = rate(report.CRING_ONE_COPY, size) / theirs if theirs else math.inf
        parts.append(f"{report.size_label(size)} {r:.1f}x ({ours[1].removeprefix('ivclip ring ')} vs "
                     f"{peer}; bare C one-copy ring {c:.1f}x)")
        met &= r >= 2.0
    if parts:
        out.append(("ivclip >= 2x the best peer (4 KiB..16 MiB)", "met" if met else "NOT met",
                    ", ".join(parts)))
    if 64 in sizes:
        m = by.get(("ivclip ring batch", 64))
        mps = m.msgs_per_s if m and m.ok else 0.0
        out.append((">= 1 M 64-byte messages/s with batching", "met" if mps >= 1e6 else "NOT met",
                    f"{mps / 1e6:.2f} M/s"))
    for m in latency:
        if m.transport == "ivclip ring copy":
            ok = m.ok and m.p50_us <= 5.0
            out.append(("64-byte one-way p50 <= 5 us, both sides spinning", "met" if ok else "NOT met",
                        f"p50 {m.p50_us:.2f} us, p99 {m.p99_us:.2f} us" if m.ok else m.status))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    budget = args.seconds if args.seconds is not None else (0.12 if quick else 0.5)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 2)
    sizes = args.sizes or list(SIZES)
    transports = all_transports(args.region_size)
    if args.only:
        transports = [t for t in transports if any(o in t.name for o in args.only)]
    started = time.monotonic()
    geometry = layout.expected_geometry(args.region_size)
    print("ivclip benchmark" + (" (--quick)" if quick else ""))
    print(f"machine: {_machine()}")
    print(
        f"ivclip region {report.size_label(args.region_size)}: ring capacity "
        f"{geometry.guest_to_host.capacity} B, max_record {geometry.max_record} B; "
        f"{budget:g} s per throughput cell"
    )
    print()
    json_extra: list[dict[str, Any]] = []
    measurements: list[Measurement] = []
    latency: list[Measurement] = []

    if not args.no_copies:
        _log("copy strategies ...")
        strategy_rows = copies.strategy_table(0.05 if quick else 0.15)
        print("Copy strategies, measured in the ring's own C copy path (push_chunks, one core), GB/s")
        print("cold: 64 MiB ring, warm: 1 MiB ring; glibc = plain memcpy (its rep movsb path from 2 KiB),")
        print("pieces = 16-256 KiB copies as 4 KiB memcpys, vector = SSE2 loop, never rep movsb")
        blocks = copies.STRATEGY_BLOCKS
        cells_table: list[list[str]] = []
        for strategy in dict.fromkeys(r.strategy for r in strategy_rows):
            for cond in ("cold", "warm"):
                cells = {r.block: (r.cold_gb_s if cond == "cold" else r.warm_gb_s)
                         for r in strategy_rows if r.strategy == strategy}
                cells_table.append([f"{strategy} {cond}", *(f"{cells[b]:.1f}" for b in blocks)])
                json_extra.extend(
                    {"transport": f"copy strategy {strategy} ({cond})", "payload_bytes": b,
                     "bytes_per_s": cells[b] * 1e9, "msgs_per_s": cells[b] * 1e9 / b,
                     "p50_us": None, "p99_us": None, "kind": "copy-strategy"}
                    for b in blocks
                )
        print(report.render_table(["strategy", *(report.size_label(b) for b in blocks)],
                                  cells_table))
        print()

    if not args.no_throughput:
        print(f"Throughput: producer process -> consumer process, payloads from a prepared buffer "
              f"(chunked at {report.size_label(256 << 10)}); best of {repeats} runs; * = best peer")
        ring_size = geometry.guest_to_host.capacity
        for size in sizes:
            payload = prepared_payload(size)
            _log(f"throughput {report.size_label(size)}: references")
            references: list[Callable[[Spec], Measurement]] = [
                lambda spec, p=payload: copies.memcpy_row(spec, p),  # type: ignore[misc]
                lambda spec, p=payload: cring_row(spec, ring_size, p),  # type: ignore[misc]
                lambda spec, p=payload: cring_row(spec, ring_size, p, one_copy=True),  # type: ignore[misc]
            ]
            for reference in references:
                m = _calibrated(reference, size, budget / 2, repeats)
                m.extra["kind"] = "reference"
                measurements.append(m)
            for t in transports:
                why = t.unavailable()
                if why:
                    measurements.append(Measurement(t.name, size, status=why))
                    continue
                _log(f"throughput {report.size_label(size)}: {t.name}")
                def one_run(spec: Spec, t: Any = t) -> Measurement:
                    return run_throughput(t, spec, 60 + 10 * budget)

                m = _calibrated(one_run, size, budget, repeats)
                m.extra["kind"] = "throughput"
                measurements.append(m)
        table, notes = report.throughput_table(measurements, sizes, IVCLIP)
        print(table)
        for note in notes:
            print(note)
        print()
        print("p50/p99: time per payload between the consumer's receive calls (a batch shares its")
        print("interval among its payloads).  memcpy: one glibc memcpy per chunk into one buffer, one")
        print("core, hot caches.  C ring: a plain C SPSC ring of the same capacity between two threads,")
        print("copy in and copy out, no checks: the cross-core ceiling for any copying ring here.  C ring")
        print("one-copy: copy in, stamps checked in place: the ceiling for any zero-copy transport.")
        print("/C ring: an ivclip row over the C ring doing its copies (one-copy for zero-copy).")
        for t in transports:
            print(f"  {t.name}: {t.note}")
        print()

    if not args.no_latency:
        rounds = 2000 if quick else 10000
        for t in transports:
            if t.name == "ivclip ring zero-copy" or t.name == "ivclip ring batch":
                continue
            why = t.unavailable()
            if why:
                latency.append(Measurement(t.name, 64, status=why))
                continue
            _log(f"ping-pong: {t.name}")
            m = run_pingpong(t, rounds, timeout_s=120)
            m.extra["kind"] = "latency"
            latency.append(m)
        print("64-byte ping-pong, one-way latency (half the round trip); ivclip and iceoryx2 spin,")
        print("the kernel-based peers block")
        print(report.latency_table(latency))
        print()

    if not args.no_idle:
        _log("idle cost ...")
        gaps = (0.0002, 0.2) if quick else (0.0002, 0.002, 0.02, 0.2)
        results = idle.measure_idle(1.0 if quick else 3.0, gaps, 5 if quick else 20)
        print("Idle cost of the adaptive backoff (real rings, broker-shaped and driver-shaped loops)")
        idle_rows: list[list[str]] = []
        for r in results:
            wake = ", ".join(
                f"{g * 1000:g} ms idle: {p50 / 1000:.2f}/{p99 / 1000:.2f}"
                for g, (p50, p99) in sorted(r.wakeups.items())
            )
            idle_rows.append([f"{r.poller} ({r.regions} region{'s' if r.regions > 1 else ''}, "
                         f"max sleep {r.max_sleep_s * 1000:g} ms)",
                         f"{r.cpu_share:.2%}", wake])
            json_extra.append({"transport": f"idle {r.poller}", "payload_bytes": 0,
                               "bytes_per_s": 0, "msgs_per_s": 0, "p50_us": None, "p99_us": None,
                               "cpu_share": r.cpu_share, "regions": r.regions,
                               "wakeup_us": {str(g): v for g, v in r.wakeups.items()},
                               "kind": "idle"})
        print(report.render_table(
            ["poller", "idle CPU (one core)", "wake-up latency p50/p99 ms after an idle gap"],
            idle_rows, "lrl",
        ))
        print()

    if not args.no_gesture:
        _log("gesture latency ...")
        results_g = gesture.measure_gestures([1024, 16 << 20], 3 if quick else 10)
        print("End-to-end gesture: broker 'copy a' + 'paste b' requests, host-process guests")
        gesture_rows: list[list[str]] = []
        for g in results_g:
            gesture_rows.append([report.size_label(g.size), str(g.samples),
                         f"{g.p50_ms:.1f}", f"{g.p99_ms:.1f}", f"{g.copy_p50_ms:.1f}",
                         f"{g.paste_p50_ms:.1f}", g.status])
            json_extra.append({"transport": "ivclip gesture copy+paste", "payload_bytes": g.size,
                               "bytes_per_s": g.size / (g.p50_ms / 1000) if g.p50_ms else 0,
                               "msgs_per_s": 1000 / g.p50_ms if g.p50_ms else 0,
                               "p50_us": g.p50_ms * 1000, "p99_us": g.p99_ms * 1000,
                               "status": g.status, "kind": "gesture"})
        print(report.render_table(
            ["clipboard", "samples", "p50 ms", "p99 ms", "copy p50 ms", "paste p50 ms", "status"],
            gesture_rows, "lrrrrrl",
        ))
        print()

    if measurements or latency:
        print("Targets (reported, not asserted)")
        print(report.render_table(["target", "", "measured"], _targets(measurements, latency, sizes),
                                  "lll"))
        print()
    print(f"finished in {time.monotonic() - started:.0f} s; machine now: {_machine()}")
    if args.json:
        args.json.write_text(report.json_rows(measurements + latency, json_extra))
    if args.plot:
        why = report.plot(measurements, args.plot)
        if why:
            print(why, file=sys.stderr)
    return 0
