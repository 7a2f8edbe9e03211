"""The hostile suite prints its figures (cases, mutations, faults...) at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest
from inproc import FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("ivclip hostile-guest figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture
def figures() -> dict[str, Any]:
    return FIGURES
