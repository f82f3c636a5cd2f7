"""The peer the mesh is measured against: the seed's monolith stack (FastAPI + uvicorn with uvloop and httptools)
doing the same work as each measured mesh call, with the same libraries and the same code below the transport.

- `GET /v1/users/me`: the access token checked by the same verifier (PyJWT, EdDSA; revocation MGET in Redis) and
  the account read with SQLAlchemy async + asyncpg from the same table, as the seed did: the signature checked on
  every call and an ORM identity load in a session. The mesh's own levers below the transport (its verified-token
  cache, its Core read outside a transaction) are what the issue asks of the mesh, so the peer stays the seed.

- `POST /v1/search` (when `PEER_INDEX` names a copy of the search service's index): the same check of the token,
  then the search service's own retrieval code in this process (hybrid: the query embedded by the same ONNX model,
  BM25, fused by Qdrant's engine) on the same index.

- `POST /v1/conversations/{id}:ask` (with the index): the same check of the token, then the rag service's own
  answering code in this process (PHI scan, retrieval from the index above, the extractive answer, the turn stored
  in the rag schema, audit events to the Redis stream), the search in-process instead of over gRPC.

Settings come from the same environment variables as the mesh's processes; the public keys from `PEER_JWKS` (the
auth service's JWKS as JSON, handed over by the benchmark). Run by `bench/hot_path_bench.py`, never by `make run`:
    uvicorn bench.peer.app:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from google.protobuf.json_format import MessageToDict, ParseDict
from pydantic import BaseModel, Field

from services.auth.store import UserRow
from services.core.audit_client import AuditClient, RedisStreamSink
from services.core.context import Caller
from services.core.db import Database
from services.core.errors import ServiceError
from services.core.redis_store import RedisConnection
from services.core.revocation import RedisRevocationList
from services.core.settings import core_settings
from services.core.tokens import JwtVerifier, KeySet
from services.rag.retrieval import Passage
from services.rag.server import Answering, answer_message, build_answering, question_from
from services.rag.settings import rag_settings
from services.search.edge_index import EdgeIndex
from services.search.embeddings import Embedder
from services.search.index import ChunkFilter, Mode
from services.search.retrieval import Retriever
from services.search.settings import search_settings
from services.search.sparse import Bm25Encoder
from voiceassist.rag.v1 import rag_pb2

settings = core_settings()
_jwks: list[dict[str, Any]] = json.loads(os.environ.get("PEER_JWKS", "[]"))


async def _fetch_jwks() -> list[dict[str, Any]]:
    return _jwks


redis = RedisConnection(settings.redis_url, settings.redis_key_prefix, settings.redis_timeout_seconds)
verifier = JwtVerifier(
    KeySet(_fetch_jwks),
    RedisRevocationList(redis),
    issuer=settings.jwt_issuer,
    audience=settings.jwt_audience,
    leeway=settings.jwt_leeway_seconds,
    fail_closed=settings.auth_fail_closed,
)
database = Database("auth", settings)


class InProcessSearch:
    """rag's Retriever over the search code in this process (the mesh's rag asks the search service)."""

    def __init__(self, search: Retriever) -> None:
        self._search = search

    async def retrieve(self, query: str, specialty: str, limit: int) -> list[Passage]:
        found = await self._search.search(query, Mode.HYBRID, ChunkFilter(specialty=specialty), limit, "")
        return [Passage(r.document_id, r.title, r.chunk_id, r.snippet, r.page, r.score) for r in found.results]


retriever: Retriever | None = None
answering: Answering | None = None


@asynccontextmanager
async def lifespan(_app: FastAPI):
    global retriever, answering
    index = None
    if os.environ.get("PEER_INDEX"):
        search = search_settings()
        index = EdgeIndex(Path(os.environ["PEER_INDEX"]))
        await index.open()
        retriever = Retriever(
            index,
            Embedder(search.query_embed_threads, batch_size=1),
            Bm25Encoder(search.bm25_k, search.bm25_b, search.bm25_avg_len),
            prefetch=search.prefetch_limit,
            rrf_k=search.rrf_k,
            snippet_chars=search.snippet_chars,
        )
        audit = AuditClient("rag", RedisStreamSink(redis, settings.audit_buffer_max_events))
        answering = await build_answering(rag_settings(), settings, audit, InProcessSearch(retriever))
    yield
    if index is not None:
        await answering.close()
        await index.close()
    await database.close()
    await redis.close()


app = FastAPI(lifespan=lifespan)


async def caller(authorization: str = Header("")) -> Caller:
    """The verified caller of `authorization: Bearer <token>`; 401 otherwise."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing access token")
    try:
        return await verifier.verify(token.strip())
    except ServiceError as exc:
        raise HTTPException(401, exc.message) from None


def _time(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@app.get("/v1/users/me")
async def current_user(who: Caller = Depends(caller)) -> dict[str, Any]:
    async with database.session() as session:
        row = await session.get(UserRow, who.user_id)
    if row is None:
        raise HTTPException(404, "user not found")
    return {
        "user": {
            "id": row.id,
            "email": row.email,
            "fullName": row.full_name,
            "role": f"ROLE_{row.role.upper()}",
            "active": row.active,
            "createTime": _time(row.created_at),
            "updateTime": _time(row.updated_at),
            "passwordChangeTime": _time(row.password_changed_at),
        }
    }


class SearchBody(BaseModel):
    query: str
    page_size: int = Field(0, alias="pageSize")


@app.post("/v1/search")
async def search(body: SearchBody, who: Caller = Depends(caller)) -> dict[str, Any]:
    if retriever is None:
        raise HTTPException(404, "search is not loaded (PEER_INDEX)")
    try:
        found = await retriever.search(body.query, Mode.HYBRID, ChunkFilter(), body.page_size, "")
    except ServiceError as exc:
        raise HTTPException(400, exc.message) from None
    return {
        "results": [
            {
                "documentId": r.document_id,
                "title": r.title,
                "chunkId": r.chunk_id,
                "snippet": r.snippet,
                "highlights": [{"start": a, "end": b} for a, b in r.highlights],
                "page": r.page,
                "relevanceScore": r.score,
                "specialty": r.specialty,
                "sourceType": r.source_type,
            }
            for r in found.results
        ],
        "mode": "SEARCH_MODE_HYBRID",
        "nextPageToken": found.next_page_token,
    }


@app.post("/v1/conversations/{conversation_id}:ask")
async def ask(conversation_id: str, body: dict[str, Any], who: Caller = Depends(caller)) -> dict[str, Any]:
    if answering is None:
        raise HTTPException(404, "answering is not loaded (PEER_INDEX)")
    request = ParseDict({**body, "conversationId": conversation_id}, rag_pb2.AskRequest())
    try:
        answer = await answering.answers.ask(who, question_from(request))
    except ServiceError as exc:
        raise HTTPException(400, exc.message) from None
    return MessageToDict(answer_message(answer))
