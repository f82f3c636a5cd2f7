"""The ledger's tree over stored nodes: the frontier, the proof structure and range reads agree with RFC 6962's
definition for every size, and their proofs verify with the independent verifier."""

from __future__ import annotations

import hashlib

import pytest

from services.audit import ledger_proofs as lp
from services.audit import merkle

LEAVES = [lp.leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(600)]


def _reference_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 2.1.1 PATH, recursively from the definition."""
    if len(leaves) <= 1:
        return []
    k = merkle.split_point(len(leaves))
    if index < k:
        return [*_reference_path(index, leaves[:k]), lp.root_of(leaves[k:])]
    return [*_reference_path(index - k, leaves[k:]), lp.root_of(leaves[:k])]


def _reference_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """RFC 6962 2.1.2 SUBPROOF, recursively from the definition."""
    if m == len(leaves):
        return [] if complete else [lp.root_of(leaves)]
    k = merkle.split_point(len(leaves))
    if m <= k:
        return [*_reference_subproof(m, leaves[:k], complete), lp.root_of(leaves[k:])]
    return [*_reference_subproof(m - k, leaves[k:], False), lp.root_of(leaves[:k])]


class StoredTree:
    """What the database holds: leaves and the complete subtrees at stored levels, built by Frontier.append."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.frontier = merkle.Frontier()
        self.nodes: dict[int, dict[int, bytes]] = {0: {}}
        self.fetches = 0
        for i, leaf in enumerate(leaves):
            completed: list[tuple[int, int, bytes]] = []
            self.frontier.append(leaf, completed)
            self.nodes[0][i] = leaf
            for level, index, value in completed:
                self.nodes.setdefault(level, {})[index] = value

    async def fetch(self, wanted: dict[int, list[tuple[int, int]]]) -> dict[int, dict[int, bytes]]:
        self.fetches += 1
        found = {}
        for level, ranges in wanted.items():
            stored = self.nodes.get(level, {})
            found[level] = {i: stored[i] for start, end in ranges for i in range(start, end) if i in stored}
        return found


def test_frontier_root_matches_the_definition_at_every_size() -> None:
    frontier = merkle.Frontier()
    for size in range(1, 300):
        frontier.append(LEAVES[size - 1])
        assert frontier.root() == lp.root_of(LEAVES[:size]), size
        assert merkle.Frontier.decode(size, frontier.encode()).root() == frontier.root()


def test_frontier_emits_each_stored_level_node_once_with_the_right_hash() -> None:
    tree = StoredTree(LEAVES[:600])
    assert sorted(tree.nodes) == [0, 8]
    assert sorted(tree.nodes[8]) == [0, 1]  # 600 leaves hold two complete 256-leaf subtrees
    assert tree.nodes[8][1] == lp.root_of(LEAVES[256:512])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 255, 256, 257, 300, 513, 600])
async def test_inclusion_proofs_from_stored_nodes_match_the_definition_and_verify(size: int) -> None:
    tree = StoredTree(LEAVES[:size])
    reader = merkle.TreeReader(tree.fetch)
    root = lp.root_of(LEAVES[:size])
    for index in {0, min(1, size - 1), size // 2, size - 1}:
        proof = await reader.range_hashes(merkle.inclusion_ranges(index, size))
        assert proof == _reference_path(index, LEAVES[:size])
        assert lp.verify_inclusion(LEAVES[index], index, size, proof, root)


@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 8), (6, 8), (3, 7), (7, 300), (255, 256), (256, 600), (300, 513)])
async def test_consistency_proofs_from_stored_nodes_match_the_definition_and_verify(old: int, new: int) -> None:
    tree = StoredTree(LEAVES[:new])
    reader = merkle.TreeReader(tree.fetch)
    proof = await reader.range_hashes(merkle.consistency_ranges(old, new))
    assert proof == _reference_subproof(old, LEAVES[:new], True)
    assert lp.verify_consistency(old, new, lp.root_of(LEAVES[:old]), lp.root_of(LEAVES[:new]), proof)


async def test_a_proof_and_a_root_take_one_read() -> None:
    tree = StoredTree(LEAVES)
    reader = merkle.TreeReader(tree.fetch)
    await reader.range_hashes([*merkle.inclusion_ranges(301, 599), (0, 599)])
    assert tree.fetches == 1


async def test_root_and_frontier_at_an_older_size_come_from_stored_nodes() -> None:
    tree = StoredTree(LEAVES)
    reader = merkle.TreeReader(tree.fetch)
    for size in (1, 5, 256, 299, 512, 599):
        frontier = await merkle.frontier_at(reader, size)
        assert frontier.root() == lp.root_of(LEAVES[:size])
        [root] = await reader.range_hashes([(0, size)])
        assert root == frontier.root()


async def test_a_missing_stored_node_is_reported() -> None:
    tree = StoredTree(LEAVES[:300])
    del tree.nodes[8][0]
    with pytest.raises(merkle.MissingNode):
        await merkle.TreeReader(tree.fetch).range_hashes([(0, 300)])


@pytest.mark.parametrize(("before", "count"), [(0, 600), (3, 600), (255, 300), (256, 513), (100, 1)])
def test_extend_equals_appending_one_leaf_at_a_time(before: int, count: int) -> None:
    one, many = merkle.Frontier(), merkle.Frontier()
    one_nodes: list[tuple[int, int, bytes]] = []
    many_nodes: list[tuple[int, int, bytes]] = []
    for leaf in LEAVES[:before]:
        one.append(leaf)
        many.append(leaf)
    for leaf in LEAVES[before : before + count]:
        one.append(leaf, one_nodes)
    many.extend(LEAVES[before : before + count], many_nodes)
    assert many == one and many_nodes == one_nodes
