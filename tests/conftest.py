"""Shared fixtures. The core under test is chosen by SAFE_FAST_PURE_PYTHON
(``make test`` runs the suite once per core)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator

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


async def _empty_store(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    from store_helpers import postgres_database, store_url_for

    if kind == "postgresql":
        async for url in postgres_database():
            yield url
    else:
        yield store_url_for(kind, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
async def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty SQLite file, then of an empty PostgreSQL database (see store_helpers)."""
    async for url in _empty_store(request.param, tmp_path):
        yield url


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """``memory://``, then as ``durable_url``."""
    async for url in _empty_store(request.param, tmp_path):
        yield url
