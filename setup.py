"""Builds the compiled core.

A wheel built here always carries the compiled core: when Cython or a C
compiler is missing the build stops with a message naming the two ways out,
instead of quietly producing a pure-Python wheel under a platform tag (pip
would cache such a wheel for the sdist and hand it, still without the
compiled core, to a later environment that could compile).

``SAFE_FAST_NO_EXTENSIONS=1`` builds the pure-Python wheel on purpose; it is
tagged ``py3-none-any``, as it contains no binary. ``SAFE_FAST_CYTHON_TRACE=1``
compiles with line tracing for coverage/profiling. Debug information is left
out of the compiled module unless ``SAFE_FAST_DEBUG_INFO=1``.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOW_TO_FIX = (
    "Install a C compiler and the Python headers (Debian/Ubuntu: "
    "apt-get install gcc python3-dev) and build again, or install the "
    "pure-Python core on purpose: SAFE_FAST_NO_EXTENSIONS=1 pip install safe-fast "
    "(slower, complete; safe_fast.core_backend() returns 'python')."
)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class CompiledCoreMissing(SystemExit):
    """The compiled core could not be built; the message says what to do."""

    def __init__(self, reason):
        bar = "*" * 72
        super().__init__(
            f"\n{bar}\nsafe_fast: the compiled core could not be built: {reason}\n{HOW_TO_FIX}\n{bar}\n"
        )


class CompiledCoreBuildExt(build_ext):
    """build_ext whose failure names its cause and the two ways out."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            raise CompiledCoreMissing(f"{type(exc).__name__}: {exc}") from exc


def _extensions():
    if _flag("SAFE_FAST_NO_EXTENSIONS"):
        sys.stderr.write("safe_fast: SAFE_FAST_NO_EXTENSIONS is set: building the pure-Python wheel\n")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        raise CompiledCoreMissing("Cython is not installed") from None
    from setuptools import Extension

    trace = _flag("SAFE_FAST_CYTHON_TRACE")
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
    if os.name == "nt":
        compile_args, link_args = [], []
    elif _flag("SAFE_FAST_DEBUG_INFO") or trace:
        compile_args, link_args = ["-O3", "-g"], []
    else:
        # -g0 drops what CFLAGS from the interpreter's build may add; -s strips at link time
        # (macOS's linker has no -s: its builds carry no DWARF in the binary anyway).
        compile_args = ["-O3", "-g0"]
        link_args = ["-s"] if sys.platform.startswith("linux") else []
    ext = Extension(
        "safe_fast._core",
        ["src/safe_fast/_core.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
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


def _needs_extensions():
    # Building the sdist (or only the metadata) compiles nothing, so it neither
    # runs Cython nor needs it; every other command builds the compiled core.
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    return command not in ("sdist", "egg_info", "dist_info", None)


setup(
    ext_modules=_extensions() if _needs_extensions() else [],
    cmdclass={"build_ext": CompiledCoreBuildExt},
)
