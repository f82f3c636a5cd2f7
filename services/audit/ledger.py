"""The append-only ledger: numbering and hashing events, roots and proofs at any tree size.

Every append is one transaction holding the head row's lock: it skips event ids already committed, numbers the
new events after the head (a gapless sequence even with several consumers), computes each leaf hash from the
canonical encoding (services/audit/ledger_proofs.py), chains it, extends the Merkle frontier and stores the
subtrees it completes. The hashes are the same code a client's verifier runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from services.audit.events import NewEvent, now_micros
from services.audit.ledger_proofs import EMPTY_ROOT, chain_hashes, leaf_hashes
from services.audit.merkle import Frontier, MissingNode, TreeReader, consistency_ranges, inclusion_ranges
from services.audit.store import CANONICAL_COLUMNS, AuditStore, Head
from services.core.errors import Reason, ServiceError, invalid


@dataclass(frozen=True)
class AppendResult:
    """What one append did."""

    committed: int
    duplicates: int
    tree_size: int
    root_hash: bytes


@dataclass(frozen=True)
class InclusionProof:
    """An RFC 6962 audit path."""

    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    hashes: list[bytes]
    root_hash: bytes


@dataclass(frozen=True)
class ConsistencyProof:
    """An RFC 6962 consistency proof."""

    old_size: int
    new_size: int
    hashes: list[bytes]
    old_root: bytes
    new_root: bytes


def damaged(exc: MissingNode) -> ServiceError:
    """LEDGER_DAMAGED for a proof the stored tree can no longer give."""
    return ServiceError(
        Reason.LEDGER_DAMAGED,
        f"the ledger is damaged ({exc}); run VerifyIntegrity",
        metadata={"first_sequence": str(exc.first_sequence)},
    )


def out_of_range(field: str, message: str, tree_size: int) -> ServiceError:
    """OUT_OF_RANGE for a size or sequence beyond the tree, saying how big the tree is."""
    return ServiceError(Reason.OUT_OF_RANGE, f"{field}: {message}", metadata={"tree_size": str(tree_size)})


class Ledger:
    """Appends, roots and proofs."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.reader = TreeReader(store.stored_nodes)
        self._lock = asyncio.Lock()  # one append at a time per process; the head row lock orders processes

    async def append(self, events: Sequence[NewEvent]) -> AppendResult:
        """Commit `events` in order, skipping any whose event id is already in the ledger (or earlier in the
        batch). All or nothing."""
        async with self._lock, self.store.append_transaction() as txn:
            seen = await txn.known_event_ids(list({e.event_id for e in events}))
            fresh = []
            for event in events:
                if event.event_id not in seen:
                    seen.add(event.event_id)
                    fresh.append(event)
            frontier = Frontier.decode(txn.head.tree_size, txn.head.frontier)
            commit_time = now_micros()
            values = [
                (
                    frontier.size + 1 + i, e.event_id, e.event_time_us, commit_time, e.actor_id, e.actor_email,
                    e.actor_role, e.action, e.resource_type, e.resource_id, e.outcome, e.failure_reason,
                    e.request_id, e.client_ip, e.user_agent, e.service, e.method, e.metadata, e.appended_by,
                )
                for i, e in enumerate(fresh)
            ]  # fmt: skip
            leaves = leaf_hashes(values, len(CANONICAL_COLUMNS))
            chains = chain_hashes(txn.head.chain_hash, leaves)
            nodes: list[tuple[int, int, bytes]] = []
            frontier.extend(leaves, nodes)
            rows = [(*v, leaf, chain) for v, leaf, chain in zip(values, leaves, chains, strict=True)]
            if rows:
                await txn.write(rows, nodes, Head(frontier.size, chains[-1], frontier.encode()))
        return AppendResult(len(rows), len(events) - len(rows), frontier.size, frontier.root())

    async def head(self) -> Head:
        """The committed head."""
        return await self.store.head()

    async def root_at(self, tree_size: int, head: Head | None = None) -> bytes:
        """The root of the tree of the first `tree_size` events."""
        head = head or await self.store.head()
        if tree_size == head.tree_size:
            return Frontier.decode(head.tree_size, head.frontier).root()
        if tree_size == 0:
            return EMPTY_ROOT
        try:
            [root] = await self.reader.range_hashes([(0, tree_size)])
        except MissingNode as exc:
            raise damaged(exc) from None
        return root

    async def _size(self, requested: int, field: str) -> tuple[int, Head]:
        head = await self.store.head()
        if requested < 0:
            raise invalid(field, "must not be negative")
        if requested > head.tree_size:
            raise out_of_range(field, f"the ledger holds {head.tree_size} events", head.tree_size)
        return requested or head.tree_size, head

    async def inclusion_proof(self, sequence: int, tree_size: int) -> InclusionProof:
        """The audit path of event `sequence` in the tree of `tree_size` events (0: the current tree)."""
        if sequence <= 0:
            raise invalid("sequence", "required; sequence numbers start at 1")
        size, head = await self._size(tree_size, "tree_size")
        if sequence > size:
            raise out_of_range("sequence", f"the tree of size {size} does not contain event {sequence}", size)
        index = sequence - 1
        leaf, path, root = await self._proof((index, sequence), inclusion_ranges(index, size), size, head)
        return InclusionProof(index, size, leaf, path, root)

    async def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof:
        """The proof that the tree of `old_size` events is a prefix of the tree of `new_size` (0: current)."""
        if old_size <= 0:
            raise invalid("old_size", "required; at least 1")
        size, head = await self._size(new_size, "new_size")
        if old_size > size:
            raise out_of_range("old_size", f"larger than new_size {size}", size)
        old_root, path, root = await self._proof((0, old_size), consistency_ranges(old_size, size), size, head)
        return ConsistencyProof(old_size, size, path, old_root, root)

    async def _proof(
        self, subject: tuple[int, int], path: list[tuple[int, int]], size: int, head: Head
    ) -> tuple[bytes, list[bytes], bytes]:
        """The hash of `subject`, the proof hashes and the root of the tree of `size`, in one read of stored
        nodes (the current root comes from the head)."""
        current = size == head.tree_size
        try:
            hashes = await self.reader.range_hashes([subject, *path, *([] if current else [(0, size)])])
        except MissingNode as exc:
            raise damaged(exc) from None
        root = await self.root_at(size, head) if current else hashes[-1]
        return hashes[0], hashes[1 : len(path) + 1], root
