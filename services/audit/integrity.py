"""VerifyIntegrity: recompute the ledger from its events and report the first thing that does not match.

For every event in the range: the sequence has no gap, the leaf hash recomputed from the stored fields equals the
stored leaf hash (catches an edited event), and the chain hash follows from the previous one (catches a removed,
inserted or reordered event). The recomputed leaves rebuild the tree: every stored Merkle node must match its
leaves, and every signed checkpoint inside the range must have the recomputed root and a valid signature (catches
an edit whose hashes were recomputed too). Rows are read in batches, so memory stays flat at any ledger size.

This is the server checking itself against its own signing keys; a client that keeps checkpoints and the public
key checks the server with services/audit/ledger_proofs.py instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.audit.ledger import Ledger, out_of_range
from services.audit.ledger_proofs import ZERO_CHAIN, chain_hashes, leaf_hashes, verify_checkpoint
from services.audit.merkle import Frontier, MissingNode, frontier_at
from services.audit.store import CANONICAL_COLUMNS, CheckpointRow
from services.core.errors import invalid

BATCH = 20_000  # rows per read
_FIELDS = len(CANONICAL_COLUMNS)  # a scanned row: the canonical columns, then leaf hash and chain hash


@dataclass(frozen=True)
class IntegrityReport:
    """The outcome of one verification."""

    ok: bool
    checked: int
    first_bad_sequence: int = 0
    problem: str = ""
    tree_size: int = 0
    root_hash: bytes = b""
    checkpoints_checked: int = 0


def _first(found: Callable[[int], bool]) -> int:
    index = 0
    while not found(index):
        index += 1
    return index


def _first_difference(computed: list[bytes], stored: list[bytes]) -> int:
    """The index of the first difference, or the length when there is none."""
    if computed == stored:
        return len(computed)
    return _first(lambda i: computed[i] != stored[i])


class _Mismatch(Exception):
    def __init__(self, sequence: int, problem: str) -> None:
        super().__init__(problem)
        self.sequence = sequence
        self.problem = problem


class IntegrityCheck:
    """One run over [first, last]; `run()` returns the report."""

    def __init__(self, ledger: Ledger, public_keys: dict[str, bytes], origin: str) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self._keys = public_keys
        self._origin = origin
        self.checked = 0
        self.checkpoints_checked = 0
        self._last_good_checkpoint = 0

    async def run(self, first: int, last: int, progress: Callable[[int], None] | None = None) -> IntegrityReport:
        """Verify events first..last (0, 0: the whole ledger)."""
        head = await self._store.head()
        if first < 0 or last < 0:
            raise invalid("start_sequence" if first < 0 else "end_sequence", "must not be negative")
        first, last = max(first, 1), last or head.tree_size
        if last > head.tree_size:
            raise out_of_range("end_sequence", f"the ledger holds {head.tree_size} events", head.tree_size)
        if head.tree_size == 0:
            return IntegrityReport(ok=True, checked=0, tree_size=0, root_hash=await self._ledger.root_at(0, head))
        if first > last:
            raise invalid("end_sequence", "must not be smaller than start_sequence")
        try:
            frontier = await frontier_at(self._ledger.reader, first - 1)
        except MissingNode as exc:
            return IntegrityReport(False, 0, exc.first_sequence, str(exc), tree_size=first - 1)
        before = await self._store.scan(first - 1, first - 1) if first > 1 else [(ZERO_CHAIN,)]
        if not before:
            return IntegrityReport(False, 0, first - 1, f"event {first - 1} is missing", tree_size=first - 1)
        chain = before[0][-1]
        checkpoints = await self._store.checkpoints_between(first, last)
        self._last_good_checkpoint = first - 1
        try:
            pending = asyncio.ensure_future(self._store.scan(first, min(last, first + BATCH - 1)))
            for start in range(first, last + 1, BATCH):
                rows = await pending
                end = min(last, start + BATCH - 1)
                if end < last:  # the next read runs while this batch is hashed
                    pending = asyncio.ensure_future(self._store.scan(end + 1, min(last, end + BATCH)))
                    await asyncio.sleep(0)
                completed: list[tuple[int, int, bytes]] = []
                chain = self._check_rows(rows, start, end, chain, frontier, completed, checkpoints)
                await self._check_nodes(completed)
                if progress is not None:
                    progress(self.checked)
            if last == head.tree_size and (chain != head.chain_hash or frontier.encode() != head.frontier):
                raise _Mismatch(last, "the ledger head does not match the recomputed chain and tree")
        except _Mismatch as bad:
            if not pending.done():
                pending.cancel()
            return IntegrityReport(False, self.checked, bad.sequence, bad.problem, frontier.size, frontier.root(),
                                   self.checkpoints_checked)  # fmt: skip
        return IntegrityReport(True, self.checked, 0, "", frontier.size, frontier.root(), self.checkpoints_checked)

    def _check_rows(
        self,
        rows: Sequence[Sequence[Any]],
        start: int,
        end: int,
        chain: bytes,
        frontier: Frontier,
        completed: list[tuple[int, int, bytes]],
        checkpoints: list[CheckpointRow],
    ) -> bytes:
        # Sequence numbers are unique and sorted, so there is no gap when the last one is where it should be.
        count = len(rows)
        in_order = count if not rows or rows[-1][0] == start + count - 1 else _first(lambda i: rows[i][0] != start + i)
        leaves = leaf_hashes(rows[:in_order], _FIELDS)
        chains = chain_hashes(chain, leaves)
        bad_leaf = _first_difference(leaves, [row[_FIELDS] for row in rows[:in_order]])
        bad_chain = _first_difference(chains, [row[_FIELDS + 1] for row in rows[:in_order]])
        good = min(bad_leaf, bad_chain)
        # The tree grows by the events that passed, so a checkpoint before a bad event is still checked first.
        self._grow(frontier, leaves[:good], completed, checkpoints)
        if good < in_order:
            problem = (
                "leaf hash does not match the stored event"
                if bad_leaf == good
                else ("chain hash does not follow from the previous event and this leaf")
            )
            raise _Mismatch(start + good, problem)
        if in_order < count:
            missing = start + in_order
            raise _Mismatch(missing, f"event {missing} is missing (the next stored event is {rows[in_order][0]})")
        if start + count <= end:
            raise _Mismatch(start + count, f"event {start + count} is missing")
        return chains[-1] if chains else chain

    def _grow(
        self,
        frontier: Frontier,
        leaves: list[bytes],
        completed: list[tuple[int, int, bytes]],
        checkpoints: list[CheckpointRow],
    ) -> None:
        done = 0
        while checkpoints and checkpoints[0].tree_size <= frontier.size + len(leaves) - done:
            upto = checkpoints[0].tree_size - frontier.size + done
            frontier.extend(leaves[done:upto], completed)
            done = upto
            self._check_checkpoint(checkpoints.pop(0), frontier)
        frontier.extend(leaves[done:], completed)
        self.checked += len(leaves)

    def _check_checkpoint(self, checkpoint: CheckpointRow, frontier: Frontier) -> None:
        size = checkpoint.tree_size
        public_key = self._keys.get(checkpoint.key_id)
        signed = public_key is not None and verify_checkpoint(
            origin=checkpoint.origin,
            tree_size=size,
            root_hash=checkpoint.root_hash,
            timestamp_us=checkpoint.timestamp_us,
            signer=checkpoint.key_id,
            signature=checkpoint.signature,
            public_key=public_key,
            expected_origin=self._origin,
        )
        if not signed:
            raise _Mismatch(size, f"the checkpoint at tree size {size} has no valid signature")
        if frontier.root() != checkpoint.root_hash:
            raise _Mismatch(
                self._last_good_checkpoint + 1,
                f"the signed checkpoint at tree size {size} has another root: events "
                f"{self._last_good_checkpoint + 1}-{size} were changed after it was signed",
            )
        self.checkpoints_checked += 1
        self._last_good_checkpoint = size

    async def _check_nodes(self, completed: list[tuple[int, int, bytes]]) -> None:
        by_level: dict[int, dict[int, bytes]] = {}
        for level, index, value in completed:
            by_level.setdefault(level, {})[index] = value
        if not by_level:
            return
        stored = await self._store.stored_nodes({lv: [(min(c), max(c) + 1)] for lv, c in by_level.items()})
        for level, computed in by_level.items():
            for index in sorted(computed):
                if stored[level].get(index) != computed[index]:
                    raise _Mismatch(
                        index * (1 << level) + 1,
                        f"stored Merkle node (level {level}, index {index}) does not match events "
                        f"{index * (1 << level) + 1}-{(index + 1) * (1 << level)}",
                    )
