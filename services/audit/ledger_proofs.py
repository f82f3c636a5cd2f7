"""Checks the audit ledger without trusting the server: leaf hashes, Merkle proofs, signed checkpoints.

Plain Python (hashlib and cryptography only), so any client of the audit service can run it against what the
server returns:

- the canonical encoding of an event and its RFC 6962 leaf hash, recomputed from the event's own fields;
- RFC 6962 / RFC 9162 Merkle hashing, and the RFC 9162 (2.1.3.2, 2.1.4.2) verification of inclusion and
  consistency proofs;
- the text a checkpoint signs and the Ed25519 check of its signature.

Canonical encoding (version 1): the JSON array

    [1, sequence, event_id, event_time_us, commit_time_us, actor_id, actor_email, actor_role, action,
     resource_type, resource_id, outcome, failure_reason, request_id, client_ip, user_agent, service, method,
     metadata_json, appended_by]

serialised as RFC 8785 (JCS) would: no whitespace, integers in decimal, strings as UTF-8 with only `"`, `\\` and
control characters escaped (short forms for \\b \\f \\n \\r \\t, `\\u00xx` otherwise). Times are integer
microseconds since the Unix epoch, `outcome` is the Outcome enum number, and `metadata_json` is the metadata map
encoded the same way as a JSON object with its (ASCII) keys sorted, carried as a string.

Checkpoint text (what the Ed25519 signature covers), one field per line, each line ending in "\\n":
origin, tree size, base64 of the root hash, timestamp in microseconds since the epoch, key id. The key id is the
first 16 hex digits of SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

if TYPE_CHECKING:  # the message types only: at run time this module needs no generated code
    from google.protobuf.timestamp_pb2 import Timestamp

    from voiceassist.audit.v1.audit_pb2 import Checkpoint, Event

HASH_SIZE = 32
CANONICAL_VERSION = 1
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 6962: the hash of an empty tree
ZERO_CHAIN = bytes(HASH_SIZE)  # what the first event's chain hash chains from

_sha256 = hashlib.sha256
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_sorted = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode
# The same encoding without JSONEncoder's per-call Python overhead, where CPython's C encoder is present:
# VerifyIntegrity encodes every event of the ledger (a third of its time at a million events).
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # private to CPython's json: typeshed omits it
_c_encoder = (
    _c_make_encoder(None, None, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    if _c_make_encoder is not None
    else None
)


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    """The ledger's hash chain: SHA-256(previous chain hash || leaf hash)."""
    return _sha256(previous + leaf).digest()


def metadata_json(metadata: Mapping[str, str]) -> str:
    """The canonical text of an event's metadata map (keys sorted; keys are ASCII, so code points = UTF-16)."""
    return _json_sorted(dict(metadata))


def canonical_bytes(values: Sequence[Any]) -> bytes:
    """The canonical encoding of an event given its field values in canonical order (see the module doc)."""
    if _c_encoder is not None:
        return "".join(_c_encoder((CANONICAL_VERSION, *values), 0)).encode()
    return _json((CANONICAL_VERSION, *values)).encode()


def leaf_hashes(rows: Sequence[Sequence[Any]], width: int) -> list[bytes]:
    """The leaf hash of each row's first `width` values (an event's canonical values), in bulk."""
    if _c_encoder is None:
        return [leaf_hash(canonical_bytes(row[:width])) for row in rows]
    sha256, encode, version = _sha256, _c_encoder, CANONICAL_VERSION
    return [sha256(b"\x00" + "".join(encode((version, *row[:width]), 0)).encode()).digest() for row in rows]


def chain_hashes(previous: bytes, leaves: Sequence[bytes]) -> list[bytes]:
    """The chain hash after each of `leaves`, starting from `previous`."""
    chained = []
    for leaf in leaves:
        previous = _sha256(previous + leaf).digest()
        chained.append(previous)
    return chained


def timestamp_micros(stamp: Timestamp) -> int:
    """Microseconds since the epoch of a google.protobuf.Timestamp (the ledger keeps microseconds)."""
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def event_values(event: Event) -> tuple[Any, ...]:
    """The canonical field values of an audit_pb2.Event as returned by the audit service."""
    return (
        event.sequence,
        event.event_id,
        timestamp_micros(event.event_time),
        timestamp_micros(event.commit_time),
        event.actor.id,
        event.actor.email,
        event.actor.role,
        event.action,
        event.resource.type,
        event.resource.id,
        int(event.outcome),
        event.failure_reason,
        event.request_id,
        event.client_ip,
        event.user_agent,
        event.service,
        event.method,
        metadata_json(event.metadata),
        event.appended_by,
    )


def event_leaf_hash(event: Event) -> bytes:
    """The leaf hash of an audit_pb2.Event, recomputed from its fields (never read from `event.leaf_hash`)."""
    return leaf_hash(canonical_bytes(event_values(event)))


def _valid_hashes(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes | bytearray) and len(h) == HASH_SIZE for h in hashes)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of a list of leaf hashes (the definition, for small trees and tests)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(root_of(leaves[:split]), root_of(leaves[split:]))


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True when `proof` shows leaf hash `leaf` at zero-based `index` in the tree of `tree_size` whose root is
    `root` (RFC 9162 2.1.3.2)."""
    if not (0 <= index < tree_size) or not _valid_hashes(leaf, root, *proof):
        return False
    fn, sn, r = index, tree_size - 1, bytes(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """True when `proof` shows the tree of `old_size` leaves (root `old_root`) is a prefix of the tree of
    `new_size` leaves (root `new_root`) (RFC 9162 2.1.4.2)."""
    if not (0 <= old_size <= new_size) or not _valid_hashes(old_root, new_root, *proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of 2: the old root is itself a node of the new tree
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def key_id(public_key: bytes) -> str:
    """The id of a raw Ed25519 public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def checkpoint_text(origin: str, tree_size: int, root_hash: bytes, timestamp_us: int, signer: str) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    if "\n" in origin or not origin:
        raise ValueError("origin must be one non-empty line")
    root = base64.b64encode(root_hash).decode()
    return f"{origin}\n{tree_size}\n{root}\n{timestamp_us}\n{signer}\n".encode()


def verify_checkpoint(
    *,
    origin: str,
    tree_size: int,
    root_hash: bytes,
    timestamp_us: int,
    signer: str,
    signature: bytes,
    public_key: bytes,
    expected_origin: str | None = None,
) -> bool:
    """True when `signature` is the Ed25519 signature by `public_key` (whose id must be `signer`) of this
    checkpoint, and the checkpoint names `expected_origin` when one is given."""
    if expected_origin is not None and origin != expected_origin:
        return False
    if len(public_key) != 32 or key_id(public_key) != signer or not _valid_hashes(root_hash) or tree_size < 0:
        return False
    try:
        text = checkpoint_text(origin, tree_size, root_hash, timestamp_us, signer)
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, text)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_checkpoint_message(checkpoint: Checkpoint, public_key: bytes, expected_origin: str | None = None) -> bool:
    """`verify_checkpoint` for an audit_pb2.Checkpoint."""
    return verify_checkpoint(
        origin=checkpoint.origin,
        tree_size=checkpoint.tree_size,
        root_hash=checkpoint.root_hash,
        timestamp_us=timestamp_micros(checkpoint.timestamp),
        signer=checkpoint.key_id,
        signature=checkpoint.signature,
        public_key=public_key,
        expected_origin=expected_origin,
    )
