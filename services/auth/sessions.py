"""Login sessions: token pairs, refresh rotation with reuse detection, logout and revoke-all.

A session is a refresh token family. Every refresh retires the presented refresh token and issues the next pair of
the family; presenting a retired refresh token means it was copied, so the whole family is revoked (ASVS 10.4.5).
The database is the record of sessions; the revocation list (Redis) makes revocations of access tokens visible to
every service at once.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt

from services.auth.keys import SigningKeyRing
from services.auth.store import AuthStore, TokenFamilyRow, UserRow
from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.db import utcnow
from services.core.errors import Reason, ServiceError
from services.core.redis_store import StoreUnavailable
from services.core.revocation import RevocationList
from services.core.tokens import ACCESS, REFRESH, REFRESH_AUDIENCE_SUFFIX, decode_token

log = logging.getLogger(__name__)


def epoch_ms(moment: datetime) -> float:
    """Epoch seconds truncated to milliseconds: token `iat` and revocation cut-offs use the same clock."""
    return math.floor(moment.timestamp() * 1000) / 1000


@dataclass(frozen=True)
class TokenPair:
    """What Login and RefreshToken return."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int


@dataclass(frozen=True)
class TokenPolicy:
    """Issuer, audience and lifetimes."""

    issuer: str
    audience: str
    access_ttl: timedelta
    refresh_ttl: timedelta
    session_max: timedelta
    leeway_seconds: int


class Sessions:
    """Issues, rotates and revokes tokens."""

    def __init__(
        self,
        store: AuthStore,
        keys: SigningKeyRing,
        revocations: RevocationList,
        audit: AuditClient,
        policy: TokenPolicy,
    ) -> None:
        self._store = store
        self._keys = keys
        self._revocations = revocations
        self._audit = audit
        self._policy = policy

    @property
    def _revocation_ttl(self) -> float:
        # Revocation list entries only need to outlive the access tokens they stop; refresh tokens are checked
        # against the database.
        return self._policy.access_ttl.total_seconds() + self._policy.leeway_seconds

    async def start(self, user: UserRow) -> TokenPair:
        """A new session (login): a new family and its first pair."""
        family = await self._store.create_family(user.id, utcnow() + self._policy.session_max)
        return await self._issue(user, family)

    async def _issue(self, user: UserRow, family: TokenFamilyRow) -> TokenPair:
        now = utcnow()
        # iat keeps milliseconds so a revoke-all cut-off and a login in the same second stay ordered.
        iat = epoch_ms(now)
        access_exp = now + self._policy.access_ttl
        refresh_exp = min(now + self._policy.refresh_ttl, family.expires_at)
        common = {"iss": self._policy.issuer, "sub": user.id, "iat": iat, "fam": family.id}
        access = self._keys.sign(
            {
                **common,
                "aud": self._policy.audience,
                "jti": str(uuid.uuid4()),
                "exp": int(access_exp.timestamp()),
                "role": user.role,
                "typ": ACCESS,
            },
            ACCESS,
        )
        refresh_jti = str(uuid.uuid4())
        refresh = self._keys.sign(
            {
                **common,
                "aud": self._policy.audience + REFRESH_AUDIENCE_SUFFIX,
                "jti": refresh_jti,
                "exp": int(refresh_exp.timestamp()),
                "typ": REFRESH,
            },
            REFRESH,
        )
        await self._store.add_refresh_token(refresh_jti, family.id, now, refresh_exp)
        return TokenPair(
            access,
            refresh,
            int(self._policy.access_ttl.total_seconds()),
            max(0, int((refresh_exp - now).total_seconds())),
        )

    def _decode_refresh(self, token: str) -> dict[str, Any]:
        def key_for(kid: str) -> jwt.PyJWK:
            key = self._keys.public_key(kid)
            if key is None:
                raise ServiceError(Reason.TOKEN_INVALID, "token signed by an unknown key")
            return key

        return decode_token(
            token,
            key_for,
            issuer=self._policy.issuer,
            audience=self._policy.audience + REFRESH_AUDIENCE_SUFFIX,
            token_type=REFRESH,
            leeway=self._policy.leeway_seconds,
        )

    async def rotate(self, refresh_token: str) -> tuple[TokenPair, UserRow]:
        """The next pair of the presented refresh token's family; revokes the family on reuse."""
        claims = self._decode_refresh(refresh_token)
        found = await self._store.refresh_token(claims["jti"])
        if found is None:
            raise ServiceError(Reason.TOKEN_INVALID, "unknown refresh token")
        row, family = found
        if family.revoked_at is not None:
            raise ServiceError(Reason.TOKEN_REVOKED, "session revoked")
        if family.expires_at <= utcnow():
            raise ServiceError(Reason.TOKEN_EXPIRED, "session expired; sign in again")
        user = await self._store.user_by_id(claims["sub"])
        if user is None or not user.active:
            raise ServiceError(Reason.TOKEN_REVOKED, "account disabled")
        if user.tokens_valid_after is not None and claims["iat"] < epoch_ms(user.tokens_valid_after):
            raise ServiceError(Reason.TOKEN_REVOKED, "session revoked")
        if row.used_at is not None or not await self._store.mark_refresh_used(row.jti):
            await self.revoke_family(family.id, user.id, "refresh_reuse")
            await self._audit.record(
                "auth.refresh.reuse_detected",
                success=False,
                failure_reason=Reason.TOKEN_REVOKED,
                actor_id=user.id,
                actor_role=user.role,
                resource_type="session",
                resource_id=family.id,
            )
            raise ServiceError(Reason.TOKEN_REVOKED, "refresh token reused; the session is revoked")
        return await self._issue(user, family), user

    async def revoke_family(self, family_id: str, user_id: str, reason: str) -> None:
        """End one session in the database and in the revocation list."""
        family = await self._store.revoke_family(family_id, reason)
        if family is not None and family.user_id == user_id:
            await self._revoke(self._revocations.revoke_family(family_id, self._revocation_ttl))

    async def end(self, caller: Caller, refresh_token: str) -> None:
        """Logout: revoke the caller's access token and its session (and the presented refresh token's)."""
        remaining = (caller.expires_at - utcnow()).total_seconds() if caller.expires_at else self._revocation_ttl
        await self._revoke(self._revocations.revoke_token(caller.token_id, remaining + self._policy.leeway_seconds))
        families = {caller.family_id} if caller.family_id else set()
        if refresh_token:
            claims = self._decode_refresh(refresh_token)
            if claims["sub"] != caller.user_id:
                raise ServiceError(Reason.PERMISSION_DENIED, "refresh token belongs to another account")
            families.add(str(claims.get("fam", "")))
        for family_id in families - {""}:
            await self.revoke_family(family_id, caller.user_id, "logout")

    async def revoke_all(self, user_id: str, reason: str) -> datetime:
        """Revoke every token issued to `user_id` before now; returns the cut-off."""
        cutoff = utcnow()
        await self._store.update_user(user_id, tokens_valid_after=cutoff)
        await self._store.revoke_user_families(user_id, reason)
        await self._revoke(self._revocations.revoke_user_before(user_id, epoch_ms(cutoff), self._revocation_ttl))
        return cutoff

    async def _revoke(self, write: Awaitable[None]) -> None:
        # The database already holds the revocation; a Redis outage only delays it for access tokens, which is
        # logged and audited (fail-open), never an error for the user who is logging out.
        try:
            await write
        except StoreUnavailable:
            log.warning("revocation list unavailable; revocation recorded in the database only")
            await self._audit.record(
                "auth.revocation.unavailable", success=False, failure_reason=Reason.BACKEND_UNAVAILABLE
            )
