"""``python -m bench.files``: file transfers through ivclip against ``cp -r`` and tar over a UNIX socket.

Two workloads, one run each by default: one large file (1 GiB) and a tree of
many small files (20,000 x 4 KiB, in folders of 200).  For each:

* ``ivclip g2g``  -- guest to guest: ``guestdrv send`` in alice, ``broker approve
  alice --to bob``; host-process guests on /dev/shm regions (broker.lab);
* ``ivclip h2g``  -- host to guest: ``broker send bob``;
* ``ivclip g2h``  -- guest to host: ``broker approve alice --to host``;
* ``cp -r``       -- between two folders on the same disk;
* ``tar | unix``  -- ``tar -c`` piped through a UNIX socket pair into ``tar -x``.

What is timed: for ivclip, the transfer itself, from the gesture to its outcome
(the gesture's own ``elapsed_s``): that is what a user waits for once they
approve.  The sender's scan, which runs before the offer, is reported
separately.  For the baselines, the whole command.  Every run starts with the
sources in the page cache (read once before) and no writeback pending (a sync,
not timed), and ends with the copy checked byte for byte against the source
(not timed); the copy itself is not flushed to disk (``cp`` and ``tar`` do not
either; ivclip flushes only for ``--move``).  ivclip
also computes a SHA-256 of every file on both ends, which the baselines do
not.

Ratios are throughput of the ivclip path divided by the baseline's (1.0 =
as fast; below 1 slower).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.lab import HostLab


@dataclass(slots=True)
class Row:
    workload: str
    method: str
    seconds: float
    mib_s: float
    files_s: float
    note: str = ""


def make_big(path: Path, size: int) -> None:
    """Incompressible data without spending a minute in urandom: one random block, shifted."""
    block = os.urandom(64 << 20)
    with path.open("wb") as f:
        written = 0
        while written < size:
            piece = block[written % 4096 :][: min(len(block) - written % 4096, size - written)]
            f.write(piece)
            written += len(piece)


def make_tree(root: Path, count: int, size: int, per_dir: int = 200) -> None:
    for i in range(count):
        folder = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            folder.mkdir(parents=True)
        (folder / f"f{i:06d}.bin").write_bytes(os.urandom(size))


def warm(path: Path) -> None:
    """Every run starts alike: the sources in the page cache (read once), and nothing of an
    earlier run still being written back (flushed first: writeback of the last copy, or of
    deleting it, would otherwise land on whichever method runs next)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with f.open("rb") as fh:
            while fh.read(1 << 20):
                pass
    os.sync()


def same_tree(a: Path, b: Path) -> bool:
    if a.is_file():
        return filecmp.cmp(a, b, shallow=False)
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        if mismatch or errors:
            return False
        stack.extend(c.subdirs.values())
    return True


def run_cp(src: Path, dst_dir: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst_dir)], check=True)
    return time.perf_counter() - started


def run_tar(src: Path, dst_dir: Path) -> float:
    """tar -c | AF_UNIX socket pair | tar -x."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    started = time.perf_counter()
    reader = subprocess.Popen(["tar", "-xf", "-", "-C", str(dst_dir)], stdin=right.fileno())
    writer = subprocess.Popen(["tar", "-cf", "-", "-C", str(src.parent), src.name], stdout=left.fileno())
    left.close()
    right.close()
    if writer.wait() or reader.wait():
        raise RuntimeError("tar failed")
    return time.perf_counter() - started


class Ivclip:
    """A broker and two host-process guests, for the three ivclip paths."""

    def __init__(self, work: Path, region_size: str) -> None:
        self.work = work
        self.lab = HostLab(["alice", "bob"], work / "lab", size=region_size,
                           broker_args=["--incoming", str(work / "in-host"), "--log-level", "warning"])
        (work / "lab").mkdir(parents=True)
        self.lab.start_broker()
        for vm in ("alice", "bob"):
            self.lab.start_guest(vm, "--incoming", str(work / f"in-{vm}"), "--log-level", "warning")
        self.lab.wait_attached(["alice", "bob"])

    def close(self) -> None:
        self.lab.close()

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) each ivclip process used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        procs = {"broker": self.lab.broker, **self.lab.guests}
        out = {}
        for name, proc in procs.items():
            assert proc is not None
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def guest_send(self, src: Path, target: str) -> tuple[float, float]:
        """(transfer seconds, scan-and-offer seconds) for alice -> target."""
        started = time.perf_counter()
        send = subprocess.Popen([sys.executable, "-m", "guestdrv", "send", str(src),
                                 "--socket", str(self.lab.guest_socket("alice"))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not self.lab.status()["files"]["offers"]:
            if send.poll() is not None:
                raise RuntimeError(f"send failed: {send.stderr.read() if send.stderr else ''}")
            time.sleep(0.01)
        offered = time.perf_counter() - started
        transfer = self._gesture(["approve", "alice", "--to", target])
        _out, err = send.communicate(timeout=3600)
        if send.returncode:
            raise RuntimeError(f"send failed: {err.strip()}")
        return transfer, offered

    def host_send(self, src: Path) -> float:
        return self._gesture(["send", "bob", str(src)])

    def _gesture(self, args: list[str]) -> float:
        """Run a gesture; the broker's own measure of it, from the request to the outcome."""
        result = self.lab.broker_cmd(*args, "--json", timeout=3600)
        if result.returncode:
            raise RuntimeError(f"{args[0]} failed: {(result.stdout + result.stderr).strip()}")
        return float(json.loads(result.stdout)["elapsed_s"])


