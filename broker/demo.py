"""``python -m broker demo [--qemu]``: the gated copy-paste, stage by stage.

Three guests, alice, bob and mallory, each with its own region.  alice copies
a secret (multi-byte UTF-8, CRLF, a random token); the host user makes the
copy gesture for alice and the paste gesture for bob; bob gets the exact
bytes.  After every stage mallory's region is scanned for any trace of the
secret, and mallory's own clipboard is checked at the end.

Without ``--qemu`` the guests are host processes mapping /dev/shm files; with
it they are three real QEMU guests (broker.tinyvm) with ivshmem-plain devices.
"""

from __future__ import annotations

import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from broker.lab import HostLab, trace_of

VMS = ["alice", "bob", "mallory"]


class DemoFailed(Exception):
    pass


def make_secret() -> bytes:
    token = secrets.token_hex(12)
    return f"Password: {token} — keep █ safe ✓\r\nsecond line\r\n".encode()


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def _check_mallory(lab: HostLab, secret: bytes, stage: str) -> None:
    found = trace_of(secret, lab.region_bytes("mallory"))
    if found:
        raise DemoFailed(f"mallory's region holds {found} {stage}")
    print(f"      mallory's region ({lab.size}): no trace of the secret {stage}", flush=True)


def _gesture(lab: HostLab, op: str, vm: str) -> str:
    result = lab.broker_cmd(op, vm)
    line = (result.stdout or result.stderr).strip()
    if result.returncode:
        raise DemoFailed(f"{op} gesture for {vm} failed: {line}")
    return line


