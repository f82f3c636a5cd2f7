"""The ledger's Merkle tree (RFC 6962) over stored hashes: the right frontier, roots and proofs at any size.

Only two kinds of hash are stored: every leaf (with its event) and the root of every complete, aligned subtree
whose height is a multiple of STRIDE (8): 1 in 256 leaves adds one stored node, so appends stay cheap. Any
other subtree hash is folded from at most 2**(STRIDE-1) stored hashes of the level below, so a proof or a root
at any tree size needs a handful of range reads however large the ledger grows.

Proofs are built in two steps: `inclusion_ranges` / `consistency_ranges` say which leaf ranges' hashes make up the
proof (RFC 6962 2.1.1 PATH and 2.1.2 SUBPROOF, a function of the sizes only), then `TreeReader` computes those
hashes from stored nodes fetched in one query.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.audit.ledger_proofs import EMPTY_ROOT, HASH_SIZE, node_hash

STRIDE = 8  # stored levels: 0 (leaves), 8, 16, 24, ...

Range = tuple[int, int]  # leaves [start, end), zero-based
# Fetches stored hashes for half-open index ranges at stored levels: {level: ranges} -> {level: {index: hash}}.
NodeFetcher = Callable[[dict[int, list[Range]]], Awaitable[dict[int, dict[int, bytes]]]]


def split_point(size: int) -> int:
    """The largest power of two smaller than `size` (RFC 6962's k), for size >= 2."""
    return 1 << ((size - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The leaf ranges whose subtree hashes form the audit path of leaf `index` in a tree of `size`, leaf first."""
    path: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = split_point(end - start)
        if index < start + k:
            path.append((start + k, end))
            end = start + k
        else:
            path.append((start, start + k))
            start += k
    path.reverse()
    return path


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """The leaf ranges whose subtree hashes form the consistency proof from `old_size` to `new_size`."""
    proof: list[Range] = []
    start, end, m, complete = 0, new_size, old_size, True
    while True:
        if m == end - start:
            if not complete:
                proof.append((start, end))
            break
        k = split_point(end - start)
        if m <= k:
            proof.append((start + k, end))
            end = start + k
        else:
            proof.append((start, start + k))
            m -= k
            start += k
            complete = False
    proof.reverse()
    return proof


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The complete aligned subtrees (level, index) whose roots combine into MTH(leaves[start:end]) by RFC 6962's
    split, left to right. `start` must be aligned as RFC 6962's recursion aligns it."""
    found: list[tuple[int, int]] = []
    while start < end:
        size = end - start
        level = size.bit_length() - 1 if size & (size - 1) == 0 else split_point(size).bit_length() - 1
        if start % (1 << level):
            raise ValueError(f"range [{start}, {end}) is not RFC 6962 aligned")
        found.append((level, start >> level))
        start += 1 << level
    return found


def combine(roots: Sequence[bytes]) -> bytes:
    """MTH of a range from the roots of its perfect subtrees (as listed by `perfect_subtrees`)."""
    if not roots:
        return EMPTY_ROOT
    result = roots[-1]
    for left in reversed(roots[:-1]):
        result = node_hash(left, result)
    return result


def fold_level(hashes: Sequence[bytes]) -> list[bytes]:
    """The level above a complete run of an even number of sibling hashes."""
    return [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]


def fold_perfect(hashes: Sequence[bytes]) -> bytes:
    """The root of a perfect subtree given all its nodes at one level (a power-of-two count)."""
    level = list(hashes)
    while len(level) > 1:
        level = fold_level(level)
    return level[0]


def _merge(ranges: Iterable[Range]) -> list[Range]:
    merged: list[Range] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class MissingNode(Exception):
    """A stored hash the tree needs is not in the database (the ledger was damaged)."""

    def __init__(self, level: int, index: int) -> None:
        super().__init__(f"a stored hash under level {level} index {index} is missing")
        self.first_sequence = index * (1 << level) + 1  # the first event the missing hash covers


class TreeReader:
    """Computes subtree hashes of the stored tree with one read of stored nodes per batch of requests."""

    def __init__(self, fetch: NodeFetcher) -> None:
        self._fetch = fetch

    async def range_hashes(self, ranges: Sequence[Range]) -> list[bytes]:
        """MTH(leaves[start:end]) for each range."""
        plans = [perfect_subtrees(start, end) for start, end in ranges]
        wanted = {node for plan in plans for node in plan}
        roots = await self._perfect_roots(wanted)
        return [combine([roots[node] for node in plan]) for plan in plans]

    async def _perfect_roots(self, nodes: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        # Each node's root folds from the stored level at or below it.
        by_base: dict[int, list[Range]] = {}
        for level, index in nodes:
            base = level - level % STRIDE
            width = 1 << (level - base)
            by_base.setdefault(base, []).append((index * width, (index + 1) * width))
        stored = await self._fetch({base: _merge(ranges) for base, ranges in by_base.items()}) if by_base else {}
        roots = {}
        for level, index in nodes:
            base = level - level % STRIDE
            width = 1 << (level - base)
            try:
                children = [stored.get(base, {})[i] for i in range(index * width, (index + 1) * width)]
            except KeyError:
                raise MissingNode(level, index) from None
            roots[(level, index)] = fold_perfect(children)
        return roots


@dataclass
class Frontier:
    """The roots of the perfect subtrees that make up the tree so far (one per set bit of `size`, largest first):
    enough to append leaves and to compute the current root without reading anything."""

    size: int = 0
    hashes: list[bytes] = field(default_factory=list)

    @classmethod
    def decode(cls, size: int, packed: bytes) -> Frontier:
        """The frontier stored as concatenated hashes."""
        hashes = [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
        if len(hashes) != size.bit_count():
            raise ValueError(f"frontier of {len(hashes)} hashes cannot describe a tree of {size} leaves")
        return cls(size, hashes)

    def encode(self) -> bytes:
        """Concatenated hashes, for storage."""
        return b"".join(self.hashes)

    def copy(self) -> Frontier:
        """An independent copy."""
        return Frontier(self.size, list(self.hashes))

    def append(self, leaf: bytes, completed: list[tuple[int, int, bytes]] | None = None) -> None:
        """Add one leaf. Each perfect subtree this completes at a stored level (8, 16, ...) is appended to
        `completed` as (level, index, hash)."""
        self._push(leaf, 0, completed)

    def extend(self, leaves: Sequence[bytes], completed: list[tuple[int, int, bytes]] | None = None) -> None:
        """Add leaves in order (as `append` would, faster: whole aligned 256-leaf blocks fold level by level)."""
        block, i = 1 << STRIDE, 0
        while i < len(leaves):
            if self.size % block == 0 and len(leaves) - i >= block:
                self._push(fold_perfect(leaves[i : i + block]), STRIDE, completed)
                i += block
            else:
                self._push(leaves[i], 0, completed)
                i += 1

    def _push(self, value: bytes, level: int, completed: list[tuple[int, int, bytes]] | None) -> None:
        # Adds a perfect subtree of 2**level leaves; the tree's size must be a multiple of that.
        size = self.size + (1 << level)
        if completed is not None and level and level % STRIDE == 0:
            completed.append((level, (size >> level) - 1, value))
        while size >> level & 1 == 0:  # the bit for this level was set before: merge with that subtree
            value = node_hash(self.hashes.pop(), value)
            level += 1
            if completed is not None and level % STRIDE == 0:
                completed.append((level, (size >> level) - 1, value))
        self.hashes.append(value)
        self.size = size

    def root(self) -> bytes:
        """The current tree's root hash."""
        return combine(self.hashes)


def subtree_levels(size: int) -> list[int]:
    """The levels of the frontier's subtrees for a tree of `size` leaves, largest first."""
    return [level for level in range(size.bit_length() - 1, -1, -1) if size >> level & 1]


async def frontier_at(reader: TreeReader, size: int) -> Frontier:
    """The frontier of the stored tree at `size` leaves (to continue a computation from there)."""
    ranges = []
    start = 0
    for level in subtree_levels(size):
        ranges.append((start, start + (1 << level)))
        start += 1 << level
    return Frontier(size, await reader.range_hashes(ranges))