def bench(args: argparse.Namespace) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="ivclip-bench-", dir=args.dir))
    rows: list[Row] = []
    ivclip: Ivclip | None = None
    try:
        workloads: list[tuple[str, Path, int, int]] = []
        if args.big_mib:
            big = base / "src-big" / "big.bin"
            big.parent.mkdir()
            make_big(big, args.big_mib << 20)
            workloads.append((f"1 file of {args.big_mib} MiB", big, 1, args.big_mib << 20))
        if args.files:
            tree = base / "src-tree" / "tree"
            make_tree(tree, args.files, args.file_kib << 10)
            workloads.append((f"{args.files} files of {args.file_kib} KiB", tree, args.files,
                              args.files * (args.file_kib << 10)))
        ivclip = Ivclip(base / "ivclip", args.region_size)
        for name, src, count, size in workloads:
            def row(method: str, seconds: float, note: str = "", *, _n: str = name, _c: int = count,
                    _s: int = size) -> None:
                rows.append(Row(_n, method, round(seconds, 3), round(_s / seconds / (1 << 20), 1),
                                round(_c / seconds, 1), note))
                print(f"  {_n:<24} {method:<12} {seconds:8.2f} s {rows[-1].mib_s:9.1f} MiB/s "
                      f"{rows[-1].files_s:10.1f} files/s  {note}", file=sys.stderr, flush=True)

            for _ in range(args.repeat):
                out = base / "out"
                for method in ("cp -r", "tar | unix"):
                    warm(src)
                    out.mkdir()
                    seconds = (run_cp if method == "cp -r" else run_tar)(src, out)
                    assert same_tree(src, out / src.name), f"{method} copy differs"
                    row(method, seconds)
                    shutil.rmtree(out)
                for method, target in (("ivclip g2g", "bob"), ("ivclip g2h", "host")):
                    warm(src)
                    before = ivclip.cpu()
                    seconds, offered = ivclip.guest_send(src, target)
                    used = _cpu_note(before, ivclip.cpu())
                    landed = ivclip.work / f"in-{target}" / "alice" / src.name
                    assert same_tree(src, landed), f"{method} copy differs"
                    row(method, seconds, f"cpu {used}; +{offered:.2f} s scan and offer before the gesture")
                    shutil.rmtree(landed) if landed.is_dir() else landed.unlink()
                warm(src)
                before = ivclip.cpu()
                seconds = ivclip.host_send(src)
                used = _cpu_note(before, ivclip.cpu())
                landed = ivclip.work / "in-bob" / "host" / src.name
                assert same_tree(src, landed), "ivclip h2g copy differs"
                row("ivclip h2g", seconds, f"cpu {used}; the broker reads the files")
                shutil.rmtree(landed) if landed.is_dir() else landed.unlink()
    finally:
        if ivclip is not None:
            ivclip.close()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _cpu_note(before: dict[str, float], after: dict[str, float]) -> str:
    return " ".join(f"{name} {after[name] - before[name]:.2f}s" for name in after)


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Best run of each method per workload; ivclip throughput over each baseline's."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        key = (r.workload, r.method)
        if key not in best or r.seconds < best[key].seconds:
            best[key] = r
    out = []
    for (workload, method), r in best.items():
        if not method.startswith("ivclip"):
            continue
        cp, tar = best[(workload, "cp -r")], best[(workload, "tar | unix")]
        out.append({"workload": workload, "method": method, "mib_s": r.mib_s,
                    "vs_cp": round(cp.seconds / r.seconds, 2), "vs_tar": round(tar.seconds / r.seconds, 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.files", description=__doc__.split("\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the large file (0: skip)")
    parser.add_argument("--files", type=int, default=20_000, help="number of small files (0: skip)")
    parser.add_argument("--file-kib", type=int, default=4, help="size of each small file")
    parser.add_argument("--region-size", default="4M", help="ivclip region size per VM (default 4M)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method (best is kept)")
    parser.add_argument("--dir", default=None, help="where to put sources and copies (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print the rows and ratios as JSON")
    args = parser.parse_args(argv)
    print(f"ivclip file-transfer benchmark ({os.cpu_count()} CPUs; region {args.region_size})",
          file=sys.stderr)
    rows = bench(args)
    summary = ratios(rows)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "ratios": summary}, indent=2))
        return 0
    print(f"\n{'workload':<24} {'method':<12} {'MiB/s':>9} {'x cp -r':>8} {'x tar|unix':>10}")
    for s in summary:
        print(f"{s['workload']:<24} {s['method']:<12} {s['mib_s']:9.1f} "
              f"{s['vs_cp']:8.2f} {s['vs_tar']:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
