"""Chooses the compiled core or its pure-Python twin, once, at import time.

``SAFE_FAST_PURE_PYTHON=1`` forces the pure one. ``SAFE_FAST_REQUIRE_COMPILED=1``
turns a missing compiled core into an ImportError instead of a silent
fallback (wheel builds and benchmarks set it).
"""

from __future__ import annotations

import os

__all__ = ["core", "core_backend"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


if _flag("SAFE_FAST_PURE_PYTHON"):
    from . import _core_py as core

    _BACKEND = "python"
else:
    try:
        from . import _core as core  # type: ignore[no-redef]

        _BACKEND = "cython"
    except ImportError:
        if _flag("SAFE_FAST_REQUIRE_COMPILED"):
            raise
        from . import _core_py as core  # type: ignore[no-redef]

        _BACKEND = "python"


def core_backend() -> str:
    """``"cython"`` when the compiled hot path is in use, else ``"python"``."""
    return _BACKEND
