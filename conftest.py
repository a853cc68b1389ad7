"""Collection at the repository root: ``testpaths`` names ``tests`` and
``benchmarks``; the benchmarks are collected only when asked for
(``--benchmark-only``, or ``benchmarks`` given on the command line), so a
plain ``pytest`` runs the test suite alone."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Called for what is inside the benchmarks directory (testpaths themselves
    # are collected unconditionally), so the benchmark modules are not even imported.
    if BENCHMARKS not in collection_path.resolve().parents:
        return None
    if config.getoption("benchmark_only", default=False):
        return None
    where = config.invocation_params.dir
    named = [(where / str(arg).split("::")[0]).resolve() for arg in config.invocation_params.args]
    if any(path == BENCHMARKS or BENCHMARKS in path.parents for path in named):
        return None
    return True
