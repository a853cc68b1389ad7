"""The benchmarks' own conftest.

``pytest benchmarks --benchmark-only`` (from the repository root) collects this
directory only, so ``tests/conftest.py`` and its core checks are never loaded:
the micro benchmarks import *both* cores directly (``safe_fast._core`` and
``safe_fast._core_py``) whatever ``SAFE_FAST_PURE_PYTHON`` says.

A source checkout works without installing: ``src`` is put on ``sys.path``
when ``safe_fast`` is not importable (the compiled core is built in place by
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import safe_fast
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import safe_fast

# The end-to-end scripts are run directly, never collected.
collect_ignore = ["_harness.py", "fanout_e2e.py", "memory_per_connection.py"]


def pytest_report_header(config: pytest.Config) -> str:
    try:
        from safe_fast import _core  # noqa: F401

        compiled = "available"
    except ImportError as exc:
        compiled = f"NOT available ({exc}); its benchmarks are skipped"
    return f"safe_fast {safe_fast.__version__} from {Path(safe_fast.__file__).parent}; compiled core {compiled}"
