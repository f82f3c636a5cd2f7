"""Settings shared by every server, read from environment variables (and a `.env` file when present).

Each service adds its own settings class next to its code (`services/<name>/settings.py`) on top of
`ServiceSettings`; `.env.example` lists every variable and a test keeps it complete.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]


class ServiceSettings(BaseSettings):
    """Base class: reads the environment and `.env`, ignores unknown variables, freezes after loading."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)


class CoreSettings(ServiceSettings):
    """What the server runtime needs, whatever service it hosts."""

    environment: Literal["development", "test", "production"] = Field(
        "development", description="Where this runs; production refuses embedded defaults that are unsafe."
    )
    log_level: str = Field("INFO", description="Root log level.")
    data_dir: Path = Field(ROOT / "data", description="Embedded mode: SQLite files, keys, the local index.")

    database_url: str = Field(
        "",
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test. Each service uses its "
        "own schema in it. Empty: one SQLite file per service under data_dir (embedded mode).",
    )
    database_schema_prefix: str = Field(
        "", description="Prefix of each service's PostgreSQL schema (tests use it to isolate runs)."
    )
    database_pool_size: int = Field(10, description="Connections each service process keeps per database.")
    redis_url: str = Field(
        "", description="e.g. redis://127.0.0.1:6379/0. Empty: in-process stores and queues (embedded mode)."
    )
    redis_key_prefix: str = Field("va:", description="Prefix of every Redis key and stream this system writes.")
    redis_timeout_seconds: float = Field(
        0.5, description="Redis connect/read timeout; a slow Redis must not stall logins (fail-open paths)."
    )
    jwt_issuer: str = Field("voiceassist-auth", description="`iss` of every token; checked by every verifier.")
    jwt_audience: str = Field("voiceassist", description="`aud` of access tokens; checked by every verifier.")
    jwt_leeway_seconds: int = Field(30, description="Clock skew tolerated when checking exp/iat.")
    auth_fail_closed: bool = Field(
        False,
        description="When Redis (revocation list, rate limits) is unreachable: false = allow and audit the outage "
        "(fail-open), true = refuse calls with UNAVAILABLE.",
    )
    audit_buffer_max_events: int = Field(
        50_000,
        ge=1,
        description="Audit events each process keeps while the audit transport (Redis, the audit service) is "
        "unreachable, and the size of the in-process audit queue; beyond it events are dropped, logged and counted.",
    )
    qdrant_url: str = Field("", description="Qdrant server URL. Empty: the embedded Qdrant engine under data_dir.")

    grpc_host: str = Field("127.0.0.1", description="Interface the gRPC servers bind to.")
    grpc_max_message_bytes: int = Field(
        8 * 1024 * 1024, description="Largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED."
    )
    grpc_keepalive_seconds: int = Field(30, description="Server keepalive ping interval.")
    grpc_max_concurrent_streams: int = Field(256, description="HTTP/2 streams per connection.")
    shutdown_grace_seconds: float = Field(
        20.0, description="On SIGTERM/SIGINT: how long in-flight calls may take to finish before they are cancelled."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on the service's metrics port.")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds to.")

    trusted_proxies: str = Field(
        "127.0.0.1/32,::1/128",
        description="Comma-separated networks whose x-forwarded-for is believed (Envoy's address). The client IP is "
        "the entry Envoy appended (the last one); from anyone else the peer address is used.",
    )

    auth_addr: str = Field("", description="host:port of the auth service; empty: from the service registry.")
    audit_addr: str = Field("", description="host:port of the audit service; empty: from the service registry.")
    search_addr: str = Field("", description="host:port of the search service; empty: from the service registry.")
    rag_addr: str = Field("", description="host:port of the rag service; empty: from the service registry.")
    voice_addr: str = Field("", description="host:port of the voice service; empty: from the service registry.")

    envoy_port: int = Field(8080, description="Envoy's listener (JSON, gRPC, gRPC-Web).")
    envoy_admin_port: int = Field(9901, description="Envoy's admin interface, bound to 127.0.0.1 only.")
    cors_allowed_origins: str = Field(
        "http://localhost:3000,http://127.0.0.1:3000",
        description="Comma-separated browser origins allowed by Envoy's CORS filter.",
    )

    def address_of(self, service: str, default: str) -> str:
        """The configured address of a service, or `default` (from the registry) when none is set."""
        return getattr(self, f"{service}_addr") or default


@lru_cache
def core_settings() -> CoreSettings:
    """The process-wide core settings (read once)."""
    return CoreSettings()
