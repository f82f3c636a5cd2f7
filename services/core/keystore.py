"""Ed25519 private keys at rest: PKCS#8 PEM, encrypted with a passphrase when one is configured.

Used by every service that keeps a signing key in its database (auth's token keys, audit's checkpoint keys).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    """The 32-byte public key."""
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key_pem(private_key: Ed25519PrivateKey, passphrase: bytes) -> str:
    """PEM text of the key, encrypted when `passphrase` is not empty."""
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def load_private_key(pem: str, passphrase: bytes, setting: str) -> Ed25519PrivateKey:
    """The key in `pem`; RuntimeError naming `setting` when the passphrase does not open it."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), passphrase or None)
    except (TypeError, ValueError):
        raise RuntimeError(
            f"cannot decrypt a stored signing key: {setting} differs from the one it was made with"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RuntimeError("a stored signing key is not an Ed25519 key")
    return key
