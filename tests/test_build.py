"""Installing without a working C compiler still yields a working package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def copy_source_tree(destination: Path) -> Path:
    tree = destination / "source"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(
        REPO / "src",
        tree / "src",
        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info"),
    )
    return tree


def test_install_with_a_failing_compiler_falls_back_to_pure_python(tmp_path: Path) -> None:
    pytest.importorskip("Cython")
    failing_cc = tmp_path / "failing-cc"
    failing_cc.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    failing_cc.chmod(0o755)
    tree = copy_source_tree(tmp_path)
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_FAST_")}
    env.update(CC=str(failing_cc), LDSHARED=f"{failing_cc} -shared")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-v", "--target", str(target), str(tree)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "the compiled core was not built" in install.stdout + install.stderr
    assert not list((target / "safe_fast").glob("_core*.so"))
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import safe_fast, sys; "
            "from safe_fast import encode_message, StateFrame; "
            "sys.stdout.write(safe_fast.core_backend() + ' ' + encode_message(StateFrame('d', 1, None)).decode())",
        ],
        env={**env, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("python {"), check.stdout
    assert (target / "safe_fast" / "py.typed").exists()


def test_backend_switch_in_a_fresh_interpreter() -> None:
    code = "import safe_fast; print(safe_fast.core_backend())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_FAST_")}
    forced = subprocess.run(
        [sys.executable, "-c", code], env={**env, "SAFE_FAST_PURE_PYTHON": "1"}, capture_output=True, text=True, timeout=60
    )
    assert forced.stdout.strip() == "python", forced.stderr
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    try:
        import safe_fast._core  # noqa: F401
    except ImportError:
        expected = "python"
    else:
        expected = "cython"
    assert default.stdout.strip() == expected, default.stderr
