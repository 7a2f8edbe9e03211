"""The command lines: attach help, argument errors, and a clear line when nothing runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.attach import libvirt_xml, qemu_args
from broker.errors import ConfigError
from broker.names import check_vm_name, shm_path
from control.cli import parse_size


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_qemu_args_attach_the_vms_own_region() -> None:
    assert qemu_args("alice", 4 << 20) == [
        "-object",
        "memory-backend-file,id=ivclip-alice,size=4194304,mem-path=/dev/shm/ivclip-alice,share=on",
        "-device",
        "ivshmem-plain,memdev=ivclip-alice",
    ]
    result = run("-m", "broker", "qemu-args", "bob", "--size", "1M")
    assert result.returncode == 0
    assert "mem-path=/dev/shm/ivclip-bob,share=on" in result.stdout and "size=1048576" in result.stdout


def test_libvirt_xml_names_the_same_file() -> None:
    xml = libvirt_xml("alice", 8 << 20)
    assert "<shmem name='ivclip-alice'>" in xml
    assert "<model type='ivshmem-plain'/>" in xml and "<size unit='M'>8</size>" in xml
    assert shm_path("alice").name == "ivclip-alice"


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "../x", "é", "x" * 49, "host", "clipboard", "a.b"])
def test_unsafe_vm_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_vm_name(name)


@pytest.mark.parametrize("name", ["alice", "Bob-2", "vm_01", "x" * 48])
def test_safe_vm_names_pass(name: str) -> None:
    assert check_vm_name(name) == name


@pytest.mark.parametrize(("text", "size"), [("4M", 4 << 20), ("16MiB", 16 << 20), ("65536", 65536),
                                            ("1g", 1 << 30), ("8K", 8192)])
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("args", [
    ["serve", "--vm", "alice", "--size", "3M"],
    ["serve", "--vm", "alice", "--size", "512K"],
    ["serve", "--vm", "alice", "--size", "lots"],
    ["serve", "--vm", "../etc/passwd"],
    ["qemu-args", "a b"],
    ["frobnicate"],
    ["serve", "--vm", "alice", "--timeout", "0"],
    ["serve", "--vm", "alice", "--timeout", "-1"],
    ["serve", "--vm", "alice", "--clipboard-limit", "0"],
    ["serve", "--vm", "alice", "--log-level", "BOGUS"],
])
def test_bad_arguments_get_a_usage_error_not_a_traceback(args: list[str]) -> None:
    result = run("-m", "broker", *args)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_gestures_without_a_broker_say_it_is_not_running(tmp_path: Path) -> None:
    result = run("-m", "broker", "copy", "alice", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "the broker is not running" in result.stderr and "Traceback" not in result.stderr


def test_guest_commands_without_a_driver_say_it_is_not_running(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guestdrv", "copy", "--socket", str(tmp_path / "none.sock")],
        input="x", capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "the guest driver is not running" in result.stderr
    result = run("-m", "guestdrv", "paste", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and "the guest driver is not running" in result.stderr


def test_guest_copy_over_the_limit_is_refused_before_sending(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guestdrv", "copy", "--limit", "1K", "--socket",
         str(tmp_path / "none.sock")],
        input="x" * 1025, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "over the limit of 1024 bytes" in result.stderr


def test_a_guest_driver_on_a_missing_device_waits_with_a_reason(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestdrv", "run", "--device", str(tmp_path / "nothing"),
         "--socket", str(tmp_path / "g.sock")], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if (tmp_path / "g.sock").exists():
                break
            time.sleep(0.05)
        status = run("-m", "guestdrv", "status", "--socket", str(tmp_path / "g.sock"), "--json")
        assert status.returncode == 0
        assert '"attached": false' in status.stdout and "cannot open" in status.stdout
        human = run("-m", "guestdrv", "status", "--socket", str(tmp_path / "g.sock"))
        assert human.returncode == 0 and human.stdout.startswith("not attached: cannot open "), human.stdout
        assert "text policy strict; copies answered 0" in human.stdout
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_device_that_can_never_be_a_region_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "hostname").write_bytes(b"vm\n")
    for device, words in ((tmp_path / "hostname", "is 3 bytes; an ivclip region is a power of two"),
                          (tmp_path, "is a directory")):
        result = run("-m", "guestdrv", "run", "--device", str(device), "--socket", str(tmp_path / "g.sock"))
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["run", "--limit", "0"], ["run", "--log-level", "loud"]])
def test_bad_guest_arguments_get_a_usage_error(args: list[str]) -> None:
    result = run("-m", "guestdrv", *args)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_a_second_driver_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    first = subprocess.Popen([sys.executable, "-m", "guestdrv", "run", "--device", str(tmp_path / "none"),
                              "--socket", str(sock)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        second = run("-m", "guestdrv", "run", "--device", str(tmp_path / "none"), "--socket", str(sock))
        assert second.returncode == 1 and "already running" in second.stderr
        assert sock.exists()  # the first driver's socket is left alone
    finally:
        first.terminate()
        assert first.wait(10) == 0


def test_x11_without_a_display_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "-m", "guestdrv", "run", "--clipboard", "x11",
                             "--socket", str(tmp_path / "g.sock")],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "DISPLAY is not set" in result.stderr


def test_sending_an_empty_path_is_refused(tmp_path: Path) -> None:
    result = run("-m", "broker", "send", "bob", "", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and "empty path" in result.stderr


@pytest.mark.parametrize(("module", "variable"), [("broker", "IVCLIP_BROKER_SOCKET"),
                                                   ("guestdrv", "IVCLIP_GUEST_SOCKET")])
def test_the_socket_comes_from_the_environment_unless_given(
    tmp_path: Path, module: str, variable: str,
) -> None:
    env = {**os.environ, variable: str(tmp_path / "from-env.sock")}
    result = subprocess.run([sys.executable, "-m", module, "status"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode != 0 and str(tmp_path / "from-env.sock") in result.stderr, result.stderr
    given = tmp_path / "given.sock"
    result = subprocess.run([sys.executable, "-m", module, "status", "--socket", str(given)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert str(given) in result.stderr and "from-env" not in result.stderr, result.stderr


@pytest.mark.parametrize(("module", "args", "usage"), [
    ("broker", ["paste", "bob", "--bogus"], "usage: python -m broker paste"),
    ("guestdrv", ["status", "--bogus"], "usage: python -m guestdrv status"),
])
def test_an_unknown_option_gets_the_subcommands_usage(module: str, args: list[str], usage: str) -> None:
    result = run("-m", module, *args)
    assert result.returncode == 2 and result.stderr.startswith(usage), result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr and "Traceback" not in result.stderr
