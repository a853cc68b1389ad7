"""Shared fixtures. The core under test is chosen by SAFE_FAST_PURE_PYTHON
(``make test`` runs the suite once per core)."""

from __future__ import annotations

import os

import pytest

import safe_fast


def pytest_report_header(config: pytest.Config) -> str:
    return f"safe_fast core backend: {safe_fast.core_backend()}"


def pytest_configure(config: pytest.Config) -> None:
    forced_pure = os.environ.get("SAFE_FAST_PURE_PYTHON") == "1"
    expected = "python" if forced_pure else None
    if expected and safe_fast.core_backend() != expected:
        raise pytest.UsageError("SAFE_FAST_PURE_PYTHON=1 did not select the pure-Python core")
    if os.environ.get("SAFE_FAST_REQUIRE_COMPILED") == "1" and not forced_pure:
        assert safe_fast.core_backend() == "cython"
