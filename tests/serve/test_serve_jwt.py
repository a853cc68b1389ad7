"""``safe-fast serve`` with JWT issuers: a JWKS endpoint with key rotation, a PEM key file, an HMAC secret."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import InvalidStatus

from serve_helpers import Serve, closed_with, connect, eventually, recv_type, wire

pytestmark = pytest.mark.timeout(60)

JWKS_ISSUER = "https://idp.example.test"
PEM_ISSUER = "https://pem.example.test"
HMAC_ISSUER = "https://hmac.example.test"
SECRET = "a-shared-secret-of-at-least-32-bytes!"


class JwksEndpoint:
    """A JWKS document served on 127.0.0.1; ``keys`` is what it lists now."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.fetches += 1
                body = json.dumps({"keys": endpoint.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def publish(self, *pairs: tuple[str, Any]) -> None:
        self.keys = [
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())),
                "kid": kid,
                "alg": "ES256",
                "use": "sig",
            }
            for kid, key in pairs
        ]


@pytest.fixture
def jwks() -> Iterator[JwksEndpoint]:
    endpoint = JwksEndpoint()
    endpoint.thread.start()
    try:
        yield endpoint
    finally:
        endpoint.httpd.shutdown()
        endpoint.httpd.server_close()


def token(key: Any, issuer: str, kid: str | None = None, algorithm: str = "ES256") -> str:
    claims = {"iss": issuer, "aud": "sharedata", "sub": "alice", "exp": int(time.time()) + 300}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


async def accepted(serve: Serve, jwt_token: str) -> bool:
    """True when a client with this token gets its state frame; False on 401 or a 4002 close."""
    try:
        ws = await connect(f"{serve.url}?token={jwt_token}")
    except InvalidStatus as exc:
        assert exc.response.status_code == 401
        return False
    try:  # refused after the upgrade (an unknown kid waits for a JWKS refresh): closed with 4002
        await ws.send(wire(type="subscribe", shareDataId="counter"))
        await recv_type(ws, "state")
    except Exception:
        code, _ = await closed_with(ws)
        assert code == 4002
        return False
    await ws.close()
    return True


async def test_issuers_from_a_jwks_url_with_rotation_a_pem_file_and_an_hmac_secret(
    jwks: JwksEndpoint, tmp_path: Path
) -> None:
    first, second, pem_key, stranger = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    jwks.publish(("k1", first))
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(
        pem_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    issuers = [
        {"issuer": JWKS_ISSUER, "jwks_url": jwks.url, "jwks_min_refresh_interval": 0},
        {"issuer": PEM_ISSUER, "public_key_file": str(pem)},
        {"issuer": HMAC_ISSUER, "hmac_secret_env": "TEST_HMAC_SECRET"},
    ]
    serve = Serve(
        "serve_apps:no_hooks",
        env={"SAFE_FAST_JWT_ISSUERS": json.dumps(issuers), "TEST_HMAC_SECRET": SECRET},
        log=tmp_path / "serve.log",
    )
    await asyncio.to_thread(serve.start)
    try:
        assert jwks.fetches == 1  # fetched at start-up
        assert await accepted(serve, token(first, JWKS_ISSUER, "k1"))
        assert await accepted(serve, token(pem_key, PEM_ISSUER))
        assert await accepted(serve, token(SECRET, HMAC_ISSUER, algorithm="HS256"))
        assert not await accepted(serve, token(stranger, PEM_ISSUER))
        assert not await accepted(serve, token(first, HMAC_ISSUER, "k1"))  # right key, wrong issuer
        assert jwks.fetches == 1  # known keys cost no fetch

        # The identity provider rotates: k2 replaces k1.
        jwks.publish(("k2", second))
        assert await accepted(serve, token(second, JWKS_ISSUER, "k2"))  # unknown kid: refreshed
        assert jwks.fetches == 2
        assert not await accepted(serve, token(first, JWKS_ISSUER, "k1"))  # no longer listed
        assert not await accepted(serve, token(stranger, JWKS_ISSUER, "k2"))  # forged with a listed kid
        assert not await accepted(serve, token(stranger, JWKS_ISSUER, "made-up"))
    finally:
        await asyncio.to_thread(serve.stop)
    assert SECRET not in (tmp_path / "serve.log").read_text()


async def test_a_key_the_issuer_withdraws_stops_verifying_after_the_periodic_refresh(
    jwks: JwksEndpoint, tmp_path: Path
) -> None:
    old, new = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    jwks.publish(("old", old))
    issuers = [
        {"issuer": JWKS_ISSUER, "jwks_url": jwks.url, "jwks_refresh_interval": 0.2, "jwks_min_refresh_interval": 60}
    ]
    serve = Serve("serve_apps:no_hooks", env={"SAFE_FAST_JWT_ISSUERS": json.dumps(issuers)}, log=tmp_path / "serve.log")
    await asyncio.to_thread(serve.start)
    try:
        assert await accepted(serve, token(old, JWKS_ISSUER, "old"))
        jwks.publish(("new", new))
        fetches = jwks.fetches
        await eventually(lambda: jwks.fetches >= fetches + 2, "periodic fetches")  # no token asked for them
        assert not await accepted(serve, token(old, JWKS_ISSUER, "old"))
        assert await accepted(serve, token(new, JWKS_ISSUER, "new"))
    finally:
        await asyncio.to_thread(serve.stop)
