"""How every `voiceassist` command-line client signs in (`audit`, `kb`, `voice`): one set of options, one order.

1. `--token` or VOICEASSIST_TOKEN: an access token, used as given.
2. The token cache (VOICEASSIST_TOKEN_CACHE, default ~/.cache/voiceassist/tokens.json, 0600), one entry per server
   address: its access token while it is valid; once expired, a RefreshToken call with its refresh token.
3. A Login as `--email` / VOICEASSIST_EMAIL (or the cached account's email), the password from VOICEASSIST_PASSWORD
   or a prompt (never an argument: other users see those in `ps`). The new tokens go into the cache.

`--address` (VOICEASSIST_ADDRESS) is where calls go: Envoy on this machine by default, or a server directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from services.core.settings import core_settings
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

# An access token this close to expiry counts as expired: the command's calls must not outlive it.
EXPIRY_MARGIN_SECONDS = 30
LOGIN_TIMEOUT_SECONDS = 30
Metadata = tuple[tuple[str, str], ...]


def default_cache_path() -> Path:
    """VOICEASSIST_TOKEN_CACHE, or tokens.json in the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
    if path := os.environ.get("VOICEASSIST_TOKEN_CACHE"):
        return Path(path)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "voiceassist" / "tokens.json"


@dataclass(frozen=True)
class CachedTokens:
    """A token pair for one server address, with when each token expires (Unix seconds)."""

    email: str
    access_token: str
    access_expires_at: float
    refresh_token: str
    refresh_expires_at: float

    @classmethod
    def issued(cls, email: str, reply: auth_pb2.LoginResponse | auth_pb2.RefreshTokenResponse) -> CachedTokens:
        """The pair a Login or RefreshToken reply carries, timed from now."""
        now = time.time()
        return cls(email, reply.access_token, now + reply.expires_in, reply.refresh_token,
                   now + reply.refresh_expires_in)  # fmt: skip


class TokenCache:
    """Token pairs by server address in one JSON file that only its owner can read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, address: str) -> CachedTokens | None:
        """The pair cached for `address`, if any (an unreadable cache is an empty one)."""
        try:
            return CachedTokens(**self._read()[address])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, address: str, tokens: CachedTokens) -> None:
        """Cache `tokens` for `address`, replacing the file atomically, owner-only (0600 in a 0700 folder)."""
        entries = self._read()
        entries[address] = asdict(tokens)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(entries, handle, indent=1)
        os.replace(partial, self.path)

    def _read(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            entries = json.loads(self.path.read_text())
            if isinstance(entries, dict):
                return entries
        return {}


def edge_credentials() -> grpc.ChannelCredentials | None:
    """How the command-line clients reach Envoy: TLS with MESH_TLS, else None (plaintext)."""
    settings = core_settings()
    if not settings.mesh_tls:
        return None
    roots = settings.trust_bundle_path
    return grpc.ssl_channel_credentials(roots.read_bytes() if roots.exists() else None)


@dataclass(frozen=True)
class SignIn:
    """What a command was given to sign in with; `access_token()` does the signing in."""

    address: str
    token: str | None = None
    email: str | None = None

    def channel(self, options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
        """A channel to the address: HTTPS to Envoy with MESH_TLS (verified against MESH_TRUST_BUNDLE when that
        file exists, else the system's roots: a production edge certificate), plaintext otherwise."""
        credentials = edge_credentials()
        if credentials is None:
            return grpc.insecure_channel(self.address, options=list(options))
        return grpc.secure_channel(self.address, credentials, options=list(options))

    def aio_channel(self) -> grpc.aio.Channel:
        """`channel()` for asyncio."""
        credentials = edge_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, credentials)

    def access_token(self) -> str:
        """The access token for the calls: given, cached, refreshed or from a new login (see the module doc)."""
        if self.token:
            return self.token
        cache = TokenCache(default_cache_path())
        cached = cache.get(self.address)
        if cached is not None and self.email and cached.email != self.email:
            cached = None  # another account's tokens
        with self.channel() as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            tokens = self._reuse(auth, cached) or self._login(auth, self.email or (cached.email if cached else ""))
        if tokens is not cached:
            cache.put(self.address, tokens)
        return tokens.access_token

    def metadata(self) -> Metadata:
        """gRPC metadata that authenticates a call."""
        return (("authorization", f"Bearer {self.access_token()}"),)

    @staticmethod
    def _reuse(auth: auth_pb2_grpc.AuthServiceStub, cached: CachedTokens | None) -> CachedTokens | None:
        now = time.time()
        if cached is None or cached.refresh_expires_at <= now + EXPIRY_MARGIN_SECONDS:
            return None
        if cached.access_expires_at > now + EXPIRY_MARGIN_SECONDS:
            return cached
        try:
            reply = auth.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=cached.refresh_token), timeout=LOGIN_TIMEOUT_SECONDS
            )
        except grpc.RpcError:
            return None  # revoked, reused or rotated elsewhere: sign in again
        return CachedTokens.issued(cached.email, reply)

    @staticmethod
    def _login(auth: auth_pb2_grpc.AuthServiceStub, email: str) -> CachedTokens:
        if not email:
            raise click.UsageError(
                "sign in with --email (password from VOICEASSIST_PASSWORD or a prompt), or give an access token "
                "with --token or VOICEASSIST_TOKEN"
            )
        password = os.environ.get("VOICEASSIST_PASSWORD") or click.prompt(f"password for {email}", hide_input=True)
        try:
            reply = auth.Login(auth_pb2.LoginRequest(email=email, password=password), timeout=LOGIN_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise click.ClickException(f"login failed: {error.code().name}: {error.details()}") from None
        return CachedTokens.issued(email, reply)


def sign_in_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --address, --email and --token to a click command, which then gets them as `sign_in: SignIn`."""

    @functools.wraps(command)
    def with_sign_in(*args: Any, address: str, email: str | None, token: str | None, **kwargs: Any) -> Any:
        return command(*args, sign_in=SignIn(address, token, email), **kwargs)

    options = [
        click.option("--address", envvar="VOICEASSIST_ADDRESS", default=lambda: core_settings().envoy_address,
                     show_default="Envoy on this machine (ENVOY_PORT)",
                     help="gRPC address: Envoy, or a server directly (VOICEASSIST_ADDRESS)."),
        click.option("--email", envvar="VOICEASSIST_EMAIL",
                     help="Sign in as this account (VOICEASSIST_EMAIL); password from VOICEASSIST_PASSWORD or a "
                     "prompt. Later commands reuse the cached tokens."),
        click.option("--token", envvar="VOICEASSIST_TOKEN", help="An access token to use as is (VOICEASSIST_TOKEN)."),
    ]  # fmt: skip
    for option in reversed(options):
        with_sign_in = option(with_sign_in)
    return with_sign_in
