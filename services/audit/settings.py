"""Settings of the audit service (environment variables prefixed AUDIT_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    """Ingestion batching and reclaiming, checkpoint cadence and signing key."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_", env_file=".env", extra="ignore", frozen=True)

    batch_size: int = Field(
        500, ge=1, le=5000, description="Events committed to the ledger per transaction (bigger: more throughput)."
    )
    read_block_seconds: float = Field(
        1.0, gt=0, le=30, description="How long one read of the Redis stream (or in-process queue) waits for events."
    )
    claim_idle_seconds: float = Field(
        30.0, gt=0, description="Stream entries a consumer has held this long without acknowledging are reclaimed."
    )
    reclaim_interval_seconds: float = Field(
        5.0, gt=0, description="How often each consumer looks for entries to reclaim from dead consumers."
    )
    consumer_name: str = Field(
        "", description="This process's name in the stream's consumer group; empty: host name and process id."
    )
    checkpoint_every_events: int = Field(1000, ge=1, description="A checkpoint is signed after this many new events.")
    checkpoint_interval_seconds: float = Field(
        60.0, gt=0, description="A checkpoint is also signed this often while the tree grows."
    )
    origin: str = Field(
        "voiceassist-audit", description="Names this ledger in every signed checkpoint (one line of text)."
    )
    key_passphrase: SecretStr = Field(
        SecretStr(""),
        description="Encrypts the checkpoint signing key at rest. Required when ENVIRONMENT=production.",
    )
    append_per_minute: int = Field(
        60, ge=1, description="AppendEvent calls per minute by a caller who is neither admin nor service."
    )

    @field_validator("origin")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value or "\n" in value or len(value) > 200:
            raise ValueError("origin must be one line of at most 200 characters")
        return value


@lru_cache
def audit_settings() -> AuditSettings:
    """The process-wide audit settings (read once)."""
    return AuditSettings()
