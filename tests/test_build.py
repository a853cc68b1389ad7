"""Building and installing the package: the compiled core or a loud refusal,
a loud runtime fallback, the version report, wheels and the sdist.

The tests marked ``packaging`` build the project (sdist, wheels, installs into
fresh venvs of every interpreter found by ``.ci/pythons``); ``make test`` runs
them once, on the newest interpreter.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import safe_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(safe_fast.__file__).resolve().parent

packaging = pytest.mark.packaging


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any SAFE_FAST_* switch, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_FAST_") and k != "PYTHONWARNINGS"}
    env.update(extra)
    return env


def run(args: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload,no-any-return]


def copy_source_tree(destination: Path) -> Path:
    tree = destination / "source"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(
        REPO / "src",
        tree / "src",
        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info"),
    )
    return tree


def failing_compiler(directory: Path) -> dict[str, str]:
    """CC/LDSHARED that fail as a machine without a C compiler does."""
    cc = directory / "failing-cc"
    cc.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    cc.chmod(0o755)
    return {"CC": str(cc), "LDSHARED": f"{cc} -shared"}


def installed_without_the_compiled_core(destination: Path) -> Path:
    """This installation's package files, less the compiled module."""
    site = destination / "site"
    shutil.copytree(PACKAGE, site / "safe_fast", ignore=shutil.ignore_patterns("_core.*.so", "_core.*.pyd", "__pycache__"))
    return site


# -- the runtime fallback and the version report -------------------------------------------------


def test_backend_switch_in_a_fresh_interpreter() -> None:
    code = "import safe_fast; print(safe_fast.core_backend())"
    forced = run([sys.executable, "-W", "error", "-c", code], env=clean_env(SAFE_FAST_PURE_PYTHON="1"), timeout=60)
    assert forced.returncode == 0 and forced.stdout.strip() == "python", forced.stderr
    default = run([sys.executable, "-c", code], env=clean_env(), timeout=60)
    try:
        import safe_fast._core  # noqa: F401
    except ImportError:
        expected = "python"
    else:
        expected = "cython"
    assert default.stdout.strip() == expected, default.stderr


def test_the_fallback_warns_once_naming_the_reason_and_the_fix(tmp_path: Path) -> None:
    site = installed_without_the_compiled_core(tmp_path)
    code = (
        "import warnings; warnings.simplefilter('always');"
        "import safe_fast;"
        "from safe_fast._backend import core_fallback_reason;"
        "print(safe_fast.core_backend(), '|', core_fallback_reason())"
    )
    fallback = run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(site)), cwd=tmp_path, timeout=60)
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.startswith("python | this installation has no compiled core"), fallback.stdout
    warnings = [line for line in fallback.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, fallback.stderr
    assert "pure-Python core: this installation has no compiled core" in warnings[0]
    assert "--no-binary safe-fast" in warnings[0] and "SAFE_FAST_PURE_PYTHON=1" in warnings[0]

    chosen = run(
        [sys.executable, "-W", "error", "-c", code],
        env=clean_env(PYTHONPATH=str(site), SAFE_FAST_PURE_PYTHON="1"),
        cwd=tmp_path,
        timeout=60,
    )
    assert chosen.returncode == 0 and chosen.stdout.strip() == "python | None", chosen.stderr

    required = run(
        [sys.executable, "-c", code],
        env=clean_env(PYTHONPATH=str(site), SAFE_FAST_REQUIRE_COMPILED="1"),
        cwd=tmp_path,
        timeout=60,
    )
    assert required.returncode != 0 and "ImportError: cannot import name '_core'" in required.stderr, required.stderr


def test_a_broken_compiled_core_is_named_in_the_warning(tmp_path: Path) -> None:
    site = installed_without_the_compiled_core(tmp_path)
    suffix = ".pyd" if os.name == "nt" else ".so"
    (site / "safe_fast" / f"_core{suffix}").write_bytes(b"not a shared object")
    code = "import safe_fast; from safe_fast._backend import core_fallback_reason; print(core_fallback_reason())"
    result = run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(site)), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the compiled core failed to import: "), result.stdout
    assert "RuntimeWarning" in result.stderr and "failed to import" in result.stderr


