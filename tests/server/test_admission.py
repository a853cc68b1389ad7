"""Admission controls over real sockets: allowed origins, message rate, connections per address."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from safe_fast.metrics import ServerMetrics
from safe_fast.server import AdmissionPolicy
from safe_fast.server.admission import TokenBucket
from server_helpers import DEADLINE, ServerFactory, barrier, closed_with, connect, recv_json, send_json


def sample(metrics: ServerMetrics, line_start: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


async def test_an_upgrade_from_another_origin_gets_403_before_authenticate(server_factory: ServerFactory) -> None:
    calls: list[Any] = []

    def authenticate(request: Any) -> Any:
        calls.append(request.headers.get("origin"))
        return {"subject": "alice"}

    server = await server_factory(authenticate=authenticate, allowed_origins=["https://app.example.com"])
    metrics = ServerMetrics().install(server)
    with pytest.raises(InvalidStatus) as refused:
        await connect(server, origin="https://evil.example.net")
    assert refused.value.response.status_code == 403
    assert calls == []
    assert sample(metrics, 'safe_fast_admission_refusals_total{reason="origin"}') == 1
    async with connect(server, origin="https://APP.example.com") as ws:  # origins compare case-insensitively
        assert await barrier(ws) == []
    async with connect(server) as ws:  # no Origin: not a browser, nothing to check
        assert await barrier(ws) == []
    assert calls == ["https://APP.example.com", None]


async def test_a_connection_sending_too_fast_gets_an_error_frame_and_1008(server_factory: ServerFactory) -> None:
    server = await server_factory(max_messages_per_second=0.01, message_burst=5)
    metrics = ServerMetrics().install(server)
    async with connect(server) as ws:
        for index in range(5):  # the burst passes
            await send_json(ws, {"v": 1, "type": "ping", "correlationId": f"p{index}"})
            assert (await recv_json(ws))["type"] == "pong"
        await send_json(ws, {"v": 1, "type": "ping", "correlationId": "one-too-many"})
        code, reason, received = await closed_with(ws)
    assert code == 1008 and reason == "message rate limit exceeded"
    assert [json.loads(message)["code"] for message in received] == ["rate-limited"]
    assert sample(metrics, "safe_fast_rate_limited_total") == 1
    async with connect(server) as ws:  # a normal client is not bothered
        assert await barrier(ws) == []


async def test_connections_past_the_cap_of_one_address_are_closed_with_1008(server_factory: ServerFactory) -> None:
    server = await server_factory(max_connections_per_address=2)
    first = await connect(server)
    second = await connect(server)
    third = await connect(server)
    code, reason, _ = await closed_with(third)
    assert (code, reason) == (1008, "too many connections from this address")
    await first.close()
    await asyncio.wait_for(first.wait_closed(), DEADLINE)
    for _ in range(100):  # the server sees the close shortly after the client
        if len(server.connections) == 1:
            break
        await asyncio.sleep(0.01)
    async with connect(server) as again:
        assert await barrier(again) == []
    await second.close()


async def test_behind_a_trusted_proxy_the_cap_counts_forwarded_addresses(server_factory: ServerFactory) -> None:
    server = await server_factory(max_connections_per_address=1, trusted_proxies=["127.0.0.1/32"])
    a = await connect(server, additional_headers={"X-Forwarded-For": "203.0.113.5"})
    b = await connect(server, additional_headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.6"})
    assert await barrier(a) == [] and await barrier(b) == []
    again = await connect(server, additional_headers={"X-Forwarded-For": "203.0.113.5"})
    assert (await closed_with(again))[0] == 1008
    await a.close()
    await b.close()


async def test_an_untrusted_peer_cannot_choose_its_address(server_factory: ServerFactory) -> None:
    server = await server_factory(max_connections_per_address=1, trusted_proxies=["10.0.0.0/8"])
    a = await connect(server, additional_headers={"X-Forwarded-For": "203.0.113.5"})
    b = await connect(server, additional_headers={"X-Forwarded-For": "203.0.113.9"})
    assert (await closed_with(b))[0] == 1008  # both are 127.0.0.1
    await a.close()


def test_the_client_address_is_the_first_untrusted_hop_from_the_right() -> None:
    policy = AdmissionPolicy(max_connections_per_address=1, trusted_proxies=["10.0.0.0/8", "::1/128"])
    assert policy.client_address("10.0.0.1", ["1.2.3.4, 10.0.0.2"]) == "1.2.3.4"
    assert (
        policy.client_address("10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.2"]) == "1.2.3.4"
    )  # 6.6.6.6 is the client's claim
    assert policy.client_address("10.0.0.1", ["10.0.0.3"]) == "10.0.0.3"
    assert policy.client_address("10.0.0.1", []) == "10.0.0.1"
    assert policy.client_address("192.0.2.1", ["1.2.3.4"]) == "192.0.2.1"
    assert policy.client_address("::1", ["2001:db8::1"]) == "2001:db8::1"


def test_a_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [True, True, True]
    bucket.stamp -= 0.01  # 10 ms later: 10 more tokens, capped at the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_admission_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_messages_per_second"):
        AdmissionPolicy(max_messages_per_second=-1)
    with pytest.raises(ValueError, match="message_burst"):
        AdmissionPolicy(max_messages_per_second=1, message_burst=0)
    with pytest.raises(ValueError, match="max_connections_per_address"):
        AdmissionPolicy(max_connections_per_address=-2)
    with pytest.raises(ValueError):
        AdmissionPolicy(trusted_proxies=["not a network"])
    assert not AdmissionPolicy(allowed_origins=["*"]).active