def _retry(attempt: Callable[[], str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except DemoFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def host_flow(workdir: Path) -> None:
    secret = make_secret()
    with HostLab(VMS, workdir) as lab:
        lab.start_broker()
        for vm in VMS:
            lab.start_guest(vm)
        lab.wait_attached(VMS)
        _say("setup", "broker serving alice, bob, mallory; three guest drivers attached")

        result = lab.guest_cmd("alice", "copy", input=secret)
        if result.returncode:
            raise DemoFailed(f"copy in alice failed: {result.stderr.decode().strip()}")
        _say("1", f"Ctrl-C in alice: {result.stdout.decode().strip()}: {secret[:42]!r}...")
        _check_mallory(lab, secret, "after the copy in alice")

        _say("2", f"copy gesture for alice (host): {_gesture(lab, 'copy', 'alice')}")
        _check_mallory(lab, secret, "with the secret in the global clipboard")

        _say("3", f"paste gesture for bob (host): {_gesture(lab, 'paste', 'bob')}")
        _check_mallory(lab, secret, "after the paste to bob")

        result = lab.guest_cmd("bob", "paste")
        if result.stdout != secret:
            raise DemoFailed(f"bob got {result.stdout[:60]!r}, not the secret")
        _say("4", f"Ctrl-V in bob: {len(result.stdout)} bytes, identical to what alice copied")

        result = lab.guest_cmd("mallory", "paste")
        if result.returncode == 0:
            raise DemoFailed(f"mallory's clipboard holds {result.stdout[:60]!r}")
        _say("mallory", f"Ctrl-V in mallory: {result.stderr.decode().strip()}")
        _check_mallory(lab, secret, "at the end")

        again = lab.broker_cmd("paste", "mallory")
        if again.returncode == 0:
            raise DemoFailed("a second paste succeeded: the global clipboard was not wiped")
        _say("+", f"paste gesture for mallory: {again.stderr.strip()}")


# Real QEMU guests -------------------------------------------------------------
_DRIVER = """\
PY={python}
OUT=/run/ivclip-out
cd {root}
$PY -m guestdrv run --socket /run/ivclip-guest.sock > $OUT/driver.log 2>&1 &
i=0; while [ ! -S /run/ivclip-guest.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"""
_WAIT_STOP = """\
i=0; while [ ! -e $OUT/stop ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
"""
SCRIPTS = {
    "alice": _DRIVER + """\
$PY -m guestdrv copy --socket /run/ivclip-guest.sock < {secret} > $OUT/copy.txt 2>&1 && touch $OUT/ready
""" + _WAIT_STOP,
    "bob": _DRIVER + """\
touch $OUT/ready
$PY -m guestdrv paste --socket /run/ivclip-guest.sock --wait 150 > $OUT/pasted.part 2> $OUT/paste.err
mv $OUT/pasted.part $OUT/pasted
""" + _WAIT_STOP,
    # mallory also claims both capability bits in its own region, over and over:
    # the broker's authority is its private state, so this must gain nothing.
    "mallory": _DRIVER + """\
$PY -c '
import glob, mmap, os, struct, time
bar = [d for d in glob.glob("/sys/bus/pci/devices/*")
       if open(d + "/vendor").read().strip() == "0x1af4"
       and open(d + "/device").read().strip() == "0x1110"][0] + "/resource2"
fd = os.open(bar, os.O_RDWR)
m = mmap.mmap(fd, 4096)
end = time.time() + 300
while not os.path.exists("/run/ivclip-out/stop") and time.time() < end:
    m[128:132] = struct.pack("<I", 0xFFFFFFFF)
    time.sleep(0.01)
' &
touch $OUT/ready
""" + _WAIT_STOP + """\
$PY -m guestdrv paste --socket /run/ivclip-guest.sock > $OUT/clipboard 2> $OUT/paste.err
echo $? > $OUT/paste.rc
""",
}


def qemu_flow(workdir: Path) -> None:
    from broker import tinyvm

    reason = tinyvm.qemu_unavailable_reason()
    if reason:
        raise DemoFailed(f"real guests are not available here: {reason}")
    assets = tinyvm.ensure_assets(announce=lambda text: print(f"      {text}", flush=True))
    secret = make_secret()
    secret_file = workdir / "secret.txt"
    secret_file.write_bytes(secret)
    root = Path(__file__).resolve().parent.parent
    size = 4 << 20
    with HostLab(VMS, workdir, size="4M") as lab:
        lab.start_broker()
        vms: dict[str, tinyvm.TinyVm] = {}
        try:
            for name in VMS:
                out = workdir / f"out-{name}"
                out.mkdir()
                script = workdir / f"{name}.sh"
                script.write_text(SCRIPTS[name].format(
                    python=shlex.quote(sys.executable), root=shlex.quote(str(root)),
                    secret=shlex.quote(str(secret_file))))
                vm = tinyvm.TinyVm(name, assets, script=script, shm_path=lab.region_path(name),
                                   shm_size=size, out_dir=out, timeout_s=240)
                vm.start()
                vms[name] = vm
            _say("setup", "three QEMU guests booting (TCG), each with its own ivshmem-plain region")
            lab.wait_attached(VMS, timeout=150)
            ready = [workdir / f"out-{n}" / "ready" for n in VMS]
            HostLab._wait_for(lambda: all(p.exists() for p in ready), 120, "the guests' scripts")
            _say("setup", "broker serving alice, bob, mallory; the three guest drivers attached")
            _say("1", f"Ctrl-C in alice (inside the VM): {secret[:42]!r}...")
            _check_mallory(lab, secret, "after the copy in alice")
            _say("2", "copy gesture for alice (host): "
                 + _retry(lambda: _gesture(lab, "copy", "alice"), 60))
            _check_mallory(lab, secret, "with the secret in the global clipboard")
            _say("3", f"paste gesture for bob (host): {_gesture(lab, 'paste', 'bob')}")
            _check_mallory(lab, secret, "after the paste to bob")
            pasted = workdir / "out-bob" / "pasted"
            HostLab._wait_for(pasted.exists, 60, "bob's Ctrl-V")
            if pasted.read_bytes() != secret:
                raise DemoFailed(f"bob got {pasted.read_bytes()[:60]!r}, not the secret")
            _say("4", f"Ctrl-V in bob (inside the VM): {len(secret)} bytes, identical")
            for name in VMS:
                (workdir / f"out-{name}" / "stop").touch()
            for vm in vms.values():
                vm.wait(60)
            mallory_rc = (workdir / "out-mallory" / "paste.rc").read_text().strip()
            mallory_clip = (workdir / "out-mallory" / "clipboard").read_bytes()
            if mallory_rc == "0" or trace_of(secret, mallory_clip):
                raise DemoFailed(f"mallory's clipboard holds {mallory_clip[:60]!r}")
            err = (workdir / "out-mallory" / "paste.err").read_text().strip()
            _say("mallory", f"Ctrl-V in mallory (inside the VM): {err}")
            _check_mallory(lab, secret, "at the end (it set its capability bits all along)")
        finally:
            for vm in vms.values():
                vm.kill()


def run_demo(*, qemu: bool, log_level: str = "warning") -> int:
    kind = "three real QEMU guests" if qemu else "three simulated guests (host processes)"
    print(f"ivclip demo: gated copy-paste with {kind}: alice, bob, mallory", flush=True)
    with tempfile.TemporaryDirectory(prefix="ivclip-demo-") as tmp:
        workdir = Path(tmp)
        try:
            (qemu_flow if qemu else host_flow)(workdir)
        except (DemoFailed, TimeoutError) as exc:
            print(f"DEMO FAILED: {exc}", file=sys.stderr)
            for log in sorted(workdir.glob("**/*.log")):
                print(f"--- {log.name} (last lines)", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-15:]),
                      file=sys.stderr)
            return 1
    print("demo passed: bob got alice's exact bytes; mallory learned nothing", flush=True)
    return 0
