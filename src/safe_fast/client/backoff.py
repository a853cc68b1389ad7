"""Reconnect delays: exponential backoff with bounded jitter.

The formula is the reference client's (``nextBackoffDelay`` of
``@degenerate/realtime`` 0.7.1), in seconds instead of milliseconds:
attempt ``n`` (from 0) waits ``base = min(min * factor**n, max)`` plus
``base * jitter * U(-1, 1)``, never less than 0. The jitter spreads the
reconnects of many clients that lost the same server, so they do not all
come back in the same millisecond. Note that the jitter applies after the
cap: a delay may exceed ``max`` by up to ``max * jitter``.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass
from typing import Callable

__all__ = ["Backoff", "next_backoff_delay"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """How :class:`RealtimeClient` waits between reconnect attempts."""

    min: float = 0.5
    """Base delay of the first attempt, in seconds."""
    max: float = 30.0
    """Cap of the base delay, in seconds (before jitter)."""
    factor: float = 2.0
    """Growth of the base delay per consecutive failed attempt."""
    jitter: float = 0.2
    """Relative spread: the delay is ``base * (1 ± jitter)``, uniformly."""
    disabled: bool = False
    """Never reconnect: a lost connection closes the client, and every
    queued request fails at once."""

    def __post_init__(self) -> None:
        for name in ("min", "max", "factor", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"Backoff.{name} must be a number")
        if self.min < 0:
            raise ValueError("Backoff.min must be >= 0")
        if self.max < self.min:
            raise ValueError("Backoff.max must be >= Backoff.min")
        if self.factor < 1:
            raise ValueError("Backoff.factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Backoff.jitter must be between 0 and 1")


DEFAULT_BACKOFF = Backoff()


def next_backoff_delay(
    attempt: int,
    backoff: Backoff = DEFAULT_BACKOFF,
    random: Callable[[], float] = _random.random,
) -> float:
    """The delay in seconds before reconnect attempt ``attempt`` (from 0).

    ``random`` returns a float in ``[0, 1)``, like :func:`random.random`;
    pass a fixed one to make the result deterministic.
    """
    n = max(0, attempt)
    try:
        base = min(backoff.min * backoff.factor**n, backoff.max)
    except OverflowError:
        base = backoff.max
    jitter_amount = base * backoff.jitter * (random() * 2 - 1)
    return max(0.0, base + jitter_amount)
