"""The reconnect delay formula, checked directly with a fixed random source."""

from __future__ import annotations

import inspect

import pytest

from safe_fast.client import Backoff, RealtimeClient, next_backoff_delay


def fixed(value: float):
    return lambda: value


def test_defaults_match_the_reference_client() -> None:
    backoff = Backoff()
    assert (backoff.min, backoff.max, backoff.factor, backoff.jitter, backoff.disabled) == (0.5, 30.0, 2.0, 0.2, False)


@pytest.mark.parametrize("attempt, base", [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (7, 30.0), (50, 30.0)])
def test_base_grows_by_factor_and_is_capped(attempt: int, base: float) -> None:
    # random() == 0.5 means U(-1, 1) == 0: no jitter.
    assert next_backoff_delay(attempt, Backoff(), random=fixed(0.5)) == pytest.approx(base)


@pytest.mark.parametrize("attempt", [0, 1, 4, 10, 100])
def test_jitter_bounds(attempt: int) -> None:
    backoff = Backoff()
    base = min(0.5 * 2.0**attempt, 30.0)
    low = next_backoff_delay(attempt, backoff, random=fixed(0.0))
    high = next_backoff_delay(attempt, backoff, random=fixed(0.999999999))
    assert low == pytest.approx(base * 0.8)
    assert high == pytest.approx(base * 1.2)
    for r in (0.1, 0.3, 0.7, 0.9):
        assert low <= next_backoff_delay(attempt, backoff, random=fixed(r)) <= high


def test_cap_applies_before_jitter() -> None:
    # As in the reference: the jitter may push a capped delay above max.
    backoff = Backoff(min=1.0, max=10.0, factor=3.0, jitter=0.5)
    assert next_backoff_delay(20, backoff, random=fixed(0.999999999)) == pytest.approx(15.0)
    assert next_backoff_delay(20, backoff, random=fixed(0.0)) == pytest.approx(5.0)


def test_huge_attempts_do_not_overflow() -> None:
    assert next_backoff_delay(10_000, Backoff(), random=fixed(0.5)) == 30.0


def test_negative_attempt_counts_as_zero() -> None:
    assert next_backoff_delay(-3, Backoff(), random=fixed(0.5)) == 0.5


def test_never_negative() -> None:
    assert next_backoff_delay(0, Backoff(min=0.0, max=1.0, jitter=1.0), random=fixed(0.0)) == 0.0
    assert next_backoff_delay(0, Backoff(min=0.1, jitter=1.0), random=fixed(0.0)) == 0.0


def test_default_random_stays_within_bounds() -> None:
    for attempt in range(12):
        base = min(0.5 * 2**attempt, 30.0)
        for _ in range(50):
            assert base * 0.8 <= next_backoff_delay(attempt) <= base * 1.2


@pytest.mark.parametrize(
    "kwargs",
    [{"min": -1}, {"min": 2, "max": 1}, {"factor": 0.5}, {"jitter": 1.5}, {"jitter": -0.1}, {"min": "1"}, {"max": float("nan")}],
)
def test_invalid_backoff(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        Backoff(**kwargs)


def test_client_defaults_match_the_reference_client() -> None:
    parameters = inspect.signature(RealtimeClient).parameters
    assert parameters["max_queue_size"].default == 100
    assert parameters["request_timeout"].default == 30.0
