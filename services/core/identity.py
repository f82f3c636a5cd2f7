"""Workload identities: SPIFFE IDs in X.509 certificates, as Istio and SPIRE issue them.

A workload (one of our processes, or Envoy) is named `spiffe://voiceassist/<name>`, where `<name>` is a service of
the registry, `edge` (Envoy) or `control-plane`. Its certificate carries that URI as its subject alternative name,
and a peer's identity is read from the certificate it presented in the TLS handshake, never from anything it says.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TRUST_DOMAIN = "voiceassist"
EDGE = "edge"  # Envoy, the one workload that is not a server of ours
CONTROL_PLANE = "control-plane"
OPERATOR = "operator"  # tools and probes that call servers directly; never a service
# The metadata carrying the mesh's join token to the control plane (MESH_JOIN_TOKEN).
JOIN_TOKEN_HEADER = "x-voiceassist-join-token"  # noqa: S105 - a header name, not a secret


def spiffe_id(workload: str) -> str:
    """The SPIFFE ID of a workload name."""
    return f"spiffe://{TRUST_DOMAIN}/{workload}"


def workload_of(uri: str) -> str | None:
    """The workload name of one of our SPIFFE IDs, else None."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    name = uri[len(prefix) :] if uri.startswith(prefix) else ""
    return name if name and "/" not in name else None


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: what every TLS stack we use (BoringSSL in Envoy and gRPC) handles fastest."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (leaf keys live in memory and are handed to the TLS stack only)."""
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def signing_request(key: ec.EllipticCurvePrivateKey, workloads: Sequence[str]) -> bytes:
    """A PEM certificate signing request for `workloads` (the authority decides what it signs)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, workloads[0])])
    )
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(w)) for w in workloads]), critical=False
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def workloads_in(certificate: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The workload names a certificate (or request) carries as URI SANs."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    found = (workload_of(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier))
    return [name for name in found if name]


@dataclass(frozen=True)
class Credentials:
    """A workload's key and certificate chain (PEM), and the roots it trusts."""

    key_pem: bytes
    chain_pem: bytes
    trust_pem: bytes

    @functools.cached_property
    def expires_at(self) -> datetime.datetime:
        """When the leaf (the chain's first certificate) stops being valid (UTC)."""
        return x509.load_pem_x509_certificate(self.chain_pem).not_valid_after_utc
