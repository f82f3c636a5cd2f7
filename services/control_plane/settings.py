"""Settings of the control plane (environment variables prefixed CONTROL_PLANE_; its ports are core settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
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

    ca_dir: Path | None = Field(
        None,
        description="Where the mesh's certificate authority keeps its root (root.key, encrypted with the passphrase, "
        "and root.pem, the public trust bundle); made on the first start. Empty: data_dir/mesh-ca.",
    )
    ca_passphrase: SecretStr = Field(
        SecretStr(""),
        description="Encrypts the root key at rest. Required in production.",
    )
    certificate_ttl_seconds: int = Field(
        4 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the workload certificates the authority issues; each process renews its own at two "
        "thirds of it, without a restart.",
    )
    edge_certificate_file: Path | None = Field(
        None,
        description="PEM certificate chain Envoy's HTTPS listener presents (a real one in production, from a secret). "
        "Empty: one issued by the mesh's authority for edge_hostnames (development).",
    )
    edge_key_file: Path | None = Field(None, description="The private key of edge_certificate_file (PEM).")
    edge_hostnames: str = Field(
        "localhost,127.0.0.1",
        description="Comma-separated names and addresses the self-issued edge certificate is valid for.",
    )


@lru_cache
def control_plane_settings() -> ControlPlaneSettings:
    """The process-wide control plane settings (read once)."""
    return ControlPlaneSettings()
