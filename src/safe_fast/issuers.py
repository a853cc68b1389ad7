"""JWT issuers from settings: PEM key files, HMAC secrets from the environment, JWKS URLs.

Every key, wherever it comes from, ends up in one
:class:`~safe_fast.auth.AuthorizedAuthorities`, and tokens are verified by
:func:`~safe_fast.auth.create_share_data_authenticate` (the same algorithm
pinning and claim checks for all of them).

JWKS issuers
------------

A JWKS URL is fetched with PyJWT's own ``PyJWKClient`` (its cache holds the
set for ``lifespan`` seconds). The keys of the set are registered with their
``kid`` and the algorithm the JWK names (or implies), limited to the
issuer's ``algorithms`` when those are configured; symmetric (``oct``) keys
in a JWKS are ignored, a public document cannot hold a shared secret.

The fetch is blocking HTTP, so it never runs in the upgrade path itself:
a token whose issuer is a JWKS issuer and whose ``kid`` is not registered
makes ``authenticate`` return a coroutine instead of ``None`` (the server
then completes the upgrade and holds the connection's frames until it
resolves). The coroutine refreshes the set in a thread, registers new keys,
drops keys the set no longer lists, and verifies the token again. Refreshes
of one issuer are coalesced (one at a time) and happen at most once per
``jwks_min_refresh_interval`` seconds, so a stream of tokens with made-up
``kid`` values costs at most one fetch per interval. The set is also fetched
every ``jwks_refresh_interval`` seconds (default 300), so a key the issuer
withdraws stops verifying tokens even if no unknown ``kid`` ever shows up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .auth import AuthorizedAuthorities, create_share_data_authenticate
from .config import ConfigError, IssuerSettings

__all__ = ["JwksSource", "IssuerAuthenticator", "build_issuer_authenticate"]

logger = logging.getLogger("safe_fast.auth")

_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}


def _default_algorithms(key: Any) -> tuple[str, ...]:
    """The usual algorithm of a public key (RS256 for RSA, ES* by curve, EdDSA)."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (_CURVE_ALGORITHMS.get(key.curve.name, "ES256"),)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class JwksSource:
    """The keys of one JWKS URL, kept in ``authorities`` under ``(audience, issuer)``."""

    def __init__(
        self,
        authorities: AuthorizedAuthorities,
        audience: str,
        settings: IssuerSettings,
        *,
        fetch_timeout: float = 10.0,
    ) -> None:
        assert settings.jwks_url is not None
        self.authorities = authorities
        self.audience = audience
        self.issuer = settings.issuer
        self.algorithms = settings.algorithms
        self.min_refresh_interval = settings.jwks_min_refresh_interval
        self.refresh_interval = settings.jwks_refresh_interval
        self.client = jwt.PyJWKClient(settings.jwks_url, cache_jwk_set=True, lifespan=300, timeout=fetch_timeout)
        self._refreshing: Optional[asyncio.Future[None]] = None
        self._last_refresh = -float("inf")
        self.last_error: Optional[BaseException] = None

    def knows(self, kid: Optional[str]) -> bool:
        return kid in self.authorities.kids(self.audience, self.issuer)

    async def refresh(self, *, force: bool = False) -> None:
        """Fetch the set again (in a thread) and register what it holds; never raises."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        if not force and time.monotonic() - self._last_refresh < self.min_refresh_interval:
            return
        self._last_refresh = time.monotonic()
        self._refreshing = asyncio.ensure_future(asyncio.to_thread(self._refresh_blocking))
        try:
            await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    async def refresh_periodically(self) -> None:
        """Fetch the set every ``refresh_interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self.refresh(force=True)

    def _refresh_blocking(self) -> None:
        try:
            keys = self.client.get_signing_keys(refresh=True)
        except Exception as exc:
            self.last_error = exc
            logger.warning("JWKS of issuer %s: fetch failed: %s", self.issuer, exc)
            return
        self.last_error = None
        listed: set[str] = set()
        for key in keys:
            kid = key.key_id
            algorithm = key.algorithm_name
            if kid is None or key.key_type == "oct":
                continue
            if self.algorithms and algorithm not in self.algorithms:
                continue
            try:
                self.authorities.add(self.audience, self.issuer, key.key, algorithms=(algorithm,), kid=kid)
            except (ValueError, TypeError) as exc:
                logger.warning("JWKS of issuer %s: key %r refused: %s", self.issuer, kid, exc)
                continue
            listed.add(kid)
        for kid in self.authorities.kids(self.audience, self.issuer):
            if kid not in listed:
                self.authorities.remove(self.audience, self.issuer, kid)
                logger.info("JWKS of issuer %s: key %r is no longer listed, removed", self.issuer, kid)


