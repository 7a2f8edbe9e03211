"""Layering: protocol/ is pure (no I/O, threads or shared memory); shm/ knows nothing above it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROTOCOL_FORBIDDEN = (
    "socket", "mmap", "threading", "selectors", "cffi", "shm.memory", "shm._ivclip_c",
    "posix_ipc", "shm.region", "shm.ring", "broker", "guestdrv", "control",
)
SHM_FORBIDDEN = ("protocol", "broker", "guestdrv", "control")


def imports_of(source: str, package: str) -> set[str]:
    """Every module a source file imports, statically (including `from pkg import module`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def violations(imported: set[str], forbidden: tuple[str, ...]) -> set[str]:
    return {m for m in imported for f in forbidden if m == f or m.startswith(f + ".")}


def test_the_checker_sees_every_form_of_import():
    source = (
        "import socket\nimport os.path\nfrom shm import memory\nfrom shm.errors import X\n"
        "from . import sibling\nimportlib.import_module('mmap')\n__import__('threading')\n"
    )
    found = imports_of(source, "protocol")
    assert violations(found, PROTOCOL_FORBIDDEN) == {"socket", "shm.memory", "mmap", "threading"}
    assert "protocol.sibling" in found and "shm.errors" in found


def sources(package: str) -> list[Path]:
    files = sorted((ROOT / package).glob("*.py"))
    assert files, f"no sources found under {ROOT / package}"
    return files


@pytest.mark.parametrize("path", sources("protocol"), ids=lambda p: p.name)
def test_protocol_sources_import_nothing_impure(path):
    assert violations(imports_of(path.read_text(), "protocol"), PROTOCOL_FORBIDDEN) == set()


def test_protocol_sources_are_the_ones_expected():
    names = {p.name for p in sources("protocol")}
    assert {"channel.py", "messages.py", "pump.py", "errors.py"} <= names


@pytest.mark.parametrize("path", sources("shm"), ids=lambda p: p.name)
def test_shm_sources_import_nothing_above_them(path):
    assert violations(imports_of(path.read_text(), "shm"), SHM_FORBIDDEN) == set()


def run_isolated(code: str, *, site: bool) -> dict[str, list[str]]:
    """Run `code` in a fresh interpreter with the repo first on sys.path; it prints JSON."""
    prologue = f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); before = set(sys.modules)\n"
    flags = [] if site else ["-S"]  # -S: the site's .pth hooks import threading themselves
    result = subprocess.run(
        [sys.executable, *flags, "-c", prologue + code],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(result.stdout)


def test_protocol_at_runtime_loads_no_impure_module():
    out = run_isolated(
        "import protocol.channel, protocol.messages, protocol.pump\n"
        "print(json.dumps({'before': sorted(before), 'after': sorted(sys.modules)}))",
        site=False,
    )
    watched = ("socket", "mmap", "threading", "selectors", "cffi", "shm.memory",
               "shm._ivclip_c", "posix_ipc", "_socket", "_posixshmem")
    assert not set(watched) & set(out["before"]), "the baseline already has them: check is void"
    assert "protocol.channel" in out["after"]
    assert set(watched) & set(out["after"]) == set()


def test_shm_at_runtime_loads_nothing_above_it():
    out = run_isolated(
        "import shm.layout, shm.memory, shm.region, shm.ring, shm.backoff, shm.errors\n"
        "print(json.dumps({'before': sorted(before), 'after': sorted(sys.modules)}))",
        site=True,
    )
    assert "shm.ring" in out["after"]
    loaded = {m.split(".")[0] for m in out["after"]}
    assert loaded & set(SHM_FORBIDDEN) == set()
