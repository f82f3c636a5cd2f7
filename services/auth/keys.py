"""Token signing keys: Ed25519 pairs kept in the database, rotated, published as a JSON Web Key Set.

A new key is published `key_publish_ahead_seconds` before it starts signing, so every cached JWKS (Envoy's, the
services') knows it by the time tokens carry it; an old key stays published until the last refresh token it
signed has expired. Every auth process reads the same keys; rotation races are settled by a unique generation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.store import AuthStore, SigningKeyRow
from services.core.db import utcnow
from services.core.keystore import load_private_key, private_key_pem, raw_public_key

log = logging.getLogger(__name__)
ALGORITHM = "EdDSA"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """One key pair with its publication window."""

    kid: str
    generation: int
    private_key: Ed25519PrivateKey
    activates_at: datetime
    retires_at: datetime | None

    @property
    def public_jwk(self) -> dict[str, str]:
        """RFC 8037 OKP public key."""
        raw = raw_public_key(self.private_key)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self.kid, "alg": ALGORITHM, "use": "sig"}


def thumbprint(private_key: Ed25519PrivateKey) -> str:
    """RFC 7638 JWK thumbprint of the public key: the key id."""
    raw = raw_public_key(private_key)
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


class SigningKeyRing:
    """The keys this auth process signs and verifies with."""

    def __init__(
        self, store: AuthStore, *, passphrase: str, rotation: timedelta, publish_ahead: timedelta, keep_after: timedelta
    ) -> None:
        self._store = store
        self._passphrase = passphrase.encode()
        self._rotation = rotation
        self._publish_ahead = publish_ahead
        self._keep_after = keep_after  # how long a replaced key still verifies (the refresh token lifetime)
        self._keys: list[SigningKey] = []

    async def refresh(self) -> None:
        """Load the keys; make the first one, or the next one when the current key is due for rotation."""
        await self._load()
        now = utcnow()
        if not self._keys:
            await self._add(activates_at=now)
        elif not any(k.activates_at > now for k in self._keys) and now - self.current().activates_at >= self._rotation:
            await self._add(activates_at=now + self._publish_ahead)

    async def _load(self) -> None:
        rows = await self._store.signing_keys()
        self._keys = [
            SigningKey(
                kid=r.kid,
                generation=r.generation,
                private_key=load_private_key(r.private_pem, self._passphrase, "AUTH_KEY_PASSPHRASE"),
                activates_at=r.activates_at,
                retires_at=r.retires_at,
            )
            for r in rows
        ]

    async def _add(self, activates_at: datetime) -> None:
        private_key = Ed25519PrivateKey.generate()
        generation = max((k.generation for k in self._keys), default=0) + 1
        row = SigningKeyRow(
            kid=thumbprint(private_key),
            generation=generation,
            algorithm=ALGORITHM,
            private_pem=private_key_pem(private_key, self._passphrase),
            activates_at=activates_at,
        )
        retire_others = activates_at + self._keep_after if self._keys else None
        if await self._store.add_signing_key(row, retire_others):
            log.info("signing key added", extra={"kid": row.kid, "generation": generation})
        await self._load()  # ours, or the one a concurrent process added

    def current(self) -> SigningKey:
        """The key to sign with now: the newest one already active."""
        now = utcnow()
        active = [k for k in self._keys if k.activates_at <= now]
        if not active:
            raise RuntimeError("no active signing key; call refresh() first")
        return max(active, key=lambda k: k.generation)

    def public_key(self, kid: str) -> jwt.PyJWK | None:
        """The published key with this id, for verifying tokens."""
        for key in self._keys:
            if key.kid == kid:
                return jwt.PyJWK(key.public_jwk)
        return None

    def jwks(self) -> list[dict[str, Any]]:
        """Every published public key: the current one first, then pending and previous ones."""
        current = self.current()
        return [current.public_jwk] + [k.public_jwk for k in self._keys if k.kid != current.kid]

    def sign(self, claims: dict[str, Any], token_type: str) -> str:
        """A compact JWS of `claims` with the current key (`kid` header; `typ` at+jwt for access tokens)."""
        key = self.current()
        headers = {"kid": key.kid, "typ": "at+jwt" if token_type == "access" else "JWT"}
        return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers=headers)
