"""The JWT bridge of ``safe_fast.auth`` on a real server, end to end.

A real RSA issuer key, real tokens, a real server on 127.0.0.1 and a real
client library (websockets): a good token upgrades (from the
``Authorization`` header or ``?token=``) and may subscribe; every bad token
is refused with HTTP 401 before any WebSocket exists; a token that expires
while its connection is open closes that connection with 4002.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any, Optional
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from safe_fast import ShareData, ShareDataManager, ShareFunction, attach_realtime_server
from safe_fast.auth import (
    AuthorizationAudience,
    AuthorizedAuthorities,
    ShareDataAuthContext,
    create_share_data_authenticate,
    share_data_audience_authorizer,
)
from server_helpers import wait_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0
ISSUER = "https://issuer.test"
ISSUER_OF_ANOTHER_AUDIENCE = "https://analytics-issuer.test"
OTHER_AUDIENCE = "analytics"


class Keys:
    def __init__(self) -> None:
        self.signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(**overrides: Any) -> dict[str, Any]:
    now = time.time()
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AuthorizationAudience.SHAREDATA.value,
        "sub": "alice",
        "iat": int(now) - 5,
        "exp": int(now) + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: Keys, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), keys.signing, algorithm="RS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token() -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims()).encode())}."


def hs256_with_public_key(keys: Keys) -> str:
    """The algorithm-confusion forgery: HS256 'signed' with the issuer's public key."""
    signing_input = (
        f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims()).encode())}"
    )
    signature = hmac.new(keys.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tampered(keys: Keys) -> str:
    """A good token whose claims were changed after signing."""
    header, _, signature = sign(keys).split(".")
    return f"{header}.{_b64(json.dumps(claims(sub='mallory')).encode())}.{signature}"


BAD_TOKENS = {
    "expired": lambda k: sign(k, iat=int(time.time()) - 120, exp=int(time.time()) - 60),
    "wrong audience": lambda k: sign(k, aud="somebody-else"),
    "unknown issuer": lambda k: sign(k, iss="https://unknown.test"),
    "issuer trusted for another audience only": lambda k: sign(k, iss=ISSUER_OF_ANOTHER_AUDIENCE),
    "bad signature": lambda k: jwt.encode(claims(), k.impostor, algorithm="RS256"),
    "claims changed after signing": tampered,
    "not yet valid": lambda k: sign(k, nbf=int(time.time()) + 300),
    "no exp": lambda k: sign(k, exp=None),
    "alg none": lambda k: unsigned_token(),
    "HS256 with the public key": hs256_with_public_key,
    "not a JWT": lambda k: "not-a-token",
}


class AuthServer:
    def __init__(self, server: Any, manager: ShareDataManager, authorities: AuthorizedAuthorities) -> None:
        self.server = server
        self.manager = manager
        self.authorities = authorities
        self.opened: list[Any] = []
        self.closed: list[Any] = []
        server.on("connection:opened", self.opened.append)
        server.on("connection:closed", self.closed.append)

    def url(self, token: Optional[str] = None) -> str:
        return self.server.url if token is None else f"{self.server.url}?token={quote(token, safe='')}"


@pytest.fixture
async def auth_server(keys: Keys) -> Any:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state={"count": 0}))
    authorities = AuthorizedAuthorities()
    authorities.add(AuthorizationAudience.SHAREDATA, ISSUER, keys.public_pem)
    # Trusted, but for another audience: its tokens must not open SHAREDATA connections.
    authorities.add(OTHER_AUDIENCE, ISSUER_OF_ANOTHER_AUDIENCE, keys.signing.public_key())
    server = await attach_realtime_server(
        manager=manager,
        authenticate=create_share_data_authenticate(authorities=authorities),
        authorize_subscribe=share_data_audience_authorizer,
        host="127.0.0.1",
        port=0,
        heartbeat_interval=None,
        close_timeout=1.0,
    )
    try:
        yield AuthServer(server, manager, authorities)
    finally:
        await asyncio.wait_for(server.close(), 15)


async def request(ws: Any, message: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))


async def subscribe(ws: Any, share_data_id: str = "doc") -> dict[str, Any]:
    return await request(ws, {"v": 1, "type": "subscribe", "shareDataId": share_data_id})


# -- good tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["header", "query"])
async def test_a_good_token_upgrades_and_can_subscribe(auth_server: AuthServer, keys: Keys, via: str) -> None:
    token = sign(keys, sub=f"alice-{via}")
    if via == "header":
        client = connect(auth_server.url(), additional_headers={"Authorization": f"Bearer {token}"},
                         open_timeout=DEADLINE, ping_interval=None)
    else:
        client = connect(auth_server.url(token), open_timeout=DEADLINE, ping_interval=None)
    async with client as ws:
        state = await subscribe(ws)
        assert state == {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"count": 0},
                         "lastTransactionId": None}
        await auth_server.manager.apply_transaction("doc", {"count": 1}, ShareFunction("inc", lambda s, p: True))
        frame = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
        assert (frame["type"], frame["transactionId"], frame["currentState"]) == ("transaction", "1", {"count": 1})

        (opened,) = auth_server.opened
        context = opened.context
        assert isinstance(context, ShareDataAuthContext)
        assert context.issuer == ISSUER and context.audience == AuthorizationAudience.SHAREDATA
        assert context.payload["sub"] == f"alice-{via}"
        assert [c.id for c in auth_server.server.connections] == [opened.connection_id]


