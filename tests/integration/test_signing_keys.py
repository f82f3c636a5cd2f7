"""Signing key rotation against a real database: publish ahead, then sign, keep the old key for verification."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jwt

from services.auth.keys import SigningKeyRing
from services.auth.server import MIGRATIONS
from services.auth.store import AuthStore
from services.core.db import Database
from services.core.settings import CoreSettings


async def _ring(tmp_path: Path, rotation: timedelta, passphrase: str = "") -> tuple[SigningKeyRing, Database]:
    db = Database("auth", CoreSettings(_env_file=None, data_dir=tmp_path, database_url=""))
    await db.migrate(MIGRATIONS)
    ring = SigningKeyRing(
        AuthStore(db),
        passphrase=passphrase,
        rotation=rotation,
        publish_ahead=timedelta(minutes=10),
        keep_after=timedelta(days=7),
    )
    await ring.refresh()
    return ring, db


async def test_rotation_publishes_the_next_key_before_it_signs(tmp_path: Path) -> None:
    ring, db = await _ring(tmp_path, rotation=timedelta(0))
    try:
        first = ring.current()
        assert [k["kid"] for k in ring.jwks()] == [first.kid]
        token = ring.sign({"sub": "u", "typ": "access"}, "access")

        await ring.refresh()  # due for rotation: a second key appears, published but not yet signing
        kids = [k["kid"] for k in ring.jwks()]
        assert len(kids) == 2 and kids[0] == first.kid
        assert ring.current().kid == first.kid
        # tokens of the old key still verify with the published keys
        header = jwt.get_unverified_header(token)
        assert jwt.decode(token, ring.public_key(header["kid"]), algorithms=["EdDSA"])["sub"] == "u"

        await ring.refresh()  # a pending key exists: no third one
        assert len(ring.jwks()) == 2
    finally:
        await db.close()


async def test_keys_survive_a_restart_and_are_encrypted_at_rest(tmp_path: Path) -> None:
    ring, db = await _ring(tmp_path, rotation=timedelta(days=30), passphrase="s3cret-passphrase")
    kid = ring.current().kid
    rows = await AuthStore(db).signing_keys()
    assert "ENCRYPTED PRIVATE KEY" in rows[0].private_pem
    await db.close()
    again, db2 = await _ring(tmp_path, rotation=timedelta(days=30), passphrase="s3cret-passphrase")
    try:
        assert again.current().kid == kid
    finally:
        await db2.close()
