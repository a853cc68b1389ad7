"""Tests for the JWT upgrade bridge (safe_fast.auth) with real generated keys."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import time
from dataclasses import FrozenInstanceError
from typing import Any, Callable

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from safe_fast.auth import (
    AuthorizationAudience,
    AuthorizedAuthorities,
    ShareDataAuthContext,
    create_share_data_authenticate,
    share_data_audience_authorizer,
)
from safe_fast.server.request import UpgradeRequest

ISS = "https://issuer.example"
OTHER_ISS = "https://other-issuer.example"
AUD = AuthorizationAudience.SHAREDATA.value
OTHER_AUD = "billing"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300}
    for name, value in overrides.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def sign(key: Any, alg: str = "RS256", headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def sign_raw(key: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Sign arbitrary header/payload JSON, bypassing PyJWT's encode-side checks."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    signature = jwt.get_algorithm_by_name(header["alg"]).sign(signing_input.encode(), key)
    return signing_input + "." + b64url(signature)


def forge_hs(secret: bytes, alg: str = "HS256", payload: dict[str, Any] | None = None) -> str:
    """Hand-rolled HMAC token (PyJWT itself refuses PEM secrets)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = (
        b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        + "."
        + b64url(json.dumps(payload if payload is not None else claims()).encode())
    )
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return signing_input + "." + b64url(signature)


def request(token: str | None = None, authorization: str | None = None, **extra_headers: str) -> UpgradeRequest:
    target = "/realtime" if token is None else f"/realtime?token={token}"
    headers = dict(extra_headers)
    if authorization is not None:
        headers["Authorization"] = authorization
    return UpgradeRequest.from_target(target, headers=headers)


