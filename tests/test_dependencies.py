"""The package dependency rule: broker and guestdrv share shm, protocol, control and filexfer,
and never import each other; filexfer (the filesystem side both use) imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "broker": {"guestdrv"},
    "guestdrv": {"broker"},
    "filexfer": {"broker", "guestdrv", "shm.ring", "shm.region", "shm.memory"},
    "protocol": {"broker", "guestdrv", "filexfer", "control"},
    "control": {"broker", "guestdrv", "filexfer"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_keep_the_dependency_rule(package: str) -> None:
    for path in (ROOT / package).glob("*.py"):
        for name in imports(path):
            for banned in FORBIDDEN[package]:
                assert name != banned and not name.startswith(banned + "."), \
                    f"{package}/{path.name} imports {name}"
