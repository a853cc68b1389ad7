"""Builds the optional compiled core.

The package works without it (the pure-Python twin takes over), so a missing
Cython or C compiler downgrades the install instead of failing it; the reason
is printed once. ``SAFE_FAST_NO_EXTENSIONS=1`` skips the build on purpose,
``SAFE_FAST_REQUIRE_COMPILED=1`` makes a failed build an error, and
``SAFE_FAST_CYTHON_TRACE=1`` compiles with line tracing for coverage/profiling.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(reason):
    bar = "*" * 72
    sys.stderr.write(
        f"\n{bar}\nsafe_fast: the compiled core was not built ({reason}).\n"
        "safe_fast: installing the pure-Python core instead; it is slower but\n"
        "safe_fast: complete. safe_fast.core_backend() will return 'python'.\n"
        f"{bar}\n\n"
    )


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python when compiling fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            if _flag("SAFE_FAST_REQUIRE_COMPILED"):
                raise
            _warn(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if _flag("SAFE_FAST_REQUIRE_COMPILED"):
                raise
            _warn(f"{type(exc).__name__}: {exc}")


def _extensions():
    if _flag("SAFE_FAST_NO_EXTENSIONS"):
        _warn("SAFE_FAST_NO_EXTENSIONS is set")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _flag("SAFE_FAST_REQUIRE_COMPILED"):
            raise
        _warn("Cython is not installed")
        return []
    from setuptools import Extension

    trace = _flag("SAFE_FAST_CYTHON_TRACE")
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
    ext = Extension(
        "safe_fast._core",
        ["src/safe_fast/_core.pyx"],
        define_macros=macros,
        extra_compile_args=["-O3"] if os.name != "nt" else [],
    )
    return cythonize(
        [ext],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": trace,
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
