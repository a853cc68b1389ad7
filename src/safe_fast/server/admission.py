"""Admission and abuse controls: allowed origins, message rate, connections per address.

Three independent checks, each off unless configured:

* **Origin** (``allowed_origins``): an upgrade whose ``Origin`` header is
  not in the list gets HTTP 403 before ``authenticate`` runs. It defends
  against cross-site WebSocket hijacking, which matters when browsers
  authenticate with something they attach on their own (cookies, HTTP
  auth); a token the page must put in the URL or a header is not sent by
  a foreign page anyway. Requests without an ``Origin`` (non-browser
  clients, which can send any Origin they like) are let through. ``"*"``
  in the list allows every origin.
* **Message rate** (``max_messages_per_second`` with ``message_burst``): a
  token bucket per connection, refilled continuously; a message that finds
  it empty gets an ``error`` frame (code ``rate-limited``) and the connection
  is closed with 1008. Only data messages count (pings of the WebSocket
  layer do not).
* **Connections per client address** (``max_connections_per_address``):
  one over the cap is closed with 1008 right after the upgrade (picows
  hands the listener factory no peer address, so the decision waits for the
  connection's transport). Behind a reverse proxy every client has the
  proxy's address: list the proxies in ``trusted_proxies`` and the address
  is taken from ``X-Forwarded-For``, read from the right, skipping trusted
  hops; an untrusted peer's ``X-Forwarded-For`` is ignored.

``UpgradeRequest.remote_address`` stays None for ``authenticate`` for the
same reason: the peer address exists only once the upgrade is answered.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Iterable, Mapping, Optional, Sequence, Union

__all__ = ["AdmissionPolicy", "TokenBucket", "RATE_LIMITED_CODE"]

RATE_LIMITED_CODE = "rate-limited"

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; one per message."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when there is none."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class AdmissionPolicy:
    """The admission settings of one server and its per-address connection counts."""

    def __init__(
        self,
        *,
        allowed_origins: Optional[Iterable[str]] = None,
        max_messages_per_second: Optional[float] = None,
        message_burst: Optional[int] = None,
        max_connections_per_address: Optional[int] = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        origins = None if allowed_origins is None else [origin.rstrip("/").lower() for origin in allowed_origins]
        self.allowed_origins: Optional[frozenset[str]] = None
        if origins and "*" not in origins:
            self.allowed_origins = frozenset(origins)
        if max_messages_per_second is not None and not max_messages_per_second >= 0:
            raise ValueError("max_messages_per_second must be >= 0 (0: no limit)")
        self.message_rate = float(max_messages_per_second or 0.0)
        burst = message_burst if message_burst is not None else max(1, int(self.message_rate * 2))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError("message_burst must be an int >= 1")
        self.message_burst = burst
        cap = max_connections_per_address or 0
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError("max_connections_per_address must be an int >= 0 (0: no cap)")
        self.max_connections_per_address = cap
        self.trusted_proxies: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in trusted_proxies
        )
        self._per_address: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self.allowed_origins or self.message_rate or self.max_connections_per_address)

    # origin

    def origin_allowed(self, headers: Mapping[str, str]) -> bool:
        if self.allowed_origins is None:
            return True
        origin = headers.get("origin")
        if origin is None:
            return True
        return origin.rstrip("/").lower() in self.allowed_origins

    # message rate

    def new_bucket(self) -> Optional[TokenBucket]:
        return TokenBucket(self.message_rate, self.message_burst) if self.message_rate else None

    # connections per address

    def client_address(self, peer: Optional[str], forwarded_for: Sequence[str] = ()) -> Optional[str]:
        """The client's address: ``peer``, or from ``X-Forwarded-For`` when ``peer`` is a trusted proxy."""
        if peer is None or not self._trusted(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        address = peer
        for hop in reversed(hops):
            address = hop
            if not self._trusted(hop):
                break
        return address

    def _trusted(self, address: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def admit(self, address: Optional[str]) -> bool:
        """Count one more connection from ``address``; False (and not counted) past the cap."""
        if not self.max_connections_per_address or address is None:
            return True
        count = self._per_address.get(address, 0)
        if count >= self.max_connections_per_address:
            return False
        self._per_address[address] = count + 1
        return True

    def release(self, address: Optional[str]) -> None:
        """One connection admitted from ``address`` is gone."""
        count = self._per_address.get(address or "", 0)
        if count > 1:
            self._per_address[address or ""] = count - 1
        elif count:
            del self._per_address[address or ""]

    def connections_from(self, address: str) -> int:
        return self._per_address.get(address, 0)
