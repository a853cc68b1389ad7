"""The README's main job: the loopback demo runs and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_loopback_demo_runs_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safe_fast.examples.loopback_demo"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("safe_fast loopback demo: server at ws://127.0.0.1:")
    for number in range(1, 11):
        assert any(line.startswith(f"{number}. ") for line in lines), (number, result.stdout)
    assert lines[-1] == "demo complete"
