"""Boot tiny throwaway Linux guests under QEMU for demos and tests.

A guest is a stock Debian kernel plus a few-MiB initramfs (static busybox and the
virtio/9p modules).  Its /init mounts the *host* root filesystem read-only over 9p,
chroots into it and runs one shell script, so the guest uses the host's own
binaries and Python environments (call interpreters by full path: a bare
``python3`` in the chroot may resolve to Debian's system Python).

What the guest script sees:

* ``/``                -- the host root, read-only (9p, ``cache=loose``: host-side
  changes made while the guest runs may not be seen).
* ``/run/ivclip-out``  -- the host ``out_dir``, writable.  Write results here.
* ``/run``, ``/dev/shm`` -- guest-private tmpfs.  ``HOME`` and ``TMPDIR`` are ``/run``.
  ``/tmp`` is the host's, read-only like the rest: a project checked out or a
  script kept under the host's /tmp (pytest's tmp_path) is found there.
* ``/proc``, ``/sys``, ``/dev`` -- the guest's own.
* the ivshmem device (when ``shm_path`` is given): the PCI function under
  ``/sys/bus/pci/devices`` whose ``vendor`` is 0x1af4 and ``device`` 0x1110; its
  ``resource2`` file mmaps BAR2, i.e. the host file at ``shm_path``.

The console (``TinyVm.console_log``, in ``out_dir``) gets ``IVCLIP-SCRIPT-START``
before the script runs and ``IVCLIP-SCRIPT-EXIT <code>`` after it; the guest then
powers off, so QEMU exits 0 whatever the script did (see ``script_exit_code``).

KVM is used only where it is real (vmx/svm, not kvm_pvm); otherwise TCG with
``-cpu max`` (numpy >= 2.4 dies with SIGILL on the default qemu64 model).  Under
TCG on 2 cores a boot to script start takes about 2-2.5 s, 3.5-4 s with three
guests at once.  Usage::

    assets = ensure_assets()
    with TinyVm("demo", assets, script=path, shm_path=None, shm_size=None,
                out_dir=out) as vm:
        vm.start()
        vm.wait()                   # QEMU's exit code
        vm.script_exit_code()       # the script's
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
OUT_MOUNT = "/run/ivclip-out"
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_pci", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p",
)
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_NO_BUSYBOX = "no statically linked busybox found (apt-get install busybox-static)"

# Runs as PID 1 in the initramfs.  Every failure path ends in poweroff so QEMU
# exits promptly instead of idling until the host-side timeout.
_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t proc proc /proc
mount -t sysfs sysfs /sys
die() { echo "IVCLIP-INIT-ERROR $*"; echo "IVCLIP-SCRIPT-EXIT 255"; poweroff -f; }
loaded=""
for m in @MODULES@; do
  [ -f /lib/modules/$m.ko ] || continue
  insmod /lib/modules/$m.ko && loaded="$loaded $m" || echo "IVCLIP-INIT-WARN insmod $m failed"
done
echo "IVCLIP-MODULES$loaded"
[ -n "$ivclip_script" ] || die "no ivclip_script= on the kernel command line"
o=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o ro,cache=loose,$o hostroot /newroot || die "cannot mount host root"
for d in proc sys dev; do mount -o rbind /$d /newroot/$d || die "cannot bind /$d"; done
mount -t tmpfs -o mode=755 tmpfs /newroot/run || die "cannot mount /run"
mkdir @OUT@ && mount -t 9p -o $o ivclipout @OUT@ || die "cannot mount out share"
s=$ivclip_script
echo "IVCLIP-SCRIPT-START $(cut -d' ' -f1 /proc/uptime)"
HOME=/run TMPDIR=/run PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  chroot /newroot /bin/sh "$s"
echo "IVCLIP-SCRIPT-EXIT $?"
sync
poweroff -f
""".replace("@MODULES@", " ".join(MODULES)).replace("@OUT@", "/newroot" + OUT_MOUNT)

