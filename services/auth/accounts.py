"""Accounts: registration, login, password changes and administration, with rate limits and audit events."""

from __future__ import annotations

import contextlib
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from services.auth.passwords import BLOCKING, PasswordHashing, Strength, check_strength
from services.auth.sessions import Sessions, TokenPair
from services.auth.store import AuthStore, EmailTaken, UserPage, UserRow
from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.db import utcnow
from services.core.errors import FieldViolation, Reason, ServiceError, invalid, not_found
from services.core.limits import AUTH
from services.core.ratelimit import Limit, RateLimiter
from services.core.redis_store import StoreUnavailable

ROLES = ("user", "viewer", "admin")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")


def normalise_email(email: str, field: str = "email") -> str:
    """Trimmed and lower-cased; INVALID_ARGUMENT when it is not an address."""
    email = unicodedata.normalize("NFKC", email.strip()).lower()
    if not email:
        raise invalid(field, "required")
    if len(email) > AUTH.email_chars or not _EMAIL.match(email):
        raise invalid(field, "not a valid email address")
    return email


def clean_name(name: str) -> str:
    """A display name without control characters; at most AUTH.full_name_chars."""
    name = "".join(ch for ch in unicodedata.normalize("NFKC", name) if unicodedata.category(ch)[0] != "C").strip()
    if len(name) > AUTH.full_name_chars:
        raise invalid("full_name", f"at most {AUTH.full_name_chars} characters")
    return name


def require_password(password: str, field: str) -> None:
    """Refuse empty and oversized passwords before anything expensive happens."""
    if not password:
        raise invalid(field, "required")
    if len(password) > AUTH.password_max_chars:
        raise invalid(field, f"at most {AUTH.password_max_chars} characters", "TOO_LONG")


def weak_password(field: str, strength: Strength) -> ServiceError:
    """WEAK_PASSWORD with one BadRequest violation per problem; the message names what refused it (a score that
    is high enough does not help a password that contains the email)."""
    blocking = [p.description for p in strength.problems if p.code in BLOCKING]
    low = strength.score < strength.min_score
    reasons = [*blocking, *([f"too weak (score {strength.score}, need {strength.min_score})"] if low else [])]
    return ServiceError(
        Reason.WEAK_PASSWORD,
        "password refused: " + "; ".join(reasons),
        violations=[FieldViolation(field, p.description, p.code) for p in strength.problems]
        or [FieldViolation(field, f"score {strength.score} is below {strength.min_score}", "LOW_SCORE")],
        metadata={"score": str(strength.score)},
    )


def _failure_keys(email: str, client_ip: str) -> tuple[str, str]:
    """The rate-limit keys of an account's failures: overall, and from one address (never the email in clear)."""
    account = hashlib.sha256(email.encode()).hexdigest()
    return account, f"{account}:{client_ip}"


@dataclass(frozen=True)
class Limits:
    """The auth service's rate limits.

    Wrong passwords are counted per account and client address (`source_failures`: a guesser is stopped without
    locking the owner out from anywhere else) and per account over every address (`account_failures`, high: a
    distributed guesser is stopped too, after at most NIST's 100). A success resets both.
    """

    register: Limit
    login: Limit
    refresh: Limit
    source_failures: Limit
    account_failures: Limit