# -- bad tokens ---------------------------------------------------------------------------------


async def assert_401(url: str, headers: Optional[dict[str, str]] = None) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers, open_timeout=DEADLINE, ping_interval=None):
            pass
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("via", ["header", "query"])
@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_a_bad_token_gets_401(auth_server: AuthServer, keys: Keys, name: str, via: str) -> None:
    token = BAD_TOKENS[name](keys)
    if via == "header":
        await assert_401(auth_server.url(), {"Authorization": f"Bearer {token}"})
    else:
        await assert_401(auth_server.url(token))
    assert auth_server.opened == [] and auth_server.server.connections == []


async def test_no_token_or_an_unusable_authorization_header_gets_401(auth_server: AuthServer, keys: Keys) -> None:
    good = sign(keys)
    await assert_401(auth_server.url())
    await assert_401(auth_server.url(), {"Authorization": "Bearer"})
    await assert_401(auth_server.url(), {"Authorization": f"Basic {good}"})
    # A present Authorization header is authoritative: no fallback to ?token=.
    await assert_401(auth_server.url(good), {"Authorization": "Bearer not-a-token"})
    assert auth_server.opened == [] and auth_server.server.connections == []
    # The server is unharmed: the same good token still works.
    async with connect(auth_server.url(good), open_timeout=DEADLINE, ping_interval=None) as ws:
        assert (await subscribe(ws))["type"] == "state"


# -- tokens and authorities over time ------------------------------------------------------------


async def test_a_token_that_expires_while_subscribed_is_closed_with_4002(auth_server: AuthServer, keys: Keys) -> None:
    expires_at = time.time() + 2.0
    token = sign(keys, exp=expires_at)
    async with connect(auth_server.url(), additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=DEADLINE, ping_interval=None) as ws:
        assert (await subscribe(ws))["type"] == "state"
        pong = await request(ws, {"v": 1, "type": "ping", "correlationId": "before-expiry"})
        assert pong == {"v": 1, "type": "pong", "correlationId": "before-expiry"}
        (opened,) = auth_server.opened

        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 6.0)
        closed_at = time.time()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "token expired")
    # Not before the credential actually expired (clock granularity aside).
    assert closed_at >= expires_at - 0.1
    await wait_until(lambda: any(e.connection_id == opened.connection_id for e in auth_server.closed),
                     "connection:closed for the expired connection")
    (event,) = auth_server.closed
    assert event.code == 4002
    assert auth_server.server.connections == []
    # The expired token cannot come back.
    await assert_401(auth_server.url(token))


async def test_removing_an_issuer_refuses_its_next_upgrade_and_keeps_open_connections(
    auth_server: AuthServer, keys: Keys
) -> None:
    token = sign(keys)
    async with connect(auth_server.url(token), open_timeout=DEADLINE, ping_interval=None) as ws:
        assert (await subscribe(ws))["type"] == "state"
        assert auth_server.authorities.remove(AuthorizationAudience.SHAREDATA, ISSUER) == 1
        await assert_401(auth_server.url(token))
        pong = await request(ws, {"v": 1, "type": "ping", "correlationId": "still-open"})
        assert pong["correlationId"] == "still-open"
    auth_server.authorities.add(AuthorizationAudience.SHAREDATA, ISSUER, keys.public_pem)
    async with connect(auth_server.url(token), open_timeout=DEADLINE, ping_interval=None) as ws:
        assert (await subscribe(ws))["type"] == "state"


async def test_a_context_of_another_audience_may_connect_but_not_subscribe(keys: Keys) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=1))
    authorities = AuthorizedAuthorities()
    authorities.add(OTHER_AUDIENCE, ISSUER, keys.public_pem)
    server = await attach_realtime_server(
        manager=manager,
        authenticate=create_share_data_authenticate(authorities=authorities, audience=OTHER_AUDIENCE),
        authorize_subscribe=share_data_audience_authorizer,
        host="127.0.0.1",
        port=0,
        heartbeat_interval=None,
        close_timeout=1.0,
    )
    try:
        async with connect(server.url, additional_headers={"Authorization": f"Bearer {sign(keys, aud=OTHER_AUDIENCE)}"},
                           open_timeout=DEADLINE, ping_interval=None) as ws:
            answer = await subscribe(ws)
            assert answer == {"v": 1, "type": "error", "code": "unauthorized-subscribe",
                              "message": "not authorized to subscribe to doc"}
            # Not fatal: the connection stays open.
            pong = await request(ws, {"v": 1, "type": "ping", "correlationId": "after-refusal"})
            assert pong == {"v": 1, "type": "pong", "correlationId": "after-refusal"}
        # A SHAREDATA token is not trusted by this server at all.
        await assert_401(server.url, {"Authorization": f"Bearer {sign(keys)}"})
    finally:
        await asyncio.wait_for(server.close(), 15)