class IssuerAuthenticator:
    """An ``authenticate`` hook over the configured issuers, refreshing JWKS keys on an unknown ``kid``."""

    def __init__(
        self,
        authorities: AuthorizedAuthorities,
        audience: str,
        sources: dict[str, JwksSource],
        verify: Callable[[Any], Any],
    ) -> None:
        self.authorities = authorities
        self.audience = audience
        self.sources = sources
        self._verify = verify

    def __call__(self, request: Any) -> Any:
        context = self._verify(request)
        if context is not None or not self.sources:
            return context
        source = self._source_to_refresh(request)
        if source is None:
            return None
        return self._verify_after_refresh(source, request)

    def _source_to_refresh(self, request: Any) -> Optional[JwksSource]:
        token = _token_of(request)
        if token is None:
            return None
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return None
        source = self.sources.get(claims.get("iss")) if isinstance(claims.get("iss"), str) else None
        kid = header.get("kid")
        if source is None or not isinstance(kid, str) or source.knows(kid):
            return None
        return source

    async def _verify_after_refresh(self, source: JwksSource, request: Any) -> Any:
        await source.refresh()
        return self._verify(request)

    async def refresh_all(self) -> None:
        """Fetch every JWKS now (at start-up); failures are logged, and retried on the first token."""
        await asyncio.gather(*(source.refresh(force=True) for source in self.sources.values()))

    def start_periodic_refresh(self) -> list["asyncio.Task[None]"]:
        """One task per JWKS issuer refreshing its keys; the caller cancels them."""
        return [asyncio.ensure_future(source.refresh_periodically()) for source in self.sources.values()]


def _token_of(request: Any) -> Optional[str]:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    token = (request.query or {}).get("token")
    return token if isinstance(token, str) else None


def build_issuer_authenticate(
    issuers: Sequence[IssuerSettings],
    *,
    audience: str,
    leeway: float,
    require_exp: bool,
    environ: Optional[dict[str, str]] = None,
) -> IssuerAuthenticator:
    """The ``authenticate`` hook for ``issuers``; raises ConfigError naming the bad issuer entry."""
    env = os.environ if environ is None else environ
    authorities = AuthorizedAuthorities()
    sources: dict[str, JwksSource] = {}
    for index, entry in enumerate(issuers):
        key = f"jwt_issuers[{index}]"
        if entry.jwks_url is not None:
            if entry.issuer in sources:
                raise ConfigError(key, f"issuer {entry.issuer} has a second JWKS URL")
            sources[entry.issuer] = JwksSource(authorities, audience, entry)
            continue
        if entry.public_key_file is not None:
            try:
                with open(entry.public_key_file, "rb") as file:
                    material: Any = file.read()
            except OSError as exc:
                raise ConfigError(
                    f"{key}.public_key_file", f"cannot read {entry.public_key_file}: {exc.strerror or exc}"
                ) from None
            algorithms = entry.algorithms
            if not algorithms:
                try:
                    algorithms = _default_algorithms(serialization.load_pem_public_key(material))
                except ValueError as exc:
                    raise ConfigError(f"{key}.public_key_file", f"not a PEM public key: {exc}") from None
            where = f"{key}.public_key_file"
        else:
            name = entry.hmac_secret_env or ""
            material = env.get(name)
            if not material:
                raise ConfigError(f"{key}.hmac_secret_env", f"environment variable {name} is not set")
            algorithms = entry.algorithms or ("HS256",)
            where = f"{key}.hmac_secret_env"
        try:
            authorities.add(audience, entry.issuer, material, algorithms=algorithms, kid=entry.kid)
        except (ValueError, TypeError) as exc:
            raise ConfigError(where, str(exc)) from None
    verify = create_share_data_authenticate(authorities, audience, leeway, require_exp=require_exp)
    return IssuerAuthenticator(authorities, audience, sources, verify)