# Kernel parameters: quiet serial console, exit on panic (with -no-reboot), and
# skip probing that only costs time under TCG.
_CMDLINE = (
    "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=1 tsc=reliable "
    "no_timer_check cryptomgr.notests mitigations=off i8042.noaux i8042.nopnp "
    "random.trust_cpu=on"
)


class TinyVmUnavailable(Exception):
    """Raised with a clear, user-facing reason when QEMU, the kernel package or busybox
    cannot be had."""


# --------------------------------------------------------------------------- host checks

def _elf_is_static(path: Path) -> bool:
    """True if the ELF at ``path`` has no PT_INTERP (no dynamic loader). Raises OSError."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:6] != b"\x7fELF\x02\x01":  # 64-bit little-endian: we only run on x86_64
            return False
        order: Literal["little"] = "little"
        phoff = int.from_bytes(hdr[32:40], order)
        phentsize = int.from_bytes(hdr[54:56], order)
        phnum = int.from_bytes(hdr[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i:i + 4], order) != 3  # PT_INTERP
               for i in range(0, len(table), phentsize))


def _find_busybox() -> Path | None:
    """Path of a statically linked busybox, or None."""
    for cand in (shutil.which("busybox"), *_BUSYBOX_CANDIDATES):
        if cand and os.path.isfile(cand):
            try:
                if _elf_is_static(Path(cand)):
                    return Path(cand)
            except OSError:
                continue
    return None


def qemu_unavailable_reason() -> str | None:
    """None if QEMU and a static busybox are present, else a reason.

    Never raises, never downloads.
    """
    if not shutil.which(QEMU):
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    if not shutil.which("timeout"):
        return "coreutils 'timeout' not found"
    if _find_busybox() is None:
        return _NO_BUSYBOX
    return None


def _kvm_usable(cpuinfo: str, pvm_loaded: bool, dev_kvm_rw: bool) -> bool:
    """Pure decision behind accel_args(). Never raises.

    kvm_pvm (a software nested hypervisor) crawls and dies on stock kernels: never use it.
    """
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"vmx", "svm"}) and not pvm_loaded and dev_kvm_rw


def accel_args() -> list[str]:
    """QEMU accelerator arguments: real KVM where usable, else TCG. Never raises."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    usable = _kvm_usable(cpuinfo, os.path.exists("/sys/module/kvm_pvm"),
                         os.access("/dev/kvm", os.R_OK | os.W_OK))
    return ["-accel", "kvm", "-cpu", "host"] if usable else ["-accel", "tcg"]


# --------------------------------------------------------------------------- assets

@dataclass(frozen=True)
class TinyVmAssets:
    kernel: Path      # uncompressed vmlinux (PVH boot: no in-guest decompression under TCG)
    initramfs: Path   # gzip cpio: static busybox, modules, /init


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel embedded in a bzImage.

    Tries every xz (then gzip) stream start until one decompresses to an ELF image;
    data after the stream (the kernel appends its size and more) is ignored.
    Raises ValueError if no such stream exists.
    """
    decoders = (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), lzma.LZMAError),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(31), zlib.error),
    )
    view = memoryview(bzimage)
    for magic, make, error in decoders:
        pos = bzimage.find(magic)
        while pos != -1:
            try:
                out = make().decompress(view[pos:])
            except error:
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            pos = bzimage.find(magic, pos + 1)
    raise ValueError("no xz or gzip stream holding an ELF kernel found in the bzImage")


def _cpio_newc(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """Build a newc cpio archive from (name, mode, data, rdev_major, rdev_minor). Never raises."""
    parts: list[bytes] = []

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    for ino, (name, mode, data, rmaj, rmin) in enumerate(
            [*entries, ("TRAILER!!!", 0, b"", 0, 0)], start=1):
        bname = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(bname), 0)
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        parts += [hdr, bname, pad(len(hdr) + len(bname)), data, pad(len(data))]
    return b"".join(parts)


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed if .ko.xz/.ko.gz (busybox insmod wants plain ELF).

    Raises OSError, lzma.LZMAError, gzip.BadGzipFile.
    """
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _build_initramfs(busybox: Path, modules: dict[str, bytes]) -> bytes:
    """Gzipped cpio of busybox, modules and /init, byte-for-byte reproducible. Raises OSError."""
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG
    dirs = ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")
    entries = [(n, d, b"", 0, 0) for n in dirs]
    # Without /dev/console in the archive, PID 1 would start with no stdio at all.
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries.append(("bin/busybox", f | 0o755, busybox.read_bytes(), 0, 0))
    entries.append(("init", f | 0o755, _INIT.encode(), 0, 0))
    entries += [(f"lib/modules/{m}.ko", f | 0o644, ko, 0, 0) for m, ko in sorted(modules.items())]
    return gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)