def expected_report_lines(core: str) -> list[str]:
    backend = "cython" if core.startswith("compiled") else "python"
    python_version = ".".join(map(str, sys.version_info[:3]))
    summary = f"safe-fast {safe_fast.__version__} (core: {backend}, Python {python_version})"
    lines = [summary, f"core: {core}"]  # a core ending in a space is a prefix
    lines.append(f"python: CPython {python_version} ")  # then platform and machine
    for name in ("picows", "uvloop", "orjson"):
        try:
            lines.append(f"{name}: {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return lines


def assert_report(stdout: str, core: str) -> None:
    got = stdout.splitlines()
    want = expected_report_lines(core)
    assert len(got) == len(want), stdout
    for line, expected in zip(got, want):
        assert line.startswith(expected) if expected.endswith(" ") else line == expected, (line, expected)


def test_version_report_names_version_core_python_and_libraries() -> None:
    try:
        import safe_fast._core  # noqa: F401
    except ImportError:
        default_core = "pure Python - fallback: "
    else:
        default_core = "compiled (cython)"
    result = run([sys.executable, "-m", "safe_fast", "--version"], env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert_report(result.stdout, default_core)
    forced = run([sys.executable, "-m", "safe_fast", "--version"], env=clean_env(SAFE_FAST_PURE_PYTHON="1"), timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert_report(forced.stdout, "pure Python")


def test_version_report_says_why_the_pure_core_runs(tmp_path: Path) -> None:
    site = installed_without_the_compiled_core(tmp_path)
    result = run(
        [sys.executable, "-m", "safe_fast", "--version"], env=clean_env(PYTHONPATH=str(site)), cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert_report(
        result.stdout, "pure Python - fallback: this installation has no compiled core (a pure-Python wheel or build)"
    )


def test_an_unknown_option_prints_the_usage() -> None:
    result = run([sys.executable, "-m", "safe_fast", "--bogus"], env=clean_env(), timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr


# -- building from source --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of a copy of this tree, built as `make sdist` builds it."""
    workdir = tmp_path_factory.mktemp("sdist")
    tree = copy_source_tree(workdir)
    result = run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(workdir / "dist"), str(tree)],
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Building the sdist compiles nothing: Cython never ran on the tree.
    assert not (tree / "src" / "safe_fast" / "_core.c").exists()
    (archive,) = (workdir / "dist").glob("safe_fast-*.tar.gz")
    return archive


@packaging
@pytest.mark.timeout(300)
def test_the_sdist_carries_the_cython_sources_and_no_generated_c(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("src/safe_fast/_core.pyx", "src/safe_fast/_core.pxd", "src/safe_fast/py.typed", "setup.py", "LICENSE"):
        assert required in names, sorted(names)
    assert not [name for name in names if name.endswith((".c", ".so"))], sorted(names)


def pip_install(python: str, source: Path, target: Path, cache: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--cache-dir", str(cache)]
        + ["--target", str(target), str(source)],
        env=env,
        timeout=280,
    )


def cached_wheels(cache: Path) -> list[Path]:
    return sorted((cache / "wheels").rglob("safe_fast-*.whl"))


@packaging
@pytest.mark.timeout(600)
def test_a_build_without_a_compiler_stops_loudly_and_leaves_nothing_for_pip_to_reuse(sdist: Path, tmp_path: Path) -> None:
    """Installs the same sdist twice with one pip cache: first where nothing
    compiles, then where the compiler works. The second must compile, not
    reuse a pure-Python build of the first."""
    cache = tmp_path / "pip-cache"
    first = pip_install(sys.executable, sdist, tmp_path / "first", cache, clean_env(**failing_compiler(tmp_path)))
    output = first.stdout + first.stderr
    assert first.returncode != 0, output[-3000:]
    assert output.count("safe_fast: the compiled core could not be built") == 1, output[-3000:]
    assert "no compiler here" in output and "SAFE_FAST_NO_EXTENSIONS=1" in output, output[-3000:]
    assert cached_wheels(cache) == []

    second = pip_install(sys.executable, sdist, tmp_path / "second", cache, clean_env())
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "Using cached" not in second.stdout, second.stdout
    # pip keeps this build for the sdist: it is the compiled one.
    (kept,) = cached_wheels(cache)
    assert not kept.name.endswith("-none-any.whl"), kept.name
    check = run(
        [sys.executable, "-W", "error", "-c", "import safe_fast; print(safe_fast.core_backend())"],
        env=clean_env(PYTHONPATH=str(tmp_path / "second")),
        cwd=tmp_path,
        timeout=60,
    )
    assert check.stdout.strip() == "cython", check.stderr


@packaging
@pytest.mark.timeout(600)
def test_the_pure_python_wheel_is_built_only_on_purpose_and_says_so(sdist: Path, tmp_path: Path) -> None:
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
        + ["--wheel-dir", str(tmp_path / "wheels"), str(sdist)],
        env=clean_env(SAFE_FAST_NO_EXTENSIONS="1", **failing_compiler(tmp_path)),
        timeout=280,
    )
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    assert wheel.name == f"safe_fast-{safe_fast.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if name.endswith((".so", ".pyd"))]
        archive.extractall(tmp_path / "site")
    code = "import safe_fast, sys; from safe_fast import encode_message, StateFrame; print(encode_message(StateFrame('d', 1, None)).decode())"
    used = run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(tmp_path / "site")), cwd=tmp_path, timeout=60)
    assert used.returncode == 0 and used.stdout.startswith("{"), used.stderr
    assert "RuntimeWarning" in used.stderr and "pure-Python core" in used.stderr


# -- `make wheel`: repaired, stripped wheels that install into every found interpreter ---------------


def found_interpreters() -> list[tuple[str, str]]:
    listing = run(["sh", str(REPO / ".ci" / "pythons")], timeout=120)
    assert listing.returncode == 0, listing.stderr
    pairs = [tuple(line.split(" ", 1)) for line in listing.stdout.splitlines() if line.strip()]
    assert pairs, "no CPython >= 3.10 found"
    return pairs  # type: ignore[return-value]


@packaging
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="auditwheel repairs Linux wheels")
@pytest.mark.timeout(1200)
def test_make_wheel_installs_with_the_compiled_core_into_every_interpreter(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    built = run(
        ["make", "--no-print-directory", "wheel", f"WHEELHOUSE={wheelhouse}", f"RELEASE_PY={sys.executable}"],
        cwd=REPO,
        env=clean_env(),
        timeout=900,
    )
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    from elftools.elf.elffile import ELFFile

    for version, interpreter in found_interpreters():
        tag = "cp" + version.replace(".", "")
        (wheel,) = wheelhouse.glob(f"safe_fast-*-{tag}-{tag}-*manylinux*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (module,) = [name for name in archive.namelist() if name.endswith(".so")]
            sections = {section.name for section in ELFFile(io.BytesIO(archive.read(module))).iter_sections()}
        assert not {name for name in sections if name.startswith(".debug")}, (wheel.name, sorted(sections))

        venv = tmp_path / f"venv-{version}"
        made = run([interpreter, "-m", "venv", str(venv)], timeout=120)
        assert made.returncode == 0, made.stderr
        python = str(venv / "bin" / "python")
        installed = run([python, "-m", "pip", "install", "--quiet", str(wheel)], env=clean_env(), timeout=600)
        assert installed.returncode == 0, installed.stderr[-3000:]
        consistent = run([python, "-m", "pip", "check"], env=clean_env(), timeout=120)
        assert consistent.returncode == 0, consistent.stdout + consistent.stderr
        used = run(
            [python, "-W", "error", "-c", "import safe_fast; print(safe_fast.core_backend())"],
            env=clean_env(),
            cwd=tmp_path,
            timeout=60,
        )
        assert used.stdout.strip() == "cython", (version, used.stdout, used.stderr)
        report = run([python, "-m", "safe_fast", "--version"], env=clean_env(), cwd=tmp_path, timeout=60)
        assert report.returncode == 0 and "core: compiled (cython)" in report.stdout, report.stdout + report.stderr


# -- CI and release workflows, checked here since GitHub is out of reach ----------------------------

SUPPORTED = ["3.10", "3.11", "3.12", "3.13", "3.14"]
WORKFLOWS = REPO / ".github" / "workflows"
needs_release_tools = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="check-jsonschema and cibuildwheel 4 need Python >= 3.11"
)


def tool(name: str) -> str:
    """A console script of this environment (the `release` extra)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: install the release extra (pip install '.[release]')"
    return str(path)


def load_workflow(name: str) -> dict[str, Any]:
    from ruamel.yaml import YAML

    loaded: dict[str, Any] = YAML(typ="safe").load((WORKFLOWS / name).read_text(encoding="utf-8"))
    return loaded


@packaging
@needs_release_tools
def test_workflows_match_the_github_workflow_schema() -> None:
    files = sorted(str(path) for path in WORKFLOWS.glob("*.yml"))
    assert {Path(name).name for name in files} >= {"ci.yml", "wheels.yml"}
    checked = run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files], env=clean_env(), timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@packaging
@needs_release_tools
def test_ci_runs_both_cores_on_every_supported_python_and_lints() -> None:
    ci = load_workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    linux, other = ci["jobs"]["test"], ci["jobs"]["test-other-os"]
    assert linux["runs-on"] == "ubuntu-latest" and linux["strategy"]["matrix"]["python"] == SUPPORTED
    assert "postgres" in linux["services"]
    assert set(other["strategy"]["matrix"]["os"]) == {"macos-latest", "windows-latest"}
    assert other["strategy"]["matrix"]["python"] == SUPPORTED[-1:]
    for job in (linux, other):
        commands = " ".join(step.get("run", "") for step in job["steps"])
        assert "SAFE_FAST_REQUIRE_COMPILED=1 python -m pytest" in commands
        assert "SAFE_FAST_PURE_PYTHON=1 python -m pytest" in commands
    lint = " ".join(step.get("run", "") for step in ci["jobs"]["lint"]["steps"])
    assert "ruff check" in lint and "mypy" in lint


@packaging
@needs_release_tools
def test_wheels_are_built_by_cibuildwheel_4_and_published_by_trusted_publishing_on_a_tag() -> None:
    wheels = load_workflow("wheels.yml")
    assert wheels["on"]["push"]["tags"] == ["v*"]
    jobs = wheels["jobs"]
    uses = [step.get("uses", "") for step in jobs["wheels"]["steps"]]
    assert any(use.startswith("pypa/cibuildwheel@v4.") for use in uses), uses
    assert set(jobs["wheels"]["strategy"]["matrix"]["os"]) == {
        "ubuntu-latest",
        "ubuntu-24.04-arm",
        "macos-15-intel",
        "macos-latest",
        "windows-latest",
    }
    publish = jobs["publish"]
    assert publish["permissions"] == {"id-token": "write"}
    assert "startsWith(github.ref, 'refs/tags/v')" in publish["if"]
    assert set(publish["needs"]) == {"wheels", "pure", "sdist"}
    steps = [step.get("uses", "") for step in publish["steps"]]
    assert "pypa/gh-action-pypi-publish@release/v1" in steps
    assert not [step for step in publish["steps"] if "password" in step.get("with", {})]


def build_identifiers(platform: str, archs: str | None) -> set[str]:
    args = [tool("cibuildwheel"), "--print-build-identifiers", "--platform", platform]
    if archs:
        args += ["--archs", archs]
    listed = run(args, cwd=REPO, env=clean_env(), timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return set(listed.stdout.split())


@packaging
@needs_release_tools
@pytest.mark.parametrize(
    ("platform", "archs", "tags"),
    [
        ("linux", "x86_64,aarch64", [f"{libc}_{arch}" for libc in ("manylinux", "musllinux") for arch in ("x86_64", "aarch64")]),
        ("macos", "x86_64,arm64", ["macosx_x86_64", "macosx_arm64"]),
        ("windows", "AMD64", ["win_amd64"]),
    ],
)
def test_cibuildwheel_builds_every_supported_cpython_for_each_platform(platform: str, archs: str, tags: list[str]) -> None:
    expected = {f"cp{version.replace('.', '')}-{tag}" for version in SUPPORTED for tag in tags}
    assert build_identifiers(platform, archs) == expected


@packaging
@needs_release_tools
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="checked on x86_64 Linux"
)
def test_each_wheel_runner_builds_its_native_architecture_only() -> None:
    # The x86_64 Linux runner must not try aarch64 under emulation: the arm runner builds those.
    expected = {f"cp{version.replace('.', '')}-{libc}_x86_64" for version in SUPPORTED for libc in ("manylinux", "musllinux")}
    assert build_identifiers("linux", None) == expected
