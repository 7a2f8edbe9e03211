"""Tests for broker.tinyvm: fast unit tests, plus real QEMU guests marked `vm`."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import sys
import uuid
from pathlib import Path

import pytest

from broker.tinyvm import (
    TinyVm,
    TinyVmAssets,
    TinyVmUnavailable,
    _cpio_newc,
    _kvm_usable,
    accel_args,
    ensure_assets,
    extract_vmlinux,
    qemu_unavailable_reason,
)

PATTERN = hashlib.sha256(b"ivclip-tinyvm").digest() * 2  # 64 bytes
SHM_SIZE = 1 << 20


# --------------------------------------------------------------------------- fast

def test_the_first_download_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import tinyvm

    def no_apt(argv: list[str], **_: object) -> None:
        raise TinyVmUnavailable(f"{argv[0]} is not reachable in this test")

    monkeypatch.setattr(tinyvm, "_find_busybox", lambda: Path("/bin/sh"))
    monkeypatch.setattr(tinyvm, "_newest_kernel_package", lambda: "linux-image-9.9.9-1-amd64")
    monkeypatch.setattr(tinyvm, "_run", no_apt)
    said: list[str] = []
    with pytest.raises(TinyVmUnavailable, match="not reachable"):
        ensure_assets(tmp_path / "cache", announce=said.append)
    assert said == [f"fetching the guest kernel (linux-image-9.9.9-1-amd64, about 70 MB, once) "
                    f"into {tmp_path / 'cache'}"]


def test_kvm_only_with_real_virtualisation():
    intel = "processor\t: 0\nflags\t\t: fpu sse2 vmx avx\n"
    amd = "flags\t\t: fpu svm\n"
    plain = "flags\t\t: fpu sse2 avx\n"
    assert _kvm_usable(intel, pvm_loaded=False, dev_kvm_rw=True)
    assert _kvm_usable(amd, pvm_loaded=False, dev_kvm_rw=True)
    assert not _kvm_usable(plain, pvm_loaded=False, dev_kvm_rw=True)
    assert not _kvm_usable(intel, pvm_loaded=True, dev_kvm_rw=True)   # kvm_pvm crawls and dies
    assert not _kvm_usable(intel, pvm_loaded=False, dev_kvm_rw=False)
    assert not _kvm_usable("model name: vmx svm\n", pvm_loaded=False, dev_kvm_rw=True)
    assert accel_args() in (["-accel", "kvm", "-cpu", "host"], ["-accel", "tcg"])


@pytest.mark.parametrize("compress", [
    lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda b: gzip.compress(b, mtime=0),
], ids=["xz", "gzip"])
def test_extract_vmlinux_finds_stream_after_decoys(compress):
    elf = b"\x7fELF\x02\x01\x01" + os.urandom(5000)
    # A setup header, a false magic, a stream that decodes to non-ELF, then the real
    # payload followed by the size word and padding the kernel build appends.
    bzimage = (b"MZ" + b"\0" * 500 + b"HdrS" + b"\xfd7zXZ\x00garbage\x1f\x8b\x08junk"
               + compress(b"not an elf") + b"\0" * 3
               + compress(elf) + len(elf).to_bytes(4, "little") + b"\0" * 64)
    assert extract_vmlinux(bzimage) == elf


def test_extract_vmlinux_rejects_image_without_kernel():
    with pytest.raises(ValueError):
        extract_vmlinux(b"MZ" + b"\0" * 1000)


def test_cpio_newc_layout():
    entries = [("init", 0o100755, b"#!/bin/sh\n", 0, 0), ("dev/console", 0o20600, b"", 5, 1)]
    archive = _cpio_newc(entries)
    seen, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701" and pos % 4 == 0
        f = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        name = archive[pos + 110:pos + 110 + f[11] - 1].decode()
        data_at = (pos + 110 + f[11] + 3) & ~3
        seen.append((name, f[1], archive[data_at:data_at + f[6]], f[9], f[10]))
        pos = (data_at + f[6] + 3) & ~3
        if name == "TRAILER!!!":
            break
    assert seen[:2] == entries
    assert pos == len(archive)


def test_script_path_must_fit_kernel_cmdline(tmp_path):
    assets = TinyVmAssets(kernel=tmp_path / "k", initramfs=tmp_path / "i")
    kw = {"shm_path": None, "shm_size": None, "out_dir": tmp_path}
    with pytest.raises(ValueError):
        TinyVm("x", assets, script=tmp_path / "has space.sh", **kw)
    with pytest.raises(ValueError):
        TinyVm("bad/name", assets, script=tmp_path / "s.sh", **kw)


# --------------------------------------------------------------------------- real guests

def _assets_or_skip() -> TinyVmAssets:
    reason = qemu_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        return ensure_assets()
    except TinyVmUnavailable as e:
        pytest.skip(str(e))


GUEST_PY = """
import mmap, pathlib
pattern = bytes.fromhex("{pattern}")
def ident(dev):
    return tuple((dev / f).read_text().strip() for f in ("vendor", "device"))
for dev in sorted(pathlib.Path("/sys/bus/pci/devices").iterdir()):
    if ident(dev) == ("0x1af4", "0x1110"):
        break
else:
    raise SystemExit("no ivshmem device")
with open(dev / "resource2", "r+b") as f, mmap.mmap(f.fileno(), {size}) as m:
    m[0:64] = pattern
    m.flush()
pathlib.Path("/run/ivclip-out/guest-done.txt").write_text(dev.name + "\\n")
print("ivshmem at", dev.name)
"""


@pytest.mark.vm
def test_guest_writes_shared_memory_and_out_dir(tmp_path):
    assets = _assets_or_skip()
    shm = Path(f"/dev/shm/ivclip-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(shm, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, SHM_SIZE)
        script = tmp_path / "guest.sh"
        script.write_text(f"set -e\n{sys.executable} - <<'EOF'\n"
                          f"{GUEST_PY.format(pattern=PATTERN.hex(), size=SHM_SIZE)}EOF\n")
        out = tmp_path / "out"
        with TinyVm("ivshm", assets, script=script, shm_path=shm, shm_size=SHM_SIZE,
                    out_dir=out, timeout_s=120) as vm:
            vm.start()
            rc = vm.wait()
            console = vm.console_text()
        assert rc == 0 and vm.script_exit_code() == 0, console
        assert os.pread(fd, 64, 0) == PATTERN, console
        assert (out / "guest-done.txt").read_text().strip(), console
    finally:
        os.close(fd)
        shm.unlink()


@pytest.mark.vm
def test_guest_is_killed_at_its_timeout(tmp_path):
    assets = _assets_or_skip()
    script = tmp_path / "hang.sh"
    script.write_text("sleep 600\n")
    with TinyVm("hang", assets, script=script, shm_path=None, shm_size=None,
                out_dir=tmp_path / "out", timeout_s=8) as vm:
        vm.start()
        with pytest.raises(TimeoutError):
            vm.wait()
        vm.kill()  # second kill is a no-op
    assert vm._proc is not None and vm._proc.poll() is not None
