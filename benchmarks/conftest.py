"""The benchmarks' own conftest.

``pytest --benchmark-only`` from the repository root runs every benchmark
(``tests/`` is collected too, and pytest-benchmark skips its tests); a plain
``pytest`` from the root leaves this directory out (see the root
``conftest.py``), so the test suite neither runs nor imports benchmarks.
``pytest benchmarks`` runs them without ``--benchmark-only`` as well.

The micro benchmarks import *both* cores directly (``safe_fast._core`` and
``safe_fast._core_py``) whatever ``SAFE_FAST_PURE_PYTHON`` says; the fan-out
benchmark starts one server process per core. The header and the summary say
which core ran where.

A source checkout works without installing: ``src`` is put on ``sys.path``
when ``safe_fast`` is not importable (the compiled core is built in place by
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import safe_fast
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import safe_fast

# The end-to-end scripts are run directly, never collected.
collect_ignore = ["_harness.py", "fanout_e2e.py", "memory_per_connection.py"]

FANOUT_RESULTS = pytest.StashKey[list]()


def pytest_report_header(config: pytest.Config) -> str:
    try:
        from safe_fast import _core  # noqa: F401

        compiled = "available"
    except ImportError as exc:
        compiled = f"NOT available ({exc}); its benchmarks are skipped"
    return (
        f"safe_fast {safe_fast.__version__} from {Path(safe_fast.__file__).parent}; compiled core {compiled}; "
        "benchmarks: micro on both cores (compiled/pure in the test ids), fan-out in one server process per core"
    )


@pytest.fixture(scope="session")
def fanout_results(pytestconfig: pytest.Config) -> list[dict[str, Any]]:
    return pytestconfig.stash.setdefault(FANOUT_RESULTS, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(FANOUT_RESULTS, [])
    if not results:
        return
    terminalreporter.section("fan-out over real sockets: deliveries/s")
    cells = sorted({(r["subscribers"], r["k"]) for r in results})
    names = list(dict.fromkeys(r["server"] for r in results))
    by = {(r["server"], r["subscribers"], r["k"]): r for r in results}
    header = f"{'S':>6} {'k':>3} " + " ".join(f"{name:>22}" for name in names)
    terminalreporter.write_line(header)
    for subscribers, k in cells:
        row = [by.get((name, subscribers, k)) for name in names]
        values = " ".join(f"{r['deliveries_per_s']:>22,}" if r else f"{'-':>22}" for r in row)
        terminalreporter.write_line(f"{subscribers:>6} {k:>3} {values}")
    cores = sorted({f"{r['server']}: core_backend()={r['core']!r}" for r in results if r["core"] != "-"})
    terminalreporter.write_line("cores: " + "; ".join(cores))
