"""Access token verification for every service: signature (JWKS from the auth service), claims, revocation.

Envoy checks signature, issuer, audience and expiry at the edge; the services check again (they may be called
directly on the mesh) and add what Envoy cannot: the token type and the revocation list.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from services.core.context import Caller
from services.core.errors import Reason, ServiceError
from services.core.redis_store import StoreUnavailable
from services.core.revocation import RevocationList

log = logging.getLogger(__name__)

# Only asymmetric algorithms: a token can never be verified with a shared secret or with "none".
ALLOWED_ALGORITHMS = ("EdDSA", "ES256")
ACCESS = "access"
REFRESH = "refresh"
REFRESH_AUDIENCE_SUFFIX = ":refresh"  # refresh tokens carry another audience, so Envoy refuses them as access tokens

JwksFetcher = Callable[[], Awaitable[list[dict[str, Any]]]]
OutageHook = Callable[[], Awaitable[None]]


class KeySet:
    """Public keys by kid, fetched from the auth service and refreshed when an unknown kid shows up."""

    REFRESH_SECONDS = 300.0
    MIN_REFETCH_SECONDS = 2.0

    def __init__(self, fetch: JwksFetcher) -> None:
        self._fetch = fetch
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < self.MIN_REFETCH_SECONDS:
                return
            try:
                jwks = await self._fetch()
            except Exception as exc:
                log.warning("jwks fetch failed", extra={"error": repr(exc)})
                if not self._keys:
                    raise ServiceError(Reason.BACKEND_UNAVAILABLE, "cannot fetch token signing keys") from None
                return
            self._keys = {k["kid"]: jwt.PyJWK(k) for k in jwks if k.get("alg") in ALLOWED_ALGORITHMS}
            self._fetched_at = time.monotonic()

    async def get(self, kid: str) -> jwt.PyJWK:
        """The key for `kid`; TOKEN_INVALID when the auth service does not know it."""
        if kid not in self._keys or time.monotonic() - self._fetched_at > self.REFRESH_SECONDS:
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise ServiceError(Reason.TOKEN_INVALID, "token signed by an unknown key")
        return key


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def decode_token(
    token: str, key_for: Callable[[str], jwt.PyJWK], *, issuer: str, audience: str, token_type: str, leeway: int
) -> dict[str, Any]:
    """Verify signature and claims; return the claims. Raises ServiceError with a precise reason."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise ServiceError(Reason.TOKEN_INVALID, "malformed token") from None
    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise ServiceError(Reason.TOKEN_INVALID, "token algorithm not allowed")
    key = key_for(str(header.get("kid", "")))
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=list(ALLOWED_ALGORITHMS),
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise ServiceError(Reason.TOKEN_EXPIRED, "token expired") from None
    except jwt.InvalidAudienceError:
        raise ServiceError(
            Reason.TOKEN_INVALID, f"not {_article(token_type)} {token_type} token for this system"
        ) from None
    except jwt.InvalidIssuerError:
        raise ServiceError(Reason.TOKEN_INVALID, "token from another issuer") from None
    except jwt.InvalidTokenError as exc:
        raise ServiceError(Reason.TOKEN_INVALID, f"invalid token ({type(exc).__name__})") from None
    if claims.get("typ") != token_type:
        raise ServiceError(Reason.TOKEN_INVALID, f"not {_article(token_type)} {token_type} token")
    return claims


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims were checked: what revocation needs, and until when it is valid."""

    caller: Caller
    issued_at: float
    valid_until: float  # exp + leeway, epoch seconds


class VerifiedTokens:
    """A bounded memory of tokens whose signature and claims were checked, keyed by the token's digest (the token
    itself is never kept), each until it expires. Skips the signature check (an Ed25519 verify and the JSON
    decoding, an eighth of a read's CPU) for the token a client sends on every call; revocation is still checked
    on every call. Full: the oldest entry goes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[bytes, _Verified] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> _Verified | None:
        entry = self._entries.get(digest)
        if entry is not None and now >= entry.valid_until:
            del self._entries[digest]
            return None
        return entry

    def put(self, digest: bytes, entry: _Verified) -> None:
        if self.size <= 0:
            return
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = entry


class JwtVerifier:
    """The TokenVerifier every server's call interceptor uses."""

    OUTAGE_AUDIT_SECONDS = 60.0

    def __init__(
        self,
        keys: KeySet,
        revocations: RevocationList,
        *,
        issuer: str,
        audience: str,
        leeway: int,
        fail_closed: bool,
        on_outage: OutageHook | None = None,
        cache_size: int = 0,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._fail_closed = fail_closed
        self._on_outage = on_outage
        self._last_outage_report = -self.OUTAGE_AUDIT_SECONDS
        self.verified = VerifiedTokens(cache_size)

    async def verify(self, token: str) -> Caller:
        """The caller of a valid, unrevoked access token; ServiceError (UNAUTHENTICATED) otherwise."""
        digest = hashlib.sha256(token.encode()).digest()
        entry = self.verified.get(digest, time.time())
        if entry is None:
            entry = await self._check_signature(token)
            self.verified.put(digest, entry)
        caller = entry.caller
        await self._check_revocation(caller.token_id, caller.family_id, caller.user_id, entry.issued_at)
        return caller

    async def _check_signature(self, token: str) -> _Verified:
        try:
            kid = str(jwt.get_unverified_header(token).get("kid", ""))
        except jwt.InvalidTokenError:
            raise ServiceError(Reason.TOKEN_INVALID, "malformed token") from None
        key = await self._keys.get(kid)
        claims = decode_token(
            token,
            lambda _kid: key,
            issuer=self._issuer,
            audience=self._audience,
            token_type=ACCESS,
            leeway=self._leeway,
        )
        caller = Caller(
            user_id=claims["sub"],
            role=str(claims.get("role", "")),
            token_id=claims["jti"],
            family_id=str(claims.get("fam", "")),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )
        return _Verified(caller, float(claims["iat"]), float(claims["exp"]) + self._leeway)

    async def _check_revocation(self, jti: str, family_id: str, user_id: str, issued_at: float) -> None:
        try:
            revoked = await self._revocations.is_revoked(jti, family_id, user_id, issued_at)
        except StoreUnavailable:
            if self._fail_closed:
                raise ServiceError(
                    Reason.BACKEND_UNAVAILABLE, "revocation list unavailable", retry_after_seconds=1.0
                ) from None
            await self._report_outage()
            return
        if revoked:
            raise ServiceError(Reason.TOKEN_REVOKED, "token revoked")

    async def _report_outage(self) -> None:
        # Fail-open is a security event: logged every time, audited once a minute per process.
        log.warning("revocation list unavailable; token accepted (fail-open)")
        now = time.monotonic()
        if self._on_outage is not None and now - self._last_outage_report >= self.OUTAGE_AUDIT_SECONDS:
            self._last_outage_report = now
            await self._on_outage()
