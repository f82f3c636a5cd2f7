"""The auth service's gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from services.auth.accounts import Accounts, Limits
from services.auth.keys import SigningKeyRing
from services.auth.passwords import PasswordHashing, Strength
from services.auth.sessions import Sessions, TokenPair, TokenPolicy
from services.auth.settings import AuthSettings, auth_settings
from services.auth.store import AuthStore, UserRow
from services.core import registry
from services.core.context import current_caller, current_request, require_role
from services.core.db import Database
from services.core.errors import invalid
from services.core.limits import AUTH
from services.core.pagination import decode_time_cursor, encode_time_cursor, page_size
from services.core.ratelimit import Limit
from services.core.runtime import Runtime
from services.core.server import Hosted
from services.core.timestamps import to_timestamp
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger(__name__)
SPEC = registry.spec("auth")
MIGRATIONS = Path(__file__).parent / "migrations"
KEY_MAINTENANCE_SECONDS = 600

_ROLE_TO_PROTO = {"user": auth_pb2.ROLE_USER, "viewer": auth_pb2.ROLE_VIEWER, "admin": auth_pb2.ROLE_ADMIN}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}


def user_message(row: UserRow) -> auth_pb2.User:
    """The proto form of an account (never the password hash)."""
    return auth_pb2.User(
        id=row.id,
        email=row.email,
        full_name=row.full_name,
        role=_ROLE_TO_PROTO.get(row.role, auth_pb2.ROLE_UNSPECIFIED),
        active=row.active,
        create_time=to_timestamp(row.created_at),
        update_time=to_timestamp(row.updated_at),
        password_change_time=to_timestamp(row.password_changed_at),
    )


def _client_ip() -> str:
    info = current_request()
    return info.client_ip if info else ""


def _pair_fields(pair: TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in": pair.expires_in,
        "token_type": "Bearer",
        "refresh_expires_in": pair.refresh_expires_in,
    }


def _strength_message(strength: Strength) -> auth_pb2.CheckPasswordStrengthResponse:
    return auth_pb2.CheckPasswordStrengthResponse(
        score=strength.score,
        acceptable=strength.acceptable,
        problems=[auth_pb2.PasswordProblem(code=p.code, description=p.description) for p in strength.problems],
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthService over the Accounts use cases."""

    def __init__(self, accounts: Accounts, keys: SigningKeyRing) -> None:
        self._accounts = accounts
        self._keys = keys

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RegisterResponse:
        user = await self._accounts.register(request.email, request.password, request.full_name, _client_ip())
        return auth_pb2.RegisterResponse(user=user_message(user))

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.LoginResponse:
        pair, user = await self._accounts.login(request.email, request.password, _client_ip())
        return auth_pb2.LoginResponse(**_pair_fields(pair), user=user_message(user))

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RefreshTokenResponse:
        pair = await self._accounts.refresh(request.refresh_token, _client_ip())
        return auth_pb2.RefreshTokenResponse(**_pair_fields(pair))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LogoutResponse:
        await self._accounts.logout(current_caller(), request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def RevokeAllSessions(
        self, request: auth_pb2.RevokeAllSessionsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeAllSessionsResponse:
        cutoff = await self._accounts.revoke_all(current_caller())
        return auth_pb2.RevokeAllSessionsResponse(revoke_time=to_timestamp(cutoff))

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetCurrentUserResponse:
        return auth_pb2.GetCurrentUserResponse(user=user_message(await self._accounts.current_user(current_caller())))

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ChangePasswordResponse:
        cutoff = await self._accounts.change_password(
            current_caller(), request.current_password, request.new_password, _client_ip()
        )
        return auth_pb2.ChangePasswordResponse(revoke_time=to_timestamp(cutoff))

    async def CheckPasswordStrength(
        self, request: auth_pb2.CheckPasswordStrengthRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckPasswordStrengthResponse:
        return _strength_message(self._accounts.password_strength(request.password, request.email))

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.JsonWebKey(**k) for k in self._keys.jwks()])

    async def ListUsers(
        self, request: auth_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListUsersResponse:
        require_role("admin", "viewer")
        size = page_size(request.page_size, AUTH.list_users)
        role = _ROLE_FROM_PROTO.get(request.role) if request.role else None
        active = request.active if request.HasField("active") else None
        query = {"role": role, "active": active}
        after = decode_time_cursor(request.page_token, query)
        page = await self._accounts.list_users(size, after, role, active)
        token = ""
        if page.has_more and page.users:
            token = encode_time_cursor(page.users[-1].created_at, page.users[-1].id, query)
        return auth_pb2.ListUsersResponse(users=[user_message(u) for u in page.users], next_page_token=token)

    async def UpdateUser(
        self, request: auth_pb2.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UpdateUserResponse:
        caller = require_role("admin")
        paths = set(request.update_mask.paths)
        if not request.user.id:
            raise invalid("user.id", "required")
        if not paths:
            raise invalid("update_mask", "name the fields to change: role, active, full_name")
        unknown = paths - {"role", "active", "full_name"}
        if unknown:
            raise invalid("update_mask", f"cannot change {', '.join(sorted(unknown))}")
        if "role" in paths and request.user.role not in _ROLE_FROM_PROTO:
            raise invalid("user.role", "must be ROLE_USER, ROLE_VIEWER or ROLE_ADMIN")
        user = await self._accounts.update_user(
            caller,
            request.user.id,
            role=_ROLE_FROM_PROTO[request.user.role] if "role" in paths else None,
            active=request.user.active if "active" in paths else None,
            full_name=request.user.full_name if "full_name" in paths else None,
        )
        return auth_pb2.UpdateUserResponse(user=user_message(user))


async def build_accounts(
    runtime: Runtime, settings: AuthSettings | None = None
) -> tuple[Accounts, SigningKeyRing, Database]:
    """The auth use cases wired to their stores (shared by the server and the CLI)."""
    settings = settings or auth_settings()
    core = runtime.settings
    if core.environment == "production" and not settings.key_passphrase.get_secret_value():
        raise RuntimeError("AUTH_KEY_PASSPHRASE is required in production (private keys are stored encrypted)")
    db = Database("auth", core)
    await db.migrate(MIGRATIONS)
    store = AuthStore(db)
    keys = SigningKeyRing(
        store,
        passphrase=settings.key_passphrase.get_secret_value(),
        rotation=timedelta(days=settings.key_rotation_days),
        publish_ahead=timedelta(seconds=settings.key_publish_ahead_seconds),
        keep_after=timedelta(seconds=settings.refresh_token_ttl_seconds + core.jwt_leeway_seconds),
    )
    await keys.refresh()
    audit = runtime.audit("auth")
    policy = TokenPolicy(
        issuer=core.jwt_issuer,
        audience=core.jwt_audience,
        access_ttl=timedelta(seconds=settings.access_token_ttl_seconds),
        refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_seconds),
        session_max=timedelta(seconds=settings.session_max_seconds),
        leeway_seconds=core.jwt_leeway_seconds,
    )
    sessions = Sessions(store, keys, runtime.revocations, audit, policy)
    limits = Limits(
        register=Limit("register", settings.register_per_hour, 3600),
        login=Limit("login", settings.login_per_minute, 60),
        refresh=Limit("refresh", settings.refresh_per_minute, 60),
        source_failures=Limit("login_failures_source", settings.login_failures_per_source, 900),
        account_failures=Limit("login_failures_account", settings.login_failures_per_account, 900),
    )
    hashing = PasswordHashing(settings.argon2_memory_kib, settings.argon2_time_cost, settings.argon2_parallelism)
    accounts = Accounts(
        store, hashing, sessions, runtime.rate_limiter, limits, audit,
        min_score=settings.password_min_score, fail_closed=core.auth_fail_closed,
    )  # fmt: skip
    return accounts, keys, db


async def _maintain_keys(keys: SigningKeyRing) -> None:
    while True:
        await asyncio.sleep(KEY_MAINTENANCE_SECONDS)
        try:
            await keys.refresh()
        except Exception:  # the current keys keep working; try again next round
            log.exception("signing key maintenance failed")


async def build(runtime: Runtime) -> Hosted:
    """The auth service, ready to add to a server."""
    accounts, keys, db = await build_accounts(runtime)
    servicer = AuthServicer(accounts, keys)
    maintenance = asyncio.create_task(_maintain_keys(keys))

    async def close() -> None:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await db.close()

    return Hosted(
        SPEC,
        lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server),
        probe=db.ping,
        close=close,
    )
