"""The embedded vector store: Qdrant's engine in this process (qdrant-edge-py), one shard under DATA_DIR.

The shard keeps a write-ahead log and recovers from it after a crash (an interrupted job re-checks which of its
chunks are stored, so whatever the log had not written yet is simply embedded again). The engine locks its folder,
so a second process pointed at the same DATA_DIR fails at start-up instead of corrupting it (several search
processes need a Qdrant server: QDRANT_URL). Calls run in worker threads, so the event loop never waits on the
engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path

import qdrant_edge as qe

from services.search.embeddings import DIMENSIONS
from services.search.index import DENSE, KEYWORD_FIELDS, PENDING, READY, SPARSE, ChunkFilter, ChunkPoint, Hit, Mode
from services.search.index import SearchQuery as Query
from services.search.sparse import SparseVector

# Building the HNSW graph pays off only once plain segments hold this many unindexed points.
OPTIMIZE_AFTER_POINTS = 2000


class IndexLocked(RuntimeError):
    """Another process holds the embedded index."""


def _filter(chunks: ChunkFilter) -> qe.Filter:
    must: list[qe.ConditionType] = []
    for key, value in chunks.conditions():
        match = qe.MatchAny(value) if isinstance(value, list) else qe.MatchValue(value)
        must.append(qe.FieldCondition(key, match=match))
    return qe.Filter(must=must)


def _is_document(document_id: str) -> qe.FieldCondition:
    return qe.FieldCondition("document_id", match=qe.MatchValue(document_id))


def _sparse(vector: SparseVector) -> qe.SparseVector:
    return qe.SparseVector(vector.indices, vector.values)


class EdgeIndex:
    """VectorIndex on an in-process Qdrant shard."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._shard: qe.EdgeShard | None = None
        self._unoptimized = 0
        self._maintenance = asyncio.Lock()

    @property
    def shard(self) -> qe.EdgeShard:
        """The open shard."""
        if self._shard is None:
            raise RuntimeError("index not open")
        return self._shard

    async def open(self) -> None:
        self._shard = await asyncio.to_thread(self._open)

    def _open(self) -> qe.EdgeShard:
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=DIMENSIONS, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        try:
            if (self._path / "edge_config.json").exists() or any(self._path.glob("segments/*")):
                shard = qe.EdgeShard.load(str(self._path), config)
            else:
                self._path.mkdir(parents=True, exist_ok=True)
                shard = qe.EdgeShard.create(str(self._path), config)
        except Exception as exc:
            if "WouldBlock" in str(exc):
                raise IndexLocked(
                    f"the embedded index at {self._path} is open in another process; run one search process per "
                    "DATA_DIR, or set QDRANT_URL to share a Qdrant server between several"
                ) from None
            raise
        schema = shard.info().payload_schema
        for name in KEYWORD_FIELDS:
            if name not in schema:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
        return shard

    async def upsert(self, points: list[ChunkPoint]) -> None:
        records = [
            qe.Point(p.id, {DENSE: p.dense, SPARSE: _sparse(p.sparse)}, {**p.payload, "state": PENDING}) for p in points
        ]
        await asyncio.to_thread(self.shard.update, qe.UpdateOperation.upsert_points(records))
        self._unoptimized += len(points)

    async def existing(self, ids: list[str]) -> set[str]:
        records = await asyncio.to_thread(self.shard.retrieve, list(ids), False, False)
        return {str(r.id) for r in records}

    async def publish(self, versions: Mapping[str, str]) -> None:
        these = qe.FieldCondition("version", match=qe.MatchAny(list(versions.values())))
        documents = qe.FieldCondition("document_id", match=qe.MatchAny(list(versions)))
        others = qe.UpdateOperation.delete_points_by_filter(qe.Filter(must=[documents], must_not=[these]))
        ready = qe.UpdateOperation.set_payload_by_filter(qe.Filter(must=[these]), {"state": READY})
        await asyncio.to_thread(self._apply, others, ready)

    def _apply(self, *operations: qe.UpdateOperation) -> None:
        for operation in operations:
            self.shard.update(operation)

    async def delete_document(self, document_id: str) -> None:
        everything = qe.Filter(must=[_is_document(document_id)])
        await asyncio.to_thread(self.shard.update, qe.UpdateOperation.delete_points_by_filter(everything))

    async def search(self, query: Query) -> list[Hit]:
        where = _filter(query.filter)
        depth = query.offset + query.limit
        dense = qe.Query.Nearest(query.dense, using=DENSE) if query.dense is not None else None
        sparse = qe.Query.Nearest(_sparse(query.sparse), using=SPARSE) if query.sparse is not None else None
        if query.mode is Mode.HYBRID:
            prefetch = max(query.prefetch, depth)
            request = qe.QueryRequest(
                limit=query.limit,
                offset=query.offset,
                prefetches=[
                    qe.Prefetch(limit=prefetch, query=q, filter=where) for q in (dense, sparse) if q is not None
                ],
                # qdrant-edge's stubs declare Fusion.Rrf apart from Fusion; at run time it is a Fusion.
                query=qe.Fusion.Rrf(k=query.rrf_k),  # type: ignore[arg-type]
                with_payload=True,
            )
        else:
            request = qe.QueryRequest(
                limit=query.limit,
                offset=query.offset,
                query=dense if query.mode is Mode.DENSE else sparse,
                filter=where,
                with_payload=True,
            )
        points = await asyncio.to_thread(self.shard.query, request)
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points]

    async def count(self) -> int:
        return await asyncio.to_thread(self.shard.count, qe.CountRequest(exact=True))

    async def maintain(self) -> None:
        """Build the HNSW graph and merge segments once enough points arrived since the last time. The engine holds
        the GIL meanwhile (the whole process pauses), so the workers call this only when indexing is quiet."""
        if self._unoptimized < OPTIMIZE_AFTER_POINTS or self._maintenance.locked():
            return
        async with self._maintenance:
            self._unoptimized = 0
            await asyncio.to_thread(self.shard.optimize)

    async def close(self) -> None:
        if self._shard is not None:
            shard, self._shard = self._shard, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(shard.flush)
            await asyncio.to_thread(shard.close)
