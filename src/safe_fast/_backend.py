"""Chooses the compiled core or its pure-Python twin, once, at import time.

``SAFE_FAST_PURE_PYTHON=1`` forces the pure one, silently: that is a choice.
Otherwise a missing or broken compiled core falls back to the pure one with a
``RuntimeWarning`` naming the reason and the fix, so a slow install never goes
unnoticed. ``SAFE_FAST_REQUIRE_COMPILED=1`` turns that fallback into the
ImportError itself (wheel builds and benchmarks set it).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

__all__ = ["core", "core_backend", "core_fallback_reason"]

FALLBACK_FIX = (
    "install a wheel built for this platform, or build from source with a C compiler "
    "(pip install --force-reinstall --no-binary safe-fast safe-fast); "
    "set SAFE_FAST_PURE_PYTHON=1 to choose the pure-Python core and silence this warning"
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_FALLBACK_REASON: str | None = None

if _flag("SAFE_FAST_PURE_PYTHON"):
    from . import _core_py as core

    _BACKEND = "python"
else:
    try:
        from . import _core as core  # type: ignore[attr-defined,no-redef]

        _BACKEND = "cython"
    except ImportError as exc:
        if _flag("SAFE_FAST_REQUIRE_COMPILED"):
            raise
        from . import _core_py as core

        _BACKEND = "python"
        if importlib.util.find_spec(f"{__package__}._core") is None:
            _FALLBACK_REASON = "this installation has no compiled core (a pure-Python wheel or build)"
        else:
            _FALLBACK_REASON = f"the compiled core failed to import: {exc}"
        warnings.warn(
            f"safe_fast runs on its slower pure-Python core: {_FALLBACK_REASON}. To fix: {FALLBACK_FIX}.",
            RuntimeWarning,
            stacklevel=2,
        )


def core_backend() -> str:
    """``"cython"`` when the compiled hot path is in use, else ``"python"``."""
    return _BACKEND


def core_fallback_reason() -> str | None:
    """Why the pure-Python core runs although nobody asked for it, else ``None``."""
    return _FALLBACK_REASON
