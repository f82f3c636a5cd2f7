"""Settings of the auth service (environment variables prefixed AUTH_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    """Token lifetimes, password policy, rate limits."""

    model_config = SettingsConfigDict(env_prefix="AUTH_", env_file=".env", extra="ignore", frozen=True)

    access_token_ttl_seconds: int = Field(900, description="Access token lifetime (15 minutes).")
    refresh_token_ttl_seconds: int = Field(7 * 86400, description="Refresh token lifetime (7 days).")
    session_max_seconds: int = Field(
        30 * 86400, description="Absolute lifetime of a login session (refresh family), however often refreshed."
    )
    key_rotation_days: int = Field(30, description="A new signing key is made when the current one is this old.")
    key_publish_ahead_seconds: int = Field(
        600, description="A new key is published this long before it signs, so cached JWKS (Envoy: 5 min) know it."
    )
    key_passphrase: SecretStr = Field(
        SecretStr(""), description="Encrypts private signing keys at rest. Required when ENVIRONMENT=production."
    )
    password_min_score: int = Field(50, description="Minimum strength score (0-100) for new passwords.")
    argon2_memory_kib: int = Field(19456, description="argon2id memory cost (OWASP: 19 MiB).")
    argon2_time_cost: int = Field(2, description="argon2id iterations (OWASP: 2).")
    argon2_parallelism: int = Field(1, description="argon2id lanes (OWASP: 1).")
    register_per_hour: int = Field(5, description="Registrations per client IP per hour.")
    login_per_minute: int = Field(10, description="Login attempts per client IP per minute.")
    refresh_per_minute: int = Field(20, description="Token refreshes per client IP per minute.")
    login_failures_per_source: int = Field(
        10,
        description="Failed logins (or password changes) of one account from one client IP per 15 minutes before "
        "that address is throttled for that account; the owner elsewhere is not. A success resets the count.",
    )
    login_failures_per_account: int = Field(
        100,
        description="Failed logins of one account from every address together per 15 minutes before the account "
        "itself is throttled (NIST SP 800-63B: at most 100 consecutive failures). A success resets the count.",
    )


@lru_cache
def auth_settings() -> AuthSettings:
    """The process-wide auth settings (read once)."""
    return AuthSettings()
