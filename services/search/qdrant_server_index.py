"""The vector store on a Qdrant server, through qdrant-client's async API (QDRANT_URL).

Any number of search processes can share the server. qdrant-client's local mode (":memory:" or a path) runs
the same calls in-process, which is how this adapter is tested here: no Qdrant server installs on this machine.
"""

from __future__ import annotations

from collections.abc import Mapping

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm

from services.search.embeddings import DIMENSIONS
from services.search.index import DENSE, KEYWORD_FIELDS, PENDING, READY, SPARSE, ChunkFilter, ChunkPoint, Hit, Mode
from services.search.index import SearchQuery as Query
from services.search.sparse import SparseVector


def _filter(chunks: ChunkFilter) -> qm.Filter:
    must: list[qm.Condition] = []
    for key, value in chunks.conditions():
        match = qm.MatchAny(any=value) if isinstance(value, list) else qm.MatchValue(value=value)
        must.append(qm.FieldCondition(key=key, match=match))
    return qm.Filter(must=must)


def _is_document(document_id: str) -> qm.FieldCondition:
    return qm.FieldCondition(key="document_id", match=qm.MatchValue(value=document_id))


def _sparse(vector: SparseVector) -> qm.SparseVector:
    return qm.SparseVector(indices=vector.indices, values=vector.values)


class ServerIndex:
    """VectorIndex on a Qdrant collection."""

    def __init__(self, location: str, collection: str, api_key: str | None = None, timeout: int = 10) -> None:
        # Local mode keeps no payload indexes (and warns about them): they are made on a server only.
        self._remote = location.startswith(("http://", "https://"))
        if self._remote:
            self._client = AsyncQdrantClient(url=location, api_key=api_key, timeout=timeout)
        elif location == ":memory:":
            self._client = AsyncQdrantClient(location=":memory:")
        else:
            self._client = AsyncQdrantClient(path=location)
        self._collection = collection

    async def open(self) -> None:
        if not await self._client.collection_exists(self._collection):
            await self._client.create_collection(
                self._collection,
                vectors_config={DENSE: qm.VectorParams(size=DIMENSIONS, distance=qm.Distance.COSINE)},
                sparse_vectors_config={SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF)},
            )
        for name in KEYWORD_FIELDS if self._remote else ():
            await self._client.create_payload_index(self._collection, name, qm.PayloadSchemaType.KEYWORD)

    async def upsert(self, points: list[ChunkPoint]) -> None:
        structs = [
            qm.PointStruct(
                id=p.id, vector={DENSE: p.dense, SPARSE: _sparse(p.sparse)}, payload={**p.payload, "state": PENDING}
            )
            for p in points
        ]
        await self._client.upsert(self._collection, structs, wait=True)

    async def existing(self, ids: list[str]) -> set[str]:
        records = await self._client.retrieve(self._collection, ids, with_payload=False, with_vectors=False)
        return {str(r.id) for r in records}

    async def publish(self, versions: Mapping[str, str]) -> None:
        these = qm.FieldCondition(key="version", match=qm.MatchAny(any=list(versions.values())))
        documents = qm.FieldCondition(key="document_id", match=qm.MatchAny(any=list(versions)))
        others = qm.Filter(must=[documents], must_not=[these])
        await self._client.delete(self._collection, qm.FilterSelector(filter=others), wait=True)
        await self._client.set_payload(self._collection, {"state": READY}, points=qm.Filter(must=[these]), wait=True)

    async def delete_document(self, document_id: str) -> None:
        everything = qm.Filter(must=[_is_document(document_id)])
        await self._client.delete(self._collection, qm.FilterSelector(filter=everything), wait=True)

    async def search(self, query: Query) -> list[Hit]:
        where = _filter(query.filter)
        dense = qm.NearestQuery(nearest=query.dense) if query.dense is not None else None
        sparse = qm.NearestQuery(nearest=_sparse(query.sparse)) if query.sparse is not None else None
        if query.mode is Mode.HYBRID:
            prefetch = max(query.prefetch, query.offset + query.limit)
            candidates = [(dense, DENSE), (sparse, SPARSE)]
            reply = await self._client.query_points(
                self._collection,
                prefetch=[qm.Prefetch(query=q, using=u, filter=where, limit=prefetch) for q, u in candidates if q],
                query=qm.RrfQuery(rrf=qm.Rrf(k=query.rrf_k)),
                limit=query.limit,
                offset=query.offset,
                with_payload=True,
            )
        else:
            chosen, using = (dense, DENSE) if query.mode is Mode.DENSE else (sparse, SPARSE)
            reply = await self._client.query_points(
                self._collection,
                query=chosen,
                using=using,
                query_filter=where,
                limit=query.limit,
                offset=query.offset,
                with_payload=True,
            )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in reply.points]

    async def count(self) -> int:
        return (await self._client.count(self._collection, exact=True)).count

    async def maintain(self) -> None:
        """The server optimises on its own."""

    async def close(self) -> None:
        await self._client.close()