def _version_key(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", s))


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host tool; raises TinyVmUnavailable with its stderr if it fails or is missing."""
    if not shutil.which(cmd[0]):
        raise TinyVmUnavailable(f"{cmd[0]} not found: tinyvm needs a Debian-style host with apt")
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise TinyVmUnavailable(f"{' '.join(cmd)} took over 600 s") from None
    if res.returncode != 0:
        raise TinyVmUnavailable(
            f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res


def _newest_kernel_package() -> str:
    """Newest plain linux-image-<ver>-amd64 apt knows (not cloud/rt/dbg).

    Raises TinyVmUnavailable.
    """
    out = _run(["apt-cache", "search", "--names-only", r"^linux-image-[0-9].*-amd64$"]).stdout
    names = [line.split(" ", 1)[0] for line in out.splitlines()]
    names = [n for n in names if re.fullmatch(r"linux-image-[0-9][0-9.]*-[0-9]+-amd64", n)]
    if not names:
        raise TinyVmUnavailable(
            "apt knows no linux-image-<version>-amd64 package (run 'apt-get update')")
    return max(names, key=_version_key)


def _fetch_kernel(cache_dir: Path, announce: Callable[[str], None] | None = None) -> Path:
    """Download the newest Debian kernel package and distil it into cache_dir/kernel-<ver>.

    Keeps only vmlinux and the few modules the guest needs (the unpacked package is
    ~400 MB).  Raises TinyVmUnavailable.
    """
    pkg = _newest_kernel_package()
    kdir = cache_dir / f"kernel-{pkg.removeprefix('linux-image-')}"
    log.info("tinyvm: fetching %s into %s", pkg, cache_dir)
    if announce is not None:
        announce(f"fetching the guest kernel ({pkg}, about 70 MB, once) into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        # As root apt would try to drop to _apt, which cannot write into our cache dir.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", "download", *sandbox, pkg], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise TinyVmUnavailable(f"apt-get download {pkg} produced {len(debs)} .deb files")
        tree = tmp / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(tree)])
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise TinyVmUnavailable(f"{pkg} has no /boot/vmlinuz-*")
        try:
            vmlinux = extract_vmlinux(vmlinuz[-1].read_bytes())
        except ValueError as e:
            raise TinyVmUnavailable(f"cannot extract vmlinux from {pkg}: {e}") from e
        out = tmp / "kernel"
        (out / "modules").mkdir(parents=True)
        found = {}
        for base in ("lib/modules", "usr/lib/modules"):  # the latter on merged-/usr kernels
            for ko in (tree / base).glob("*/kernel/**/*.ko*"):
                if ko.name.split(".ko")[0] in MODULES:
                    found[ko.name.split(".ko")[0]] = ko
        for name, ko in found.items():
            (out / "modules" / f"{name}.ko").write_bytes(_read_module(ko))
        (out / "vmlinux").write_bytes(vmlinux)
        (out / "package").write_text(pkg + "\n")
        log.info("tinyvm: %s: vmlinux %d bytes, modules: %s",
                 pkg, len(vmlinux), " ".join(sorted(found)))
        if kdir.exists():
            shutil.rmtree(kdir)
        out.rename(kdir)  # atomic publish: a kernel dir exists only when complete
    return kdir


def ensure_assets(cache_dir: Path | None = None,
                  announce: Callable[[str], None] | None = None) -> TinyVmAssets:
    """Return kernel and initramfs, building them into the cache on first use.

    Default cache: $IVCLIP_CACHE or ~/.cache/ivclip/tinyvm.  A cached kernel is used
    without asking apt; delete the cache to pick up a newer one.  Concurrent callers
    serialise on a lock file.  Raises TinyVmUnavailable (no busybox, apt/dpkg
    failure, no kernel package) and OSError for an unwritable cache.  `announce`
    is told, in one line, before the slow first download starts.
    """
    if cache_dir is None:
        env = os.environ.get("IVCLIP_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache/ivclip/tinyvm"
    cache_dir.mkdir(parents=True, exist_ok=True)
    busybox = _find_busybox()
    if busybox is None:
        raise TinyVmUnavailable(_NO_BUSYBOX)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kdirs = sorted(cache_dir.glob("kernel-*"), key=lambda p: _version_key(p.name))
        kdir = kdirs[-1] if kdirs else _fetch_kernel(cache_dir, announce)
        modules = {p.stem: p.read_bytes() for p in (kdir / "modules").glob("*.ko")}
        # Name the initramfs by its inputs (this file included) so edits rebuild it.
        digest = hashlib.sha256(Path(__file__).read_bytes())
        digest.update(busybox.read_bytes())
        for name in sorted(modules):
            digest.update(name.encode() + modules[name])
        initramfs = cache_dir / f"initramfs-{kdir.name}-{digest.hexdigest()[:12]}.cpio.gz"
        if not initramfs.exists():
            tmp = initramfs.with_suffix(".tmp")
            tmp.write_bytes(_build_initramfs(busybox, modules))
            tmp.rename(initramfs)
            log.info("tinyvm: built %s", initramfs)
            for stale in cache_dir.glob("initramfs-*.cpio.gz"):
                if stale != initramfs:
                    stale.unlink()
    return TinyVmAssets(kernel=kdir / "vmlinux", initramfs=initramfs)


# --------------------------------------------------------------------------- the VM

def _q(value: object) -> str:
    """Escape a value for a QEMU comma-separated option."""
    return str(value).replace(",", ",,")


class TinyVm:
    """One guest running ``/bin/sh script`` in a chroot of the host root, then powering off."""

    def __init__(self, name: str, assets: TinyVmAssets, *, script: Path, shm_path: Path | None,
                 shm_size: int | None, out_dir: Path, memory: str = "128M",
                 timeout_s: float = 120.0) -> None:
        """Describe a guest; nothing runs until start().

        Raises ValueError for a name that is not a plain file-name word, a script path
        the kernel command line cannot carry (whitespace or quotes), or shm_size given
        without shm_path.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad guest name {name!r}")
        script = Path(script).resolve()
        if re.search(r"[\s\"']", str(script)):
            raise ValueError(f"script path cannot go on a kernel command line: {script}")
        if shm_size is not None and shm_path is None:
            raise ValueError("shm_size given without shm_path")
        self.name, self.assets, self.script = name, assets, script
        self.shm_path = Path(shm_path).resolve() if shm_path else None
        self.shm_size = shm_size
        self.out_dir = Path(out_dir).resolve()
        self.memory, self.timeout_s = memory, timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._timer: threading.Timer | None = None
        self._timed_out = False
        self.started_at: float | None = None

    @property
    def console_log(self) -> Path:
        return self.out_dir / f"{self.name}.console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout/stderr (errors before the guest starts land here)."""
        return self.out_dir / f"{self.name}.qemu.log"

    def command(self) -> list[str]:
        """The full command line start() runs. Raises OSError if shm_path is unreadable."""
        accel = accel_args()
        if "-cpu" not in accel:
            # TCG's default qemu64 model lacks SSE4/AVX, which current numpy wheels require.
            accel += ["-cpu", "max"]
        args = [
            "timeout", "--kill-after=2", f"{self.timeout_s:g}",
            QEMU, *accel,
            "-machine", "pc", "-smp", "1", "-m", self.memory,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={_q(self.console_log)}", "-serial", "chardev:con",
            "-kernel", str(self.assets.kernel), "-initrd", str(self.assets.initramfs),
            "-append", f"{_CMDLINE} ivclip_script={self.script}",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=ivclipout,path={_q(self.out_dir)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=ivclipout,mount_tag=ivclipout",
        ]
        if self.shm_path is not None:
            size = self.shm_size if self.shm_size is not None else os.path.getsize(self.shm_path)
            args += ["-object", f"memory-backend-file,id=ivshm,size={size},"
                                f"mem-path={_q(self.shm_path)},share=on",
                     "-device", "ivshmem-plain,memdev=ivshm"]
        return args

    def start(self) -> None:
        """Launch QEMU in its own process group, killed after timeout_s by us and by `timeout`.

        Raises RuntimeError if already started, TinyVmUnavailable if QEMU is missing,
        OSError if out_dir cannot be written.
        """
        if self._proc is not None:
            raise RuntimeError(f"tinyvm {self.name} already started")
        reason = qemu_unavailable_reason()
        if reason:
            raise TinyVmUnavailable(reason)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        cmd = self.command()
        log.debug("tinyvm %s: %s", self.name, " ".join(cmd))
        with open(self.qemu_log, "wb") as qlog:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()
        self._timer = threading.Timer(self.timeout_s, self._on_timeout)
        self._timer.daemon = True
        self._timer.start()
        log.info("tinyvm %s: started pid %d (timeout %gs)",
                 self.name, self._proc.pid, self.timeout_s)

    def _on_timeout(self) -> None:
        log.warning("tinyvm %s: hit its %gs timeout, killing", self.name, self.timeout_s)
        self._timed_out = True
        self.kill()

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for QEMU to exit and return its exit code (0 after a normal guest poweroff).

        timeout_s defaults to what is left of the guest's own timeout.  Raises
        RuntimeError if not started, TimeoutError (QEMU killed) if this wait or the
        guest's timeout_s ran out.
        """
        if self._proc is None or self.started_at is None:
            raise RuntimeError(f"tinyvm {self.name} not started")
        if timeout_s is None:
            timeout_s = max(0.0, self.started_at + self.timeout_s - time.monotonic()) + 5.0
        try:
            rc = self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"tinyvm {self.name} still running after {timeout_s:g}s; killed") from None
        if self._timer:
            self._timer.cancel()
        # 124/137: `timeout` got there a moment before our own timer.
        if self._timed_out or rc in (124, 137):
            raise TimeoutError(f"tinyvm {self.name} killed at its {self.timeout_s:g}s timeout")
        log.info("tinyvm %s: exited %d after %.1fs",
                 self.name, rc, time.monotonic() - self.started_at)
        return rc

    def kill(self) -> None:
        """Kill QEMU (and its `timeout` wrapper) and reap it. Safe to call twice; never raises."""
        if self._timer:
            self._timer.cancel()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("tinyvm %s: pid %d survived SIGKILL", self.name, proc.pid)

    def console_text(self) -> str:
        """Serial console output so far ('' before start). Never raises."""
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def script_exit_code(self) -> int | None:
        """The script's exit status from the console, or None if it has not finished."""
        m = re.search(r"^IVCLIP-SCRIPT-EXIT (\d+)", self.console_text(), re.MULTILINE)
        return int(m.group(1)) if m else None

    def __enter__(self) -> TinyVm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
