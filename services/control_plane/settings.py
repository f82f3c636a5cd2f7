"""Settings of the control plane (environment variables prefixed CONTROL_PLANE_; its ports are core settings)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class ControlPlaneSettings(ServiceSettings):
    """How the control plane paces Envoy's configuration."""

    model_config = SettingsConfigDict(env_prefix="CONTROL_PLANE_", env_file=".env", extra="ignore", frozen=True)

    warm_up_seconds: float = Field(
        3.0,
        ge=0,
        description="After a start (from the first call it receives), endpoints are held back this long so that "
        "workers can announce themselves again; Envoy keeps serving with its last endpoints meanwhile (longer than a "
        "worker's reconnect backoff).",
    )
    apply_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="How long an announcement waits for every Envoy to acknowledge it before it is answered anyway "
        "(a worker that withdraws waits this long at most before it stops).",
    )


@lru_cache
def control_plane_settings() -> ControlPlaneSettings:
    """The process-wide control plane settings (read once)."""
    return ControlPlaneSettings()
