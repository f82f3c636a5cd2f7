"""Signed checkpoints: the tree size and root, signed with the ledger's Ed25519 key, so anyone holding the public
key can later prove the ledger was not rewritten (a consistency proof from a checkpoint they kept).

The key lives in the audit database (PEM, encrypted with AUDIT_KEY_PASSPHRASE when set), made by the first
process that needs it; several processes racing to make it settle on one by a unique generation. A checkpoint is
signed every N events, every T seconds while the tree grows, and on demand; the root for a size is fixed, so two
processes signing the same size store one checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit.events import now_micros
from services.audit.ledger import Ledger
from services.audit.ledger_proofs import checkpoint_text, key_id
from services.audit.store import AuditStore, CheckpointRow, Head, SigningKeyRow
from services.core.keystore import load_private_key, private_key_pem, raw_public_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SigningKey:
    """The key checkpoints are signed with."""

    key_id: str
    private_key: Ed25519PrivateKey
    public_key: bytes


class CheckpointKeys:
    """The ledger's signing keys: the newest signs, every one stays published (old checkpoints name them)."""

    def __init__(self, store: AuditStore, passphrase: str) -> None:
        self._store = store
        self._passphrase = passphrase.encode()
        self.current: SigningKey | None = None
        self.public_keys: dict[str, bytes] = {}

    async def load(self) -> None:
        """Read the keys; make the first one when there is none."""
        rows = await self._store.signing_keys()
        if not rows:
            await self._add(generation=1)
            rows = await self._store.signing_keys()
        newest = rows[0]
        private_key = load_private_key(newest.private_pem, self._passphrase, "AUDIT_KEY_PASSPHRASE")
        self.current = SigningKey(newest.key_id, private_key, bytes(newest.public_key))
        self.public_keys = {r.key_id: bytes(r.public_key) for r in rows}

    async def _add(self, generation: int) -> None:
        private_key = Ed25519PrivateKey.generate()
        public = raw_public_key(private_key)
        row = SigningKeyRow(
            key_id=key_id(public),
            generation=generation,
            public_key=public,
            private_pem=private_key_pem(private_key, self._passphrase),
        )
        if await self._store.add_signing_key(row):
            log.info("checkpoint signing key made", extra={"key_id": row.key_id, "encrypted": bool(self._passphrase)})

    def sign(self, origin: str, tree_size: int, root_hash: bytes) -> CheckpointRow:
        """A checkpoint of this tree, signed now with the current key."""
        if self.current is None:
            raise RuntimeError("checkpoint keys not loaded")
        stamp = now_micros()
        text = checkpoint_text(origin, tree_size, root_hash, stamp, self.current.key_id)
        return CheckpointRow(
            tree_size=tree_size,
            root_hash=root_hash,
            timestamp_us=stamp,
            key_id=self.current.key_id,
            origin=origin,
            signature=self.current.private_key.sign(text),
        )


class Checkpoints:
    """When to sign, and the newest checkpoint."""

    def __init__(self, ledger: Ledger, keys: CheckpointKeys, origin: str, every_events: int) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self.keys = keys
        self.origin = origin
        self._every = every_events
        self._signed_size = -1  # the largest tree this process knows to be checkpointed

    async def current(self) -> CheckpointRow:
        """A checkpoint of the current tree: the newest one, or a new one when the tree has grown since."""
        head = await self._store.head()
        latest = await self._store.latest_checkpoint()
        if latest is not None and latest.tree_size >= head.tree_size:
            self._signed_size = max(self._signed_size, latest.tree_size)
            return latest
        return await self._sign(head)

    async def _sign(self, head: Head) -> CheckpointRow:
        row = self.keys.sign(self.origin, head.tree_size, await self._ledger.root_at(head.tree_size, head))
        await self._store.add_checkpoint(row)
        self._signed_size = max(self._signed_size, head.tree_size)
        stored = await self._store.checkpoint_at(head.tree_size)
        assert stored is not None
        return stored

    async def after_append(self, tree_size: int) -> None:
        """Sign when `every_events` events arrived since the last checkpoint this process knows of."""
        if self._signed_size < 0:
            latest = await self._store.latest_checkpoint()
            self._signed_size = latest.tree_size if latest is not None else 0
        if tree_size - self._signed_size >= self._every:
            await self.current()
