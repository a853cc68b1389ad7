"""``wss://`` on the listener itself: ``attach_realtime_server(ssl=...)``."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect as ws_connect

from safe_fast import RealtimeClient
from safe_fast.server import picows_buffers
from server_helpers import DEADLINE, ServerFactory, wait_until


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_file, key_file = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    client_context = ssl.create_default_context(cafile=str(cert_file))
    return server_context, client_context


async def test_wss_serves_snapshots_broadcasts_and_proposals(
    server_factory: ServerFactory, manager: Any, certificate: tuple[Path, Path]
) -> None:
    server_context, client_context = contexts(certificate)
    server = await server_factory(ssl=server_context)
    assert server.url.startswith("wss://127.0.0.1:")
    async with RealtimeClient(server.url, ssl_context=client_context) as client:
        subscription = client.subscribe("doc")
        frames = aiter(subscription)
        state = await asyncio.wait_for(anext(frames), DEADLINE)
        assert state.type == "state" and state.current_state == {"count": 0}
        # A burst of broadcasts, several per loop iteration and larger than a
        # TLS record: the bytes must all go through the TLS transport.
        async with ws_connect(server.url, ssl=client_context, max_size=None) as peer:
            await peer.send(json.dumps({"v": 1, "type": "subscribe", "shareDataId": "doc"}))
            assert json.loads(await asyncio.wait_for(peer.recv(), DEADLINE))["type"] == "state"
            for i in range(1, 21):
                result = await client.propose("doc", "inc", {"count": i, "pad": "x" * 40_000})
                assert result.accepted and result.transaction_id == str(i)
            for i in range(1, 21):
                frame = await asyncio.wait_for(anext(frames), DEADLINE)
                assert (frame.transaction_id, frame.current_state["count"]) == (str(i), i)
                message = json.loads(await asyncio.wait_for(peer.recv(), DEADLINE))
                assert (message["transactionId"], message["currentState"]["count"]) == (str(i), i)


async def test_a_plain_client_cannot_talk_to_a_wss_listener(
    server_factory: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    server_context, _ = contexts(certificate)
    server = await server_factory(ssl=server_context)
    with pytest.raises(Exception):
        async with ws_connect(server.url.replace("wss://", "ws://"), open_timeout=DEADLINE):
            pass


async def test_ssl_must_be_an_ssl_context(server_factory: ServerFactory) -> None:
    with pytest.raises(TypeError, match="ssl must be an ssl.SSLContext"):
        await server_factory(ssl=True)


async def test_picows_buffers_are_given_back_behind_tls_too(
    server_factory: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    server_context, client_context = contexts(certificate)
    server = await server_factory(ssl=server_context)
    async with ws_connect(server.url, ssl=client_context, max_size=None) as peer:
        await peer.send(json.dumps({"v": 1, "type": "subscribe", "shareDataId": "doc"}))
        assert json.loads(await asyncio.wait_for(peer.recv(), DEADLINE))["type"] == "state"
        (connection,) = server.connections
        websocket = connection.control.transport
        idle = (picows_buffers.READ_CAPACITY, 0)
        await wait_until(lambda: picows_buffers.buffer_state(websocket) == idle, "picows' buffers trimmed")
        for i in range(2):
            await peer.send(
                json.dumps(
                    {
                        "v": 1,
                        "type": "propose",
                        "shareDataId": "doc",
                        "functionId": "inc",
                        "proposedData": {"pad": "z" * 100_000},
                        "correlationId": f"c{i}",
                    }
                )
            )
            for _ in range(10):
                message = json.loads(await asyncio.wait_for(peer.recv(), DEADLINE))
                if message["type"] == "proposal-result":
                    break
            assert message["correlationId"] == f"c{i}" and message["accepted"], message
            await wait_until(lambda: picows_buffers.buffer_state(websocket) == idle, "the read buffer given back")
