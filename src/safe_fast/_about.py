"""The version report: what ``safe-fast --version`` (``python -m safe_fast --version``) prints.

One place that says which build is running (package version, core and why
the pure core runs if it does, interpreter, and the versions of the libraries
the hot path rests on), for bug reports and for checking an install.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

__all__ = ["version_report"]

# The distributions whose versions matter for performance and wire behaviour.
_LIBRARIES = ("picows", "uvloop", "orjson")


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    """A summary line, then the core (with the fallback reason), Python and the libraries."""
    from . import __version__
    from ._backend import core_backend, core_fallback_reason

    core = "compiled (cython)" if core_backend() == "cython" else "pure Python"
    reason = core_fallback_reason()
    if reason is not None:
        core += f" - fallback: {reason}"
    lines = [
        f"safe-fast {__version__} (core: {core_backend()}, Python {platform.python_version()})",
        f"core: {core}",
        f"python: {platform.python_implementation()} {platform.python_version()} ({sys.platform}, {platform.machine()})",
    ]
    lines += [f"{name}: {_distribution_version(name)}" for name in _LIBRARIES]
    return "\n".join(lines)