class Keys:
    """Real keys, generated once per module (RSA generation is slow)."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.ec256 = ec.generate_private_key(ec.SECP256R1())
        self.ec384 = ec.generate_private_key(ec.SECP384R1())
        self.ec521 = ec.generate_private_key(ec.SECP521R1())
        self.ed25519 = ed25519.Ed25519PrivateKey.generate()
        self.ed448 = ed448.Ed448PrivateKey.generate()
        self.hmac64 = bytes(range(64))
        self.hmac_other = b"\x5a" * 64


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture()
def authorities(keys: Keys) -> AuthorizedAuthorities:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, pem(keys.rsa.public_key()))
    return auth


@pytest.fixture()
def authenticate(authorities: AuthorizedAuthorities) -> Callable[[Any], ShareDataAuthContext | None]:
    return create_share_data_authenticate(authorities=authorities)


# --------------------------------------------------------------------------
# Accepting valid tokens
# --------------------------------------------------------------------------


def test_valid_token_from_authorization_header(keys: Keys, authenticate: Any) -> None:
    token = sign(keys.rsa)
    ctx = authenticate(request(authorization=f"Bearer {token}"))
    assert isinstance(ctx, ShareDataAuthContext)
    assert ctx.issuer == ISS
    assert ctx.audience is AuthorizationAudience.SHAREDATA
    assert ctx.payload["sub"] == "alice"


def test_valid_token_from_query_parameter(keys: Keys, authenticate: Any) -> None:
    ctx = authenticate(request(token=sign(keys.rsa)))
    assert ctx is not None and ctx.payload["sub"] == "alice"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(keys: Keys, authenticate: Any, scheme: str) -> None:
    assert authenticate(request(authorization=f"{scheme} {sign(keys.rsa)}")) is not None


def test_header_name_is_case_insensitive(keys: Keys, authenticate: Any) -> None:
    req = UpgradeRequest.from_target("/realtime", headers={"AUTHORIZATION": f"Bearer {sign(keys.rsa)}"})
    assert authenticate(req) is not None


def test_header_wins_over_query(keys: Keys, authenticate: Any) -> None:
    good = sign(keys.rsa, sub="from-header")
    other = sign(keys.rsa, sub="from-query")
    ctx = authenticate(request(token=other, authorization=f"Bearer {good}"))
    assert ctx is not None and ctx.payload["sub"] == "from-header"
    # An invalid header token is not rescued by a valid query token.
    bad = sign(keys.rsa_other)
    assert authenticate(request(token=good, authorization=f"Bearer {bad}")) is None


def test_audience_list_containing_ours_is_accepted(keys: Keys, authenticate: Any) -> None:
    assert authenticate(request(token=sign(keys.rsa, aud=[OTHER_AUD, AUD]))) is not None


@pytest.mark.parametrize(
    ("key_name", "alg", "register_as"),
    [
        ("rsa", "RS256", "pem"),
        ("rsa", "RS384", "pem"),
        ("rsa", "RS512", "object"),
        ("rsa", "PS256", "pem"),
        ("rsa", "PS512", "pem_bytes"),
        ("ec256", "ES256", "pem"),
        ("ec384", "ES384", "pem"),
        ("ec521", "ES512", "object"),
        ("ed25519", "EdDSA", "pem"),
        ("ed448", "EdDSA", "object"),
        ("hmac64", "HS256", "secret"),
        ("hmac64", "HS384", "secret"),
        ("hmac64", "HS512", "secret"),
    ],
)
def test_each_algorithm_family_verifies(keys: Keys, key_name: str, alg: str, register_as: str) -> None:
    private = getattr(keys, key_name)
    if register_as == "secret":
        registered: Any = private
    elif register_as == "object":
        registered = private.public_key()
    elif register_as == "pem_bytes":
        registered = pem(private.public_key()).encode()
    else:
        registered = pem(private.public_key())
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, registered, algorithms=(alg,))
    authenticate = create_share_data_authenticate(authorities=auth)
    assert authenticate(request(token=sign(private, alg))) is not None
    # The same key registered for this algorithm does not verify another key's token.
    other = keys.hmac_other if register_as == "secret" else keys.rsa_other
    other_alg = alg if register_as == "secret" else "RS256"
    assert authenticate(request(token=sign(other, other_alg))) is None


def test_hmac_secret_given_as_str(keys: Keys) -> None:
    secret = "s" * 64
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, secret, algorithms="HS256")
    authenticate = create_share_data_authenticate(authorities=auth)
    assert authenticate(request(token=sign(secret.encode(), "HS256"))) is not None


def test_key_registered_for_several_algorithms(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, pem(keys.rsa.public_key()), algorithms=("RS256", "PS256"))
    authenticate = create_share_data_authenticate(authorities=auth)
    assert authenticate(request(token=sign(keys.rsa, "RS256"))) is not None
    assert authenticate(request(token=sign(keys.rsa, "PS256"))) is not None
    assert authenticate(request(token=sign(keys.rsa, "RS512"))) is None


@pytest.mark.parametrize("form", ["certificate_pem", "certificate_object", "ssh", "der"])
def test_other_public_key_encodings(keys: Keys, form: str) -> None:
    public = keys.rsa.public_key()
    if form.startswith("certificate"):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(keys.rsa, hashes.SHA256())
        )
        key: Any = cert if form == "certificate_object" else cert.public_bytes(serialization.Encoding.PEM).decode()
    elif form == "ssh":
        key = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    else:
        key = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, key)
    assert create_share_data_authenticate(authorities=auth)(request(token=sign(keys.rsa))) is not None


# --------------------------------------------------------------------------
# Rejections (table-driven)
# --------------------------------------------------------------------------


def _tampered(keys: Keys) -> str:
    header, _payload, signature = sign(keys.rsa).split(".")
    forged = b64url(json.dumps(claims(sub="mallory")).encode())
    return f"{header}.{forged}.{signature}"


def _alg_none_with_fake_signature(keys: Keys) -> str:
    header, payload, _ = jwt.encode(claims(), None, algorithm="none").split(".")
    return f"{header}.{payload}.{b64url(b'x' * 32)}"


def _header_swap(keys: Keys) -> str:
    # RS256 signature, header claims PS256 (not registered for this key).
    _, payload, signature = sign(keys.rsa).split(".")
    header = b64url(json.dumps({"alg": "PS256", "typ": "JWT"}).encode())
    return f"{header}.{payload}.{signature}"


def _with_header(keys: Keys, extra: dict[str, Any]) -> str:
    return sign(keys.rsa, headers=extra)


REJECTED_TOKENS: dict[str, Callable[[Keys], str]] = {
    "expired": lambda k: sign(k.rsa, exp=int(time.time()) - 10),
    "not yet valid (nbf)": lambda k: sign(k.rsa, nbf=int(time.time()) + 60),
    "issued in the future (iat)": lambda k: sign(k.rsa, iat=int(time.time()) + 60),
    "wrong audience": lambda k: sign(k.rsa, aud=OTHER_AUD),
    "audience missing": lambda k: sign(k.rsa, aud=None),
    "unknown issuer": lambda k: sign(k.rsa, iss="https://evil.example"),
    "issuer missing": lambda k: sign(k.rsa, iss=None),
    "issuer not a string": lambda k: sign_raw(k.rsa, {"alg": "RS256"}, claims(iss=[ISS])),
    "signed by another key": lambda k: sign(k.rsa_other),
    "tampered payload": _tampered,
    "alg none, empty signature": lambda k: jwt.encode(claims(), None, algorithm="none"),
    "alg none, fake signature": _alg_none_with_fake_signature,
    "HS256 signed with the RSA public PEM": lambda k: forge_hs(pem(k.rsa.public_key()).encode()),
    "HS256 signed with the PEM bytes, trailing newline stripped": lambda k: forge_hs(
        pem(k.rsa.public_key()).strip().encode()
    ),
    "algorithm not registered for the key (PS256)": lambda k: sign(k.rsa, "PS256"),
    "header alg swapped": _header_swap,
    "exp missing (required by default)": lambda k: sign(k.rsa, exp=None),
    "exp is a string": lambda k: sign(k.rsa, exp=str(int(time.time()) + 300)),
    "unknown kid": lambda k: sign(k.rsa, headers={"kid": "nope"}),
    "kid not a string": lambda k: sign_raw(k.rsa, {"alg": "RS256", "kid": 7}, claims()),
    "NaN exp": lambda k: sign_raw(k.rsa, {"alg": "RS256"}, claims(exp=float("nan"))),
    "infinite exp": lambda k: sign_raw(k.rsa, {"alg": "RS256"}, claims(exp=float("inf"))),
    "iat is a bool": lambda k: sign_raw(k.rsa, {"alg": "RS256"}, claims(iat=True)),
    "payload is a list": lambda k: sign_raw(k.rsa, {"alg": "RS256"}, [claims()]),  # type: ignore[arg-type]
    "b64 false header": lambda k: sign_raw(k.rsa, {"alg": "RS256", "b64": False, "crit": ["b64"]}, claims()),
    "crit header": lambda k: _with_header(k, {"crit": ["exp"], "exp": 1}),
    "malformed: not a jwt": lambda k: "not-a-jwt",
    "malformed: garbage segments": lambda k: "aaaa.bbbb.cccc",
    "malformed: two segments": lambda k: ".".join(sign(k.rsa).split(".")[:2]),
    "malformed: JWE-like five segments": lambda k: sign(k.rsa) + ".aaaa.bbbb",
    "malformed: not json header": lambda k: b64url(b"{nope") + "." + b64url(b"{}") + "." + b64url(b"sig"),
    "oversized": lambda k: "a" * 20000 + "." + "b" * 10 + "." + "c" * 10,
}


@pytest.mark.parametrize("case", list(REJECTED_TOKENS), ids=list(REJECTED_TOKENS))
@pytest.mark.parametrize("transport", ["header", "query"])
def test_rejected_tokens(keys: Keys, authenticate: Any, case: str, transport: str) -> None:
    token = REJECTED_TOKENS[case](keys)
    req = request(authorization=f"Bearer {token}") if transport == "header" else request(token=token)
    assert authenticate(req) is None


def test_hs256_confusion_with_rsa_and_hmac_keys_on_one_issuer(keys: Keys) -> None:
    # Even when the issuer legitimately has an HMAC key too, a token "signed"
    # with its public PEM as HMAC secret does not verify.
    auth = AuthorizedAuthorities()
    public_pem = pem(keys.rsa.public_key())
    auth.add(AuthorizationAudience.SHAREDATA, ISS, public_pem, algorithms=("RS256",))
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.hmac64, algorithms=("HS256",))
    authenticate = create_share_data_authenticate(authorities=auth)
    assert authenticate(request(token=forge_hs(public_pem.encode()))) is None
    assert authenticate(request(token=forge_hs(keys.hmac64))) is not None
    assert authenticate(request(token=sign(keys.rsa))) is not None


def test_issuer_registered_only_for_another_audience(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(OTHER_AUD, ISS, pem(keys.rsa.public_key()))
    authenticate = create_share_data_authenticate(authorities=auth)
    # Right aud claim, trusted issuer, but not for the SHAREDATA audience.
    assert authenticate(request(token=sign(keys.rsa))) is None
    # The other audience's authenticate accepts its own tokens only.
    other = create_share_data_authenticate(authorities=auth, audience=OTHER_AUD)
    ctx = other(request(token=sign(keys.rsa, aud=OTHER_AUD)))
    assert ctx is not None and ctx.audience == OTHER_AUD
    assert other(request(token=sign(keys.rsa))) is None


@pytest.mark.parametrize(
    ("token", "authorization", "headers"),
    [
        pytest.param(None, None, None, id="missing token"),
        pytest.param("", None, None, id="empty query token"),
        pytest.param(None, "Bearer", None, id="bearer without token"),
        pytest.param(None, "Bearer ", None, id="bearer with blank token"),
        pytest.param(None, "", None, id="empty authorization header"),
        pytest.param(None, "Basic YWxpY2U6c2VjcmV0", None, id="basic scheme"),
        pytest.param(None, "Bearer a.b.c extra", None, id="bearer with two tokens"),
    ],
)
def test_rejected_transport(
    authenticate: Any, token: str | None, authorization: str | None, headers: dict[str, str] | None
) -> None:
    assert authenticate(request(token=token, authorization=authorization)) is None


@pytest.mark.parametrize("authorization", ["", "Bearer ", "Basic Zm9vOmJhcg==", "Token {token}"])
def test_unusable_authorization_header_does_not_fall_back_to_query(
    keys: Keys, authenticate: Any, authorization: str
) -> None:
    token = sign(keys.rsa)
    assert authenticate(request(token=token)) is not None
    assert authenticate(request(token=token, authorization=authorization.format(token=token))) is None


def test_several_authorization_headers_rejected(keys: Keys, authenticate: Any) -> None:
    token = sign(keys.rsa)
    headers = CIMultiDict([("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")])
    assert authenticate(UpgradeRequest.from_target("/realtime", headers=headers)) is None


def test_broken_request_object_yields_none(authenticate: Any) -> None:
    assert authenticate(object()) is None
    assert authenticate(None) is None


def test_rejection_is_logged_at_debug_without_the_token(
    keys: Keys, authenticate: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="safe_fast.auth")
    expired = sign(keys.rsa, exp=int(time.time()) - 10)
    forged = sign(keys.rsa_other)
    assert authenticate(request(authorization=f"Bearer {expired}")) is None
    assert authenticate(request(token=forged)) is None
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "Expired" in caplog.text
    for token in (expired, forged):
        for segment in token.split("."):
            assert segment not in caplog.text


# --------------------------------------------------------------------------
# Expiry, leeway, exp requirement
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leeway", "claim", "offset", "accepted"),
    [
        (0.0, "exp", -5, False),
        (10.0, "exp", -5, True),
        (datetime.timedelta(seconds=10), "exp", -5, True),
        (2.0, "exp", -5, False),
        (0.0, "nbf", 5, False),
        (10.0, "nbf", 5, True),
        (0.0, "iat", 5, False),
        (10.0, "iat", 5, True),
    ],
)
def test_leeway(keys: Keys, authorities: AuthorizedAuthorities, leeway: Any, claim: str, offset: int, accepted: bool) -> None:
    authenticate = create_share_data_authenticate(authorities=authorities, leeway=leeway)
    token = sign(keys.rsa, **{claim: int(time.time()) + offset})
    assert (authenticate(request(token=token)) is not None) is accepted


@pytest.mark.parametrize("leeway", [-1.0, float("nan"), float("inf"), "5", True])
def test_invalid_leeway_refused(authorities: AuthorizedAuthorities, leeway: Any) -> None:
    with pytest.raises(ValueError):
        create_share_data_authenticate(authorities=authorities, leeway=leeway)


def test_authorities_type_checked() -> None:
    with pytest.raises(TypeError):
        create_share_data_authenticate(authorities={})  # type: ignore[arg-type]


def test_expires_at(keys: Keys, authenticate: Any) -> None:
    exp = int(time.time()) + 123
    ctx = authenticate(request(token=sign(keys.rsa, exp=exp)))
    assert ctx is not None
    assert isinstance(ctx.expires_at, float) and ctx.expires_at == float(exp)


def test_exp_optional_when_not_required(keys: Keys, authorities: AuthorizedAuthorities) -> None:
    authenticate = create_share_data_authenticate(authorities=authorities, require_exp=False)
    ctx = authenticate(request(token=sign(keys.rsa, exp=None)))
    assert ctx is not None and ctx.expires_at is None
    # exp is still verified when present.
    assert authenticate(request(token=sign(keys.rsa, exp=int(time.time()) - 10))) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"exp": 1700000000}, 1700000000.0),
        ({"exp": 1700000000.5}, 1700000000.5),
        ({}, None),
        ({"exp": "1700000000"}, None),
        ({"exp": True}, None),
    ],
)
def test_expires_at_on_constructed_context(payload: dict[str, Any], expected: float | None) -> None:
    assert ShareDataAuthContext(payload, AuthorizationAudience.SHAREDATA, ISS).expires_at == expected


def test_context_is_frozen_and_payload_read_only(keys: Keys, authenticate: Any) -> None:
    ctx = authenticate(request(token=sign(keys.rsa)))
    assert ctx is not None
    with pytest.raises(FrozenInstanceError):
        ctx.issuer = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.payload["sub"] = "mallory"  # type: ignore[index]
    assert dict(ctx.payload)["sub"] == "alice"


# --------------------------------------------------------------------------
# Key rotation and removal
# --------------------------------------------------------------------------


def test_key_rotation_by_kid(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, pem(keys.rsa.public_key()), kid="2024")
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.rsa_new.public_key(), kid="2025")
    authenticate = create_share_data_authenticate(authorities=auth)
    old = sign(keys.rsa, headers={"kid": "2024"})
    new = sign(keys.rsa_new, headers={"kid": "2025"})
    assert authenticate(request(token=old)) is not None
    assert authenticate(request(token=new)) is not None
    # kid selects the key: the old key's token claiming the new kid fails.
    assert authenticate(request(token=sign(keys.rsa, headers={"kid": "2025"}))) is None
    # Without kid, every key of the issuer is tried.
    assert authenticate(request(token=sign(keys.rsa))) is not None
    assert authenticate(request(token=sign(keys.rsa_new))) is not None

    assert auth.remove(AuthorizationAudience.SHAREDATA, ISS, kid="2024") == 1
    assert auth.kids(AuthorizationAudience.SHAREDATA, ISS) == ("2025",)
    # Same authenticate instance: removal is effective immediately.
    assert authenticate(request(token=old)) is None
    assert authenticate(request(token=sign(keys.rsa))) is None
    assert authenticate(request(token=new)) is not None


def test_kid_in_token_must_be_registered_even_with_kidless_keys(keys: Keys, authenticate: Any) -> None:
    # The fixture key has no kid: a token naming a kid cannot select it.
    assert authenticate(request(token=sign(keys.rsa, headers={"kid": "k1"}))) is None


def test_readding_a_kid_replaces_the_key(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.rsa.public_key(), kid="k")
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.rsa_new.public_key(), kid="k")
    authenticate = create_share_data_authenticate(authorities=auth)
    assert auth.kids(AuthorizationAudience.SHAREDATA, ISS) == ("k",)
    assert authenticate(request(token=sign(keys.rsa, headers={"kid": "k"}))) is None
    assert authenticate(request(token=sign(keys.rsa_new, headers={"kid": "k"}))) is not None


def test_remove_every_key_of_an_issuer(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.rsa.public_key(), kid="a")
    auth.add(AuthorizationAudience.SHAREDATA, ISS, keys.rsa_new.public_key())
    auth.add(AuthorizationAudience.SHAREDATA, OTHER_ISS, keys.rsa_other.public_key())
    authenticate = create_share_data_authenticate(authorities=auth)
    assert authenticate(request(token=sign(keys.rsa_new))) is not None
    assert auth.remove(AuthorizationAudience.SHAREDATA, ISS) == 2
    assert auth.kids(AuthorizationAudience.SHAREDATA, ISS) == ()
    assert authenticate(request(token=sign(keys.rsa_new))) is None
    assert authenticate(request(token=sign(keys.rsa, headers={"kid": "a"}))) is None
    # Other issuers untouched; removing again is a no-op.
    assert authenticate(request(token=sign(keys.rsa_other, iss=OTHER_ISS))) is not None
    assert auth.remove(AuthorizationAudience.SHAREDATA, ISS) == 0
    assert auth.remove(AuthorizationAudience.SHAREDATA, OTHER_ISS, kid="missing") == 0


def test_repr_does_not_leak_secrets(keys: Keys) -> None:
    auth = AuthorizedAuthorities()
    auth.add(AuthorizationAudience.SHAREDATA, ISS, b"topsecret" * 8, algorithms="HS256")
    assert "topsecret" not in repr(auth)
    assert "topsecret" not in repr(auth._lookup(AUD, ISS))


# --------------------------------------------------------------------------
# add() refusing key/algorithm mismatches
# --------------------------------------------------------------------------


def _ssh(k: Keys) -> bytes:
    return k.rsa.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _private_pem(k: Keys) -> bytes:
    return k.rsa.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


REFUSED_ADDS: dict[str, tuple[Callable[[Keys], Any], Any]] = {
    "RSA PEM str with HS256": (lambda k: pem(k.rsa.public_key()), ("HS256",)),
    "RSA PEM bytes with HS512": (lambda k: pem(k.rsa.public_key()).encode(), ("HS512",)),
    "EC PEM with HS256": (lambda k: pem(k.ec256.public_key()), "HS256"),
    "SSH public key with HS256": (_ssh, ("HS256",)),
    "RSA key object with HS256": (lambda k: k.rsa.public_key(), ("HS256",)),
    "PEM with RS256 and HS256 mixed": (lambda k: pem(k.rsa.public_key()), ("RS256", "HS256")),
    "secret with RS256 and HS256 mixed": (lambda k: k.hmac64, ("HS256", "RS256")),
    "alg none": (lambda k: k.hmac64, ("none",)),
    "alg NONE": (lambda k: pem(k.rsa.public_key()), ("NONE",)),
    "unknown algorithm": (lambda k: pem(k.rsa.public_key()), ("XS256",)),
    "lowercase rs256": (lambda k: pem(k.rsa.public_key()), ("rs256",)),
    "no algorithm": (lambda k: pem(k.rsa.public_key()), ()),
    "EC key with RS256": (lambda k: k.ec256.public_key(), ("RS256",)),
    "P-384 key with ES256": (lambda k: k.ec384.public_key(), ("ES256",)),
    "P-256 key with ES384": (lambda k: pem(k.ec256.public_key()), ("ES384",)),
    "RSA key with ES256": (lambda k: k.rsa.public_key(), ("ES256",)),
    "RSA key with EdDSA": (lambda k: k.rsa.public_key(), ("EdDSA",)),
    "Ed25519 key with RS256": (lambda k: k.ed25519.public_key(), ("RS256",)),
    "Ed448 key with ES256": (lambda k: pem(k.ed448.public_key()), ("ES256",)),
    "secret with RS256": (lambda k: k.hmac64, ("RS256",)),
    "HS256 secret too short": (lambda k: b"x" * 16, ("HS256",)),
    "HS512 secret of 48 bytes": (lambda k: b"x" * 48, ("HS512",)),
    "empty HS256 secret": (lambda k: b"", ("HS256",)),
    "RSA 1024 bits": (lambda k: k.rsa_small.public_key(), ("RS256",)),
    "private key object": (lambda k: k.rsa, ("RS256",)),
    "private key PEM": (_private_pem, ("RS256",)),
    "garbage PEM": (lambda k: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", ("RS256",)),
}


@pytest.mark.parametrize("case", list(REFUSED_ADDS), ids=list(REFUSED_ADDS))
def test_add_refuses_mismatched_key_and_algorithms(keys: Keys, case: str) -> None:
    make_key, algorithms = REFUSED_ADDS[case]
    auth = AuthorizedAuthorities()
    with pytest.raises(ValueError):
        auth.add(AuthorizationAudience.SHAREDATA, ISS, make_key(keys), algorithms=algorithms)
    assert auth.kids(AuthorizationAudience.SHAREDATA, ISS) == ()


@pytest.mark.parametrize(
    ("audience", "issuer", "kid"),
    [("", ISS, None), (AuthorizationAudience.SHAREDATA, "", None), (AuthorizationAudience.SHAREDATA, ISS, "")],
)
def test_add_refuses_empty_names(keys: Keys, audience: Any, issuer: str, kid: str | None) -> None:
    with pytest.raises(ValueError):
        AuthorizedAuthorities().add(audience, issuer, keys.rsa.public_key(), kid=kid)


def test_add_refuses_unsupported_key_types() -> None:
    with pytest.raises(TypeError):
        AuthorizedAuthorities().add(AuthorizationAudience.SHAREDATA, ISS, 12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Authorizer
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "allowed"),
    [
        (ShareDataAuthContext({"sub": "a"}, AuthorizationAudience.SHAREDATA, ISS), True),
        (ShareDataAuthContext({"sub": "a"}, "sharedata", ISS), True),
        (ShareDataAuthContext({"sub": "a"}, OTHER_AUD, ISS), False),
        ({"payload": {}, "audience": "sharedata", "issuer": ISS}, False),
        ("sharedata", False),
        (None, False),
        (True, False),
    ],
)
def test_share_data_audience_authorizer(context: Any, allowed: bool) -> None:
    assert share_data_audience_authorizer(context, "doc-1") is allowed


def test_authorizer_accepts_context_from_authenticate(keys: Keys, authenticate: Any) -> None:
    ctx = authenticate(request(token=sign(keys.rsa)))
    assert share_data_audience_authorizer(ctx, "doc-1") is True


def test_audience_enum_values() -> None:
    assert AuthorizationAudience.SHAREDATA == "sharedata"
    assert f"{AuthorizationAudience.SHAREDATA}" == "sharedata"
    assert AuthorizationAudience("sharedata") is AuthorizationAudience.SHAREDATA
