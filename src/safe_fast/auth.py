"""JWT authentication bridge for the realtime upgrade.

This module is the security boundary of a deployment: it decides, once per
connection, whether the HTTP upgrade carries a token signed by an issuer that
is trusted for an audience.

* :class:`AuthorizedAuthorities` is the trust registry:
  ``(audience, issuer) -> verification key(s)``, each key pinned to the
  algorithms it may verify.
* :func:`create_share_data_authenticate` builds the synchronous
  ``authenticate(request)`` hook; it returns a :class:`ShareDataAuthContext`
  or ``None`` (the server answers ``401``).
* :func:`share_data_audience_authorizer` admits SHAREDATA contexts only.

Security decisions (see ``docs/auth.md`` for the long version):

* The verification algorithms come from the registered key, never from the
  token header (RFC 8725 §2.1, §3.1). ``none`` is never accepted.
* A key's type must fit every algorithm it is registered for; in particular a
  PEM/SSH public key can never be used as an HMAC secret (the classic
  "HS256 signed with the RSA public key" confusion).
* ``exp`` is required by default (``require_exp=True``); ``exp``, ``nbf`` and
  ``iat`` are verified whenever present, with the configured ``leeway``.
* Header-embedded key material (``jwk``, ``jku``, ``x5u``, ``x5c``) is never
  fetched or trusted; only keys registered here verify tokens.
* Every failure returns ``None`` and is logged at DEBUG level with the reason;
  the token itself is never logged.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = [
    "AuthorizationAudience",
    "AuthorizedAuthorities",
    "ShareDataAuthContext",
    "create_share_data_authenticate",
    "share_data_audience_authorizer",
]

logger = logging.getLogger(__name__)


class AuthorizationAudience(str, Enum):
    """Token audiences (the JWT ``aud`` claim) the library knows about."""

    #: Access to ShareData documents over the realtime transport.
    SHAREDATA = "sharedata"

    def __str__(self) -> str:  # so f"{aud}" gives the wire value, not the member name
        return self.value


# --------------------------------------------------------------------------
# Algorithm families
# --------------------------------------------------------------------------

_HMAC_MIN_SECRET_BYTES: dict[str, int] = {
    # RFC 7518 §3.2: "A key of the same size as the hash output (for instance,
    # 256 bits for HS256) or larger MUST be used with this algorithm."
    "HS256": 32,
    "HS384": 48,
    "HS512": 64,
}
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# RFC 7518 §3.4 / RFC 8812: each ES* algorithm is bound to exactly one curve.
_EC_ALGORITHM_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES256K": ec.SECP256K1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
    "ES521": ec.SECP521R1,  # PyJWT alias of ES512
}
_OKP_ALGORITHMS = frozenset({"EdDSA"})
_SUPPORTED_ALGORITHMS = (
    frozenset(_HMAC_MIN_SECRET_BYTES) | _RSA_ALGORITHMS | frozenset(_EC_ALGORITHM_CURVES) | _OKP_ALGORITHMS
)
# RSA below 2048 bits is considered breakable (NIST SP 800-131A); refuse it.
_RSA_MIN_KEY_BITS = 2048

# Markers of asymmetric key material that must never be used as an HMAC secret.
_PUBLIC_KEY_MARKERS: tuple[bytes, ...] = (
    b"-----BEGIN",
    b"ssh-rsa",
    b"ssh-ed25519",
    b"ssh-ed448",
    b"ssh-dss",
    b"ecdsa-sha2-",
    b"sk-ssh-",
    b"sk-ecdsa-",
)
_SSH_PREFIXES: tuple[bytes, ...] = tuple(m for m in _PUBLIC_KEY_MARKERS if m != b"-----BEGIN")

_PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey]
_PrivateKeyTypes = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
KeyInput = Union[str, bytes, bytearray, memoryview, _PublicKey, x509.Certificate]


def _audience_value(audience: AuthorizationAudience | str) -> str:
    if isinstance(audience, AuthorizationAudience):
        return audience.value
    if isinstance(audience, str) and audience:
        return audience
    raise ValueError("audience must be an AuthorizationAudience or a non-empty string")


def _normalize_algorithms(algorithms: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    result: list[str] = []
    for alg in algorithms:
        if not isinstance(alg, str):
            raise TypeError(f"algorithm names must be strings, got {type(alg).__name__}")
        if alg.lower() == "none":
            # Unsecured JWS: anyone could mint a token. Never.
            raise ValueError("the 'none' algorithm is never accepted")
        if alg not in _SUPPORTED_ALGORITHMS:
            raise ValueError(f"unsupported JWT algorithm {alg!r} (supported: {sorted(_SUPPORTED_ALGORITHMS)})")
        if alg not in result:
            result.append(alg)
    if not result:
        raise ValueError("at least one algorithm is required")
    return tuple(result)


def _as_bytes(key: str | bytes | bytearray | memoryview) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _prepare_hmac_secret(key: Any, algorithms: tuple[str, ...]) -> bytes:
    if not isinstance(key, (str, bytes, bytearray, memoryview)):
        # A key object with HS* would make the verifier treat public material
        # as a shared secret.
        raise ValueError(f"HMAC algorithms {algorithms} need a secret (bytes or str), not {type(key).__name__}")
    secret = _as_bytes(key)
    if any(marker in secret for marker in _PUBLIC_KEY_MARKERS):
        # The algorithm-confusion attack: a public key is public, so anyone
        # could forge HS* tokens "signed" with it.
        raise ValueError("refusing to use PEM/SSH key material as an HMAC secret (algorithm confusion)")
    for alg in algorithms:
        minimum = _HMAC_MIN_SECRET_BYTES[alg]
        if len(secret) < minimum:
            raise ValueError(f"{alg} needs a secret of at least {minimum} bytes (RFC 7518 §3.2), got {len(secret)}")
    return secret


def _load_public_key(key: Any) -> _PublicKey:
    """Turn PEM/DER/SSH text, a certificate or a key object into a public key."""
    if isinstance(key, x509.Certificate):
        key = key.public_key()
    if isinstance(key, _PrivateKeyTypes):
        # The verifier must never hold signing material; registering a private
        # key is almost certainly a configuration mistake.
        raise ValueError("a private key was given; register the issuer's public key instead")
    if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key
    if not isinstance(key, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"unsupported key type {type(key).__name__}")
    data = _as_bytes(key).strip()
    if b"PRIVATE KEY-----" in data:
        raise ValueError("a private key was given; register the issuer's public key instead")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            loaded: Any = x509.load_pem_x509_certificate(data).public_key()
        elif data.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(data)
        elif data.startswith(_SSH_PREFIXES):
            loaded = serialization.load_ssh_public_key(data)
        else:
            loaded = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"could not parse the public key: {exc}") from None
    if not isinstance(loaded, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise ValueError(f"unsupported public key type {type(loaded).__name__}")
    return loaded


def _check_asymmetric(key: _PublicKey, algorithms: tuple[str, ...]) -> None:
    """Raise ValueError unless every algorithm fits the key's type (and curve/size)."""
    if isinstance(key, rsa.RSAPublicKey):
        bad = [a for a in algorithms if a not in _RSA_ALGORITHMS]
        if bad:
            raise ValueError(f"an RSA key can only verify RS*/PS* algorithms, not {bad}")
        if key.key_size < _RSA_MIN_KEY_BITS:
            raise ValueError(f"RSA keys must be at least {_RSA_MIN_KEY_BITS} bits, got {key.key_size}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        for alg in algorithms:
            curve = _EC_ALGORITHM_CURVES.get(alg)
            if curve is None:
                raise ValueError(f"an EC key can only verify ES* algorithms, not {alg!r}")
            if not isinstance(key.curve, curve):
                raise ValueError(f"{alg} requires curve {curve.name}, the key is on {key.curve.name}")
    else:  # Ed25519 / Ed448
        bad = [a for a in algorithms if a not in _OKP_ALGORITHMS]
        if bad:
            raise ValueError(f"an EdDSA key can only verify 'EdDSA', not {bad}")


@dataclass(frozen=True)
class _VerificationKey:
    kid: Optional[str]
    algorithms: tuple[str, ...]
    # repr=False: HMAC secrets must not leak through logs or tracebacks.
    key: Any = field(repr=False)


class AuthorizedAuthorities:
    """Registry of trusted token issuers: ``(audience, issuer) -> keys``.

    Each key is pinned to the algorithms it may verify. An issuer may have
    several keys (rotation); give each a ``kid`` matching the token header's
    ``kid``. Changes apply to the next ``authenticate`` call: already-open
    connections keep their context until their token expires.

    Mutations take a lock and publish a new immutable snapshot, so lookups
    (from the event loop or any thread) never see a half-applied change.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[_VerificationKey, ...]] = {}

    def add(
        self,
        audience: AuthorizationAudience | str,
        issuer: str,
        key: KeyInput,
        *,
        algorithms: str | Iterable[str] = ("RS256",),
        kid: str | None = None,
    ) -> None:
        """Trust ``key`` to verify ``algorithms`` for tokens of ``issuer`` for ``audience``.

        ``key`` is a PEM (or DER/OpenSSH) public key or certificate as str or
        bytes, a ``cryptography`` public-key object, or, for HS256/384/512, a
        shared secret (bytes or str). Raises ``ValueError`` when the key does
        not fit the algorithms (e.g. a PEM key with ``HS256``), for ``none``,
        for mixed HMAC/asymmetric algorithm lists, short HMAC secrets and RSA
        keys under 2048 bits. Adding a ``kid`` already registered for that
        issuer replaces that key.
        """
        aud = _audience_value(audience)
        if not isinstance(issuer, str) or not issuer:
            raise ValueError("issuer must be a non-empty string")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValueError("kid must be a non-empty string or None")
        algs = _normalize_algorithms(algorithms)
        hmac_algs = [a for a in algs if a in _HMAC_MIN_SECRET_BYTES]
        if hmac_algs and len(hmac_algs) != len(algs):
            # One key must never be interpreted both as a secret and as a
            # public key: that is exactly what algorithm confusion exploits.
            raise ValueError("do not mix HMAC (HS*) and asymmetric algorithms for one key")
        prepared: Any
        if hmac_algs:
            prepared = _prepare_hmac_secret(key, algs)
        else:
            prepared = _load_public_key(key)
            _check_asymmetric(prepared, algs)
        entry = _VerificationKey(kid=kid, algorithms=algs, key=prepared)
        with self._lock:
            current = self._entries.get((aud, issuer), ())
            if kid is not None:
                current = tuple(e for e in current if e.kid != kid)
            entries = dict(self._entries)
            entries[(aud, issuer)] = current + (entry,)
            self._entries = entries

    def remove(self, audience: AuthorizationAudience | str, issuer: str, kid: str | None = None) -> int:
        """Stop trusting ``issuer``'s key ``kid`` (every key when ``kid`` is None).

        Takes effect for the very next upgrade. Returns how many keys were
        removed (0 if none matched; removing is idempotent).
        """
        aud = _audience_value(audience)
        with self._lock:
            current = self._entries.get((aud, issuer), ())
            kept = () if kid is None else tuple(e for e in current if e.kid != kid)
            removed = len(current) - len(kept)
            if removed:
                entries = dict(self._entries)
                if kept:
                    entries[(aud, issuer)] = kept
                else:
                    del entries[(aud, issuer)]
                self._entries = entries
        return removed

    def kids(self, audience: AuthorizationAudience | str, issuer: str) -> tuple[str | None, ...]:
        """The ``kid`` of every key registered for ``(audience, issuer)``, in order."""
        return tuple(e.kid for e in self._lookup(_audience_value(audience), issuer))

    def _lookup(self, audience: str, issuer: str) -> tuple[_VerificationKey, ...]:
        # Single dict read of an immutable snapshot: no lock needed.
        return self._entries.get((audience, issuer), ())

    def __repr__(self) -> str:
        # Never print key material.
        snapshot = self._entries
        return f"<AuthorizedAuthorities {sum(len(v) for v in snapshot.values())} key(s), {len(snapshot)} issuer(s)>"


# --------------------------------------------------------------------------
# Context and hooks
# --------------------------------------------------------------------------


def _numeric_date(value: Any) -> float | None:
    # RFC 7519 NumericDate is a JSON number; bool is an int subclass, exclude it.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        as_float = float(value)
        if math.isfinite(as_float):
            return as_float
    return None


@dataclass(frozen=True)
class ShareDataAuthContext:
    """What a verified token grants: its claims, audience and issuer.

    ``payload`` is a read-only view of the verified claims (use
    ``dict(ctx.payload)`` for a mutable copy).
    """

    payload: Mapping[str, Any]
    audience: AuthorizationAudience | str
    issuer: str

    def __post_init__(self) -> None:
        # Frozen means frozen: downstream authorizers must not be able to
        # rewrite the claims another authorizer will read.
        if not isinstance(self.payload, MappingProxyType):
            object.__setattr__(self, "payload", MappingProxyType(dict(self.payload)))

    @property
    def expires_at(self) -> float | None:
        """The token's ``exp`` as epoch seconds, or None when it has none.

        The server closes the connection with 4002 at that moment.
        """
        return _numeric_date(self.payload.get("exp"))


_BEARER_RE = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr][ \t]+(\S+)[ \t]*$")
# JWS compact serialisation: three non-empty base64url segments. Rejects
# unsecured tokens (empty signature) and JWE (five segments) before parsing.
_JWS_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
# Far above any real access token, low enough that junk is cheap to refuse.
_MAX_TOKEN_LENGTH = 16 * 1024
# Header parameters whose semantics we do not implement; RFC 7515 §4.1.11
# says tokens marking extensions critical must then be rejected, and b64
# (RFC 7797) is not valid in a JWT.
_REJECTED_HEADER_PARAMS = ("crit", "b64")
_TIME_CLAIMS = ("exp", "nbf", "iat")
_JWT = jwt.PyJWT()


class _Rejected(Exception):
    """Internal: the upgrade is refused; the message says why (no secrets)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _extract_token(request: Any) -> str:
    headers = request.headers
    getall = getattr(headers, "getall", None)
    values = list(getall("authorization", ())) if callable(getall) else []
    if not values:
        value = headers.get("authorization")
        values = [] if value is None else [value]
    if len(values) > 1:
        raise _Rejected("several Authorization headers")
    if values:
        # A present Authorization header is authoritative: if it is not a
        # usable Bearer token we refuse instead of silently trying ?token=,
        # so a client never authenticates as someone other than it asked.
        match = _BEARER_RE.match(values[0] or "")
        if match is None:
            raise _Rejected("Authorization header is not 'Bearer <token>'")
        token = match.group(1)
    else:
        query = request.query or {}
        token = query.get("token")
        if not token:
            raise _Rejected("no token (neither Authorization header nor ?token=)")
    if not isinstance(token, str):
        raise _Rejected("token is not a string")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise _Rejected(f"token longer than {_MAX_TOKEN_LENGTH} characters")
    if _JWS_RE.match(token) is None:
        raise _Rejected("token is not a signed compact JWS")
    return token


def create_share_data_authenticate(
    authorities: AuthorizedAuthorities,
    audience: AuthorizationAudience | str = AuthorizationAudience.SHAREDATA,
    leeway: float | timedelta = 0.0,
    *,
    require_exp: bool = True,
) -> Callable[[Any], Optional[ShareDataAuthContext]]:
    """Build a synchronous ``authenticate(request)`` hook backed by ``authorities``.

    The token comes from ``Authorization: Bearer <token>``, else the ``token``
    query parameter. Its (unverified) ``iss`` selects the keys registered for
    ``audience``; the signature (with that key's algorithms only), ``aud``,
    ``iss``, ``exp``, ``nbf`` and ``iat`` are then verified, allowing
    ``leeway`` seconds of clock skew. ``require_exp`` (default True) refuses
    tokens without ``exp``. Returns a :class:`ShareDataAuthContext`, or
    ``None`` on any failure.
    """
    if not isinstance(authorities, AuthorizedAuthorities):
        raise TypeError("authorities must be an AuthorizedAuthorities")
    aud_value = _audience_value(audience)
    try:
        context_audience: AuthorizationAudience | str = AuthorizationAudience(aud_value)
    except ValueError:
        context_audience = aud_value
    if isinstance(leeway, timedelta):
        leeway = leeway.total_seconds()
    if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or not math.isfinite(leeway) or leeway < 0:
        raise ValueError("leeway must be a finite number of seconds >= 0")
    leeway_seconds = float(leeway)
    required = ["iss", "aud", "exp"] if require_exp else ["iss", "aud"]
    # Spelled out so a change of PyJWT defaults can never switch a check off.
    options: dict[str, Any] = {
        "verify_signature": True,
        "verify_exp": True,
        "verify_nbf": True,
        "verify_iat": True,
        "verify_aud": True,
        "verify_iss": True,
        "strict_aud": False,  # ``aud`` may be a list that contains our audience
        "require": required,
    }

    def verify(token: str) -> ShareDataAuthContext:
        try:
            # Unverified look at header and claims, only to pick the key.
            unverified = _JWT.decode_complete(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise _Rejected(f"malformed token ({type(exc).__name__}: {str(exc)[:120]})") from None
        header = unverified["header"]
        claims = unverified["payload"]
        for name in _REJECTED_HEADER_PARAMS:
            if name in header:
                raise _Rejected(f"unsupported header parameter {name!r}")
        alg = header.get("alg")
        kid = header.get("kid")
        issuer = claims.get("iss")
        if not isinstance(alg, str):
            raise _Rejected("header has no 'alg'")
        if not isinstance(issuer, str) or not issuer:
            raise _Rejected("token has no string 'iss'")
        candidates = authorities._lookup(aud_value, issuer)
        if not candidates:
            raise _Rejected(f"issuer {_short(issuer)} is not trusted for audience {aud_value!r}")
        if kid is not None:
            if not isinstance(kid, str):
                raise _Rejected("header 'kid' is not a string")
            # A kid names one key; an unknown kid is refused rather than
            # tried against other keys, so a removed key stays removed.
            candidates = tuple(e for e in candidates if e.kid == kid)
            if not candidates:
                raise _Rejected(f"kid {_short(kid)} is not registered for issuer {_short(issuer)}")
        candidates = tuple(e for e in candidates if alg in e.algorithms)
        if not candidates:
            raise _Rejected(f"algorithm {_short(alg)} is not allowed for issuer {_short(issuer)}")
        for entry in candidates:
            try:
                payload = _JWT.decode(
                    token,
                    entry.key,
                    # The key's own algorithms, never the header's choice.
                    algorithms=list(entry.algorithms),
                    audience=aud_value,
                    issuer=issuer,
                    leeway=leeway_seconds,
                    options=options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue  # maybe another key of this issuer (rotation without kid)
            except jwt.InvalidTokenError as exc:
                # Signature was good (PyJWT checks it first) but the claims
                # are not: no other key would change that.
                raise _Rejected(f"{type(exc).__name__}: {str(exc)[:120]}") from None
            for claim in _TIME_CLAIMS:
                if claim in payload and _numeric_date(payload[claim]) is None:
                    raise _Rejected(f"claim {claim!r} is not a finite number")
            return ShareDataAuthContext(payload=payload, audience=context_audience, issuer=issuer)
        raise _Rejected(f"signature not valid for any key of issuer {_short(issuer)}")

    def authenticate(request: Any) -> Optional[ShareDataAuthContext]:
        """Verify the upgrade's token; a context on success, None otherwise."""
        try:
            return verify(_extract_token(request))
        except _Rejected as exc:
            logger.debug("upgrade rejected: %s", exc)
        except Exception as exc:  # never let a bad token crash the upgrade path
            logger.debug("upgrade rejected: unexpected %s during token verification", type(exc).__name__)
        return None

    return authenticate


def share_data_audience_authorizer(context: Any, share_data_id: str) -> bool:
    """Subscribe authorizer: admit only contexts verified for the SHAREDATA audience."""
    return isinstance(context, ShareDataAuthContext) and context.audience == AuthorizationAudience.SHAREDATA
