"""Honest-path latency with a hostile VM flooding the broker, against the quiet case.

``python -m bench.hostile_latency [--samples N] [--sizes 4K,1M] [--json PATH]``

A real broker serves alice, bob and mallory (4 MiB regions); alice and bob
run real guest drivers.  One sample is the host user's copy gesture for
alice followed by the paste gesture for bob, timed from the copy request to
the paste reply (which the broker sends once bob's driver confirmed it holds
the content), over the control socket directly so that no process start is
counted.  Scenarios:

* ``quiet``: mallory's region is idle;
* ``flood``: ``python -m broker.hostile --mode flood`` pushes well-formed
  unsolicited chunks of the largest size into mallory's ring as fast as the
  broker takes them (the costliest thing a guest can make the broker do
  without being marked faulty);
* ``chaos``: the adversary's full mutation mix (faults, races, garbage).

Prints median and 90th percentile per scenario and size, and each one's
ratio to the quiet median.  Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.lab import HostLab
from control.cli import parse_size
from control.sockets import request

SCENARIOS = ("quiet", "flood", "chaos")


def _one_sample(lab: HostLab, content: bytes) -> float:
    header = {"op": "copy", "type": "application/octet-stream"}
    reply = request(lab.guest_socket("alice"), header, content, timeout_s=30, max_body=0).header
    if not reply.get("ok"):
        raise RuntimeError(f"setting alice's clipboard failed: {reply}")
    started = time.perf_counter()
    for op, vm in (("copy", "alice"), ("paste", "bob")):
        reply = request(lab.socket, {"op": op, "vm": vm}, timeout_s=60, max_body=0).header
        if not reply.get("ok"):
            raise RuntimeError(f"{op} {vm} failed: {reply.get('message')}")
    return time.perf_counter() - started


def measure(samples: int, sizes: list[int], scenarios: tuple[str, ...] = SCENARIOS,
            seed: int = 1) -> dict[str, Any]:
    """Run every scenario; returns {scenario: {size: [seconds, ...]}} plus the setup.

    Raises:
        RuntimeError: a gesture failed (the honest path must always work).
        TimeoutError: the broker or a driver did not come up.
    """
    results: dict[str, dict[int, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ivclip-bench-") as tmp, \
            HostLab(["alice", "bob", "mallory"], Path(tmp), size="4M") as lab:
        lab.start_broker()
        for vm in ("alice", "bob"):
            lab.start_guest(vm, "--log-level", "warning")
        lab.wait_attached(["alice", "bob"])
        for scenario in scenarios:
            hostile = None
            if scenario != "quiet":
                hostile = subprocess.Popen(
                    [sys.executable, "-m", "broker.hostile", "--region", str(lab.region_path("mallory")),
                     "--seed", str(seed), "--duration", "600", "--mode",
                     "flood" if scenario == "flood" else "chaos", "--report", os.devnull],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # let the attack reach full speed
            try:
                results[scenario] = {}
                for size in sizes:
                    content = os.urandom(size)
                    _one_sample(lab, content)  # warm-up
                    results[scenario][size] = [_one_sample(lab, content) for _ in range(samples)]
            finally:
                if hostile is not None:
                    hostile.terminate()
                    hostile.wait(30)
        status = lab.status()
    mallory = next(vm for vm in status["vms"] if vm["name"] == "mallory")
    return {"samples": samples, "sizes": sizes, "results": results,
            "mallory": {"dropped": mallory["dropped"], "faults": mallory["faults"]}}


def summarise(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    results = report["results"]
    for size in report["sizes"]:
        quiet = statistics.median(results["quiet"][size]) if "quiet" in results else None
        for scenario, by_size in results.items():
            times = sorted(by_size[size])
            median = statistics.median(times)
            rows.append({
                "scenario": scenario, "size": size,
                "median_ms": round(median * 1e3, 2),
                "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1e3, 2),
                "vs_quiet": None if not quiet else round(median / quiet, 2),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_latency",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--sizes", default="4K,1M", help="comma-separated content sizes (default 4K,1M)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--json", type=Path, help="also write the raw report here")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if not set(scenarios) <= set(SCENARIOS) or "quiet" not in scenarios:
        parser.error(f"scenarios: some of {', '.join(SCENARIOS)}, quiet included")
    try:
        report = measure(args.samples, sizes, scenarios)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = summarise(report)
    print(f"copy gesture (alice) + paste gesture (bob), delivered; {args.samples} samples each")
    print(f"{'scenario':<8} {'size':>9} {'median ms':>10} {'p90 ms':>8} {'x quiet':>8}")
    for row in rows:
        print(f"{row['scenario']:<8} {row['size']:>9} {row['median_ms']:>10} {row['p90_ms']:>8} "
              f"{'-' if row['vs_quiet'] is None else row['vs_quiet']:>8}")
    print(f"mallory during the run: {report['mallory']['dropped']} records dropped, "
          f"{report['mallory']['faults']} faults")
    if args.json:
        args.json.write_text(json.dumps({**report, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