class Accounts:
    """The auth service's use cases."""

    def __init__(
        self,
        store: AuthStore,
        hashing: PasswordHashing,
        sessions: Sessions,
        limiter: RateLimiter,
        limits: Limits,
        audit: AuditClient,
        *,
        min_score: int,
        fail_closed: bool,
    ) -> None:
        self._store = store
        self._hashing = hashing
        self.sessions = sessions
        self._limiter = limiter
        self._limits = limits
        self._audit = audit
        self._min_score = min_score
        self._fail_closed = fail_closed

    async def _within_limit(self, limit: Limit, key: str, *, count: bool = True) -> bool:
        """Raise RATE_LIMITED past the limit. Returns False when the limiter is down and the call is let through
        (fail-open), so the caller can say so in its audit event."""
        try:
            decision = await (self._limiter.hit(limit, key) if count else self._limiter.check(limit, key))
        except StoreUnavailable:
            if self._fail_closed:
                raise ServiceError(
                    Reason.BACKEND_UNAVAILABLE, "rate limiter unavailable; try again", retry_after_seconds=1.0
                ) from None
            return False
        if not decision.allowed:
            raise ServiceError(
                Reason.RATE_LIMITED,
                f"too many requests ({limit.name}); retry in {decision.retry_after:.0f}s",
                retry_after_seconds=decision.retry_after,
                metadata={"limit": limit.name},
            )
        return True

    def _strength(self, password: str, email: str) -> Strength:
        return check_strength(password, email, self._min_score)

    async def register(self, email: str, password: str, full_name: str, client_ip: str) -> UserRow:
        """Create a USER account."""
        email = normalise_email(email)
        name = clean_name(full_name)
        require_password(password, "password")
        await self._within_limit(self._limits.register, client_ip)
        strength = self._strength(password, email)
        if not strength.acceptable:
            raise weak_password("password", strength)
        try:
            user = await self._store.create_user(email, name, await self._hashing.hash(password))
        except EmailTaken:
            await self._audit.record("auth.register", success=False, failure_reason=Reason.EMAIL_TAKEN)
            raise ServiceError(Reason.EMAIL_TAKEN, "an account with this email exists") from None
        await self._audit.record(
            "auth.register", actor_id=user.id, actor_role=user.role, resource_type="user", resource_id=user.id
        )
        return user

    async def login(self, email: str, password: str, client_ip: str) -> tuple[TokenPair, UserRow]:
        """Check the credentials and start a session. Unknown email and wrong password look the same."""
        email = normalise_email(email)
        require_password(password, "password")
        account, source = _failure_keys(email, client_ip)
        limited = await self._within_limit(self._limits.login, client_ip)
        limited &= await self._within_failure_limits(account, source)
        degraded = {} if limited else {"rate_limit": "unavailable"}
        user = await self._store.user_by_email(email)
        if not await self._hashing.verify(user.password_hash if user else None, password):
            await self._count_failure(account, source)
            await self._audit.record(
                "auth.login.failure",
                success=False,
                failure_reason=Reason.INVALID_CREDENTIALS,
                actor_id=user.id if user else "",
                metadata={"cause": "wrong_password" if user else "unknown_email", **degraded},
            )
            raise ServiceError(Reason.INVALID_CREDENTIALS, "wrong email or password")
        assert user is not None
        if not user.active:
            await self._audit.record(
                "auth.login.failure", success=False, failure_reason=Reason.ACCOUNT_DISABLED, actor_id=user.id
            )
            raise ServiceError(Reason.ACCOUNT_DISABLED, "this account is disabled")
        if self._hashing.needs_rehash(user.password_hash):
            await self._store.update_user(user.id, password_hash=await self._hashing.hash(password))
        await self._forget_failures(account, source)
        pair = await self.sessions.start(user)
        await self._audit.record(
            "auth.login.success", actor_id=user.id, actor_role=user.role, resource_type="user", resource_id=user.id,
            metadata=degraded,
        )  # fmt: skip
        return pair, user

    async def _within_failure_limits(self, account: str, source: str) -> bool:
        within = await self._within_limit(self._limits.source_failures, source, count=False)
        return await self._within_limit(self._limits.account_failures, account, count=False) and within

    async def _count_failure(self, account: str, source: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # an outage was already handled by the check before
            await self._limiter.hit(self._limits.source_failures, source)
            await self._limiter.hit(self._limits.account_failures, account)

    async def _forget_failures(self, account: str, source: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._limiter.reset(self._limits.source_failures, source)
            await self._limiter.reset(self._limits.account_failures, account)

    async def refresh(self, refresh_token: str, client_ip: str) -> TokenPair:
        """Rotate a refresh token."""
        if not refresh_token:
            raise invalid("refresh_token", "required")
        await self._within_limit(self._limits.refresh, client_ip)
        try:
            pair, user = await self.sessions.rotate(refresh_token)
        except ServiceError as exc:
            await self._audit.record("auth.refresh", success=False, failure_reason=exc.reason)
            raise
        await self._audit.record("auth.refresh", actor_id=user.id, actor_role=user.role)
        return pair

    async def logout(self, caller: Caller, refresh_token: str) -> None:
        """End the caller's session."""
        await self.sessions.end(caller, refresh_token)
        await self._audit.record("auth.logout", resource_type="session", resource_id=caller.family_id)

    async def revoke_all(self, caller: Caller) -> datetime:
        """End every session of the caller."""
        cutoff = await self.sessions.revoke_all(caller.user_id, "revoke_all")
        await self._audit.record("auth.sessions.revoke_all", resource_type="user", resource_id=caller.user_id)
        return cutoff

    async def current_user(self, caller: Caller) -> UserRow:
        """The caller's account."""
        user = await self._store.user_by_id(caller.user_id)
        if user is None:
            raise not_found("user", caller.user_id)
        return user

    async def change_password(self, caller: Caller, current: str, new: str, client_ip: str) -> datetime:
        """Replace the caller's password after checking the current one; revokes every earlier token."""
        require_password(current, "current_password")
        require_password(new, "new_password")
        user = await self.current_user(caller)
        account, source = _failure_keys(user.email, client_ip)
        await self._within_failure_limits(account, source)
        if not await self._hashing.verify(user.password_hash, current):
            await self._count_failure(account, source)
            await self._audit.record("auth.password.change", success=False, failure_reason=Reason.INVALID_CREDENTIALS)
            raise ServiceError(Reason.INVALID_CREDENTIALS, "current password is wrong")
        await self._forget_failures(account, source)
        if new == current:
            raise invalid("new_password", "must differ from the current password", "UNCHANGED")
        strength = self._strength(new, user.email)
        if not strength.acceptable:
            raise weak_password("new_password", strength)
        await self._store.update_user(
            user.id, password_hash=await self._hashing.hash(new), password_changed_at=utcnow()
        )
        cutoff = await self.sessions.revoke_all(user.id, "password_change")
        await self._audit.record("auth.password.change", resource_type="user", resource_id=user.id)
        return cutoff

    def password_strength(self, password: str, email: str) -> Strength:
        """The policy's verdict on a candidate password (public; stores nothing)."""
        if not password:
            raise invalid("password", "required")
        return self._strength(password, email.strip().lower())

    async def list_users(
        self, limit: int, after: tuple[datetime, str] | None, role: str | None, active: bool | None
    ) -> UserPage:
        """Accounts, oldest first (admins and viewers; checked by the caller)."""
        return await self._store.list_users(limit, after, role, active)

    async def update_user(
        self, caller: Caller, user_id: str, *, role: str | None, active: bool | None, full_name: str | None
    ) -> UserRow:
        """Change an account (admins). Role and active changes revoke the account's tokens."""
        target = await self._store.user_by_id(user_id)
        if target is None:
            raise not_found("user", user_id)
        if role is not None and role not in ROLES:
            raise invalid("user.role", "unknown role")
        if user_id == caller.user_id and (role not in (None, "admin") or active is False):
            raise ServiceError(
                Reason.FAILED_PRECONDITION, "admins cannot demote or deactivate themselves; ask another admin"
            )
        values: dict[str, object] = {}
        if role is not None and role != target.role:
            values["role"] = role
        if active is not None and active != target.active:
            values["active"] = active
        if full_name is not None:
            values["full_name"] = clean_name(full_name)
        updated = await self._store.update_user(user_id, **values) if values else target
        assert updated is not None
        if "role" in values or "active" in values:
            await self.sessions.revoke_all(user_id, "account_change")
            changes: dict[str, str] = {k: str(values[k]).lower() for k in ("role", "active") if k in values}
            await self._audit.record("auth.user.update", resource_type="user", resource_id=user_id, metadata=changes)
        return updated

    async def create_admin(self, email: str, password: str, full_name: str = "") -> UserRow:
        """Bootstrap: create an admin account (CLI only). EMAIL_TAKEN when the account exists: `promote_admin`."""
        email = normalise_email(email)
        require_password(password, "password")
        strength = self._strength(password, email)
        if not strength.acceptable:
            raise weak_password("password", strength)
        try:
            password_hash = await self._hashing.hash(password)
            user = await self._store.create_user(email, clean_name(full_name), password_hash, "admin")
        except EmailTaken:
            raise ServiceError(
                Reason.EMAIL_TAKEN, "an account with this email exists (`voiceassist users promote` makes it an admin)"
            ) from None
        await self._audit.record(
            "auth.user.create_admin", actor_id="cli", actor_role="service", resource_type="user", resource_id=user.id
        )
        return user

    async def promote_admin(self, email: str) -> UserRow:
        """Make an existing account an active admin, its password unchanged (CLI only); NOT_FOUND otherwise."""
        existing = await self._store.user_by_email(normalise_email(email))
        user = await self._store.update_user(existing.id, role="admin", active=True) if existing else None
        if existing is None or user is None:
            raise not_found("user", email)
        await self._audit.record(
            "auth.user.promote_admin", actor_id="cli", actor_role="service", resource_type="user", resource_id=user.id,
            metadata={"previous_role": existing.role, "was_active": str(existing.active).lower()},
        )  # fmt: skip
        return user
