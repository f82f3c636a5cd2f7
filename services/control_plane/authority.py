"""The mesh's certificate authority: a root kept on disk like the services' signing keys (PKCS#8, encrypted with
`CONTROL_PLANE_CA_PASSPHRASE`), and short-lived leaf certificates for workloads, each naming its SPIFFE ID.

The root is made on the first start and read from `CONTROL_PLANE_CA_DIR` afterwards (several control planes share
it through that directory: a volume or a secret). Its certificate (`root.pem`) is public: it is the trust bundle
every workload verifies its peers against.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.control_plane.settings import ControlPlaneSettings
from services.core import identity

log = logging.getLogger(__name__)

ROOT_LIFETIME = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks a little behind ours
ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"


class Authority:
    """Signs workload certificates with the root."""

    def __init__(self, root: x509.Certificate, key: ec.EllipticCurvePrivateKey, leaf_lifetime: datetime.timedelta):
        self.root = root
        self._key = key
        self._lifetime = leaf_lifetime
        self.trust_pem = root.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def open(cls, directory: Path, passphrase: bytes, leaf_lifetime: datetime.timedelta) -> Authority:
        """The root in `directory`, made there (0600 files in a 0700 directory) when absent."""
        cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
        if key_path.exists():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase or None)
            except (TypeError, ValueError):
                raise RuntimeError(
                    f"cannot open the mesh CA key {key_path}: CONTROL_PLANE_CA_PASSPHRASE differs from the one it was "
                    "made with"
                ) from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise RuntimeError(f"{key_path} is not an elliptic-curve key")
            return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key, leaf_lifetime)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = identity.new_key()
        root = _self_signed_root(key)
        encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   encryption))  # fmt: skip
        _write_private(cert_path, root.public_bytes(serialization.Encoding.PEM), mode=0o644)
        log.info("mesh certificate authority made", extra={"directory": str(directory), "encrypted": bool(passphrase)})
        return cls(root, key, leaf_lifetime)

    @classmethod
    def configured(cls, settings: ControlPlaneSettings, directory: Path) -> Authority:
        """`open` with the passphrase and leaf lifetime of the control plane's settings."""
        lifetime = datetime.timedelta(seconds=settings.certificate_ttl_seconds)
        return cls.open(directory, settings.ca_passphrase.get_secret_value().encode(), lifetime)

    def sign(self, request: x509.CertificateSigningRequest, workloads: Sequence[str]) -> x509.Certificate:
        """A leaf certificate for a signing request's key, naming `workloads`; ValueError when the request's
        signature does not match its key (whoever sent it does not hold the key)."""
        if not request.is_signature_valid:
            raise ValueError("the signing request's signature does not match its key")
        return self._leaf(request.public_key(), workloads, ())

    def issue(self, workloads: Sequence[str], dns_names: Sequence[str] = ()) -> identity.Credentials:
        """A fresh key and its certificate, for a workload the control plane serves itself (Envoy over SDS, its
        own server)."""
        key = identity.new_key()
        leaf = self._leaf(key.public_key(), workloads, dns_names).public_bytes(serialization.Encoding.PEM)
        return identity.Credentials(identity.key_pem(key), leaf, self.trust_pem)

    def _leaf(self, public_key: CertificatePublicKeyTypes, workloads: Sequence[str],
              dns_names: Sequence[str]) -> x509.Certificate:  # fmt: skip
        """A leaf certificate for `public_key`, naming `workloads` (and `dns_names`, for a server that browsers
        or curl reach by name), valid for the leaf lifetime."""
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id(w)) for w in workloads]
        # The workload name as a DNS name too: gRPC clients check the server's name (ssl_target_name_override).
        names += [_host_name(d) for d in dict.fromkeys([*workloads, *dns_names])]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(workloads) or list(dns_names))[0])])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + self._lifetime, self.root.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EXTENDED_KEY_USAGE, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )


_LEAF_EXTENDED_KEY_USAGE = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, key_encipherment=False, content_commitment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


_ROOT_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, key_encipherment=False, content_commitment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _host_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _self_signed_root(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "VoiceAssist Mesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "VoiceAssist Mesh root CA")])  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ROOT_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
