"""The vector store behind one small interface: chunk points with a dense and a BM25 vector, searched by
dense, sparse or both fused with reciprocal rank fusion inside Qdrant.

Two adapters implement it: `edge_index.EdgeIndex` (the Qdrant engine in-process, the default) and
`qdrant_server_index.ServerIndex` (qdrant-client against a Qdrant server when QDRANT_URL is set). A chunk becomes
searchable only when its document is published (payload `state`), so a half-indexed document never shows up.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from services.search.sparse import SparseVector

DENSE = "dense"
SPARSE = "bm25"
# Payload fields with a keyword index. `state` is "ready" on chunks of fully indexed documents, "pending" before (a
# keyword, not a bool: qdrant-edge-py 0.9 never matches a bool MatchValue).
KEYWORD_FIELDS = ("document_id", "specialty", "source_type", "tags", "state", "version")
READY = "ready"
PENDING = "pending"
_POINT_NAMESPACE = uuid.UUID("6f1c8a52-3b7e-4e07-9a7f-1f3f1d0f5e21")


class Mode(StrEnum):
    """Retrieval method."""

    HYBRID = "HYBRID"
    DENSE = "DENSE"
    SPARSE = "SPARSE"


def version_of(document_id: str, generation: int) -> str:
    """The payload `version` of a document's chunks at one generation (every reindex is a new generation)."""
    return f"{document_id}:{generation}"


def point_id(version: str, chunk_index: int) -> str:
    """A chunk's point id: the same for the same chunk of the same generation, so a resumed job overwrites,
    never duplicates; a new generation never collides with the chunks still served from the previous one."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{version}:{chunk_index}"))


@dataclass(frozen=True)
class ChunkPoint:
    """One chunk as stored in the index."""

    id: str
    dense: list[float]
    sparse: SparseVector
    payload: dict[str, Any]


@dataclass(frozen=True)
class ChunkFilter:
    """Every set field must match; `tags` matches chunks with at least one of them."""

    specialty: str = ""
    source_type: str = ""
    document_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def conditions(self) -> list[tuple[str, str | list[str]]]:
        """(field, value) pairs: a str must equal, a list means any of; always only published chunks."""
        found: list[tuple[str, str | list[str]]] = [("state", READY)]
        if self.specialty:
            found.append(("specialty", self.specialty))
        if self.source_type:
            found.append(("source_type", self.source_type))
        if self.document_ids:
            found.append(("document_id", list(self.document_ids)))
        if self.tags:
            found.append(("tags", list(self.tags)))
        return found


@dataclass(frozen=True)
class SearchQuery:
    """What to look for and how many results past `offset`."""

    mode: Mode
    dense: list[float] | None
    sparse: SparseVector | None
    filter: ChunkFilter = field(default_factory=ChunkFilter)
    limit: int = 10
    offset: int = 0
    prefetch: int = 100
    rrf_k: int = 60


@dataclass(frozen=True)
class Hit:
    """A chunk that matched, with its payload."""

    id: str
    score: float
    payload: dict[str, Any]


class VectorIndex(Protocol):
    """What the search service needs from a vector store."""

    async def open(self) -> None:
        """Create the collection, its vectors and payload indexes when missing."""

    async def upsert(self, points: list[ChunkPoint]) -> None:
        """Insert or overwrite points, not yet searchable (state pending)."""

    async def existing(self, ids: list[str]) -> set[str]:
        """Which of these point ids are stored."""

    async def publish(self, versions: Mapping[str, str]) -> None:
        """For each {document id: version}: make the document's chunks of that version searchable and drop its
        chunks of every other version."""

    async def delete_document(self, document_id: str) -> None:
        """Remove every chunk of the document."""

    async def search(self, query: SearchQuery) -> list[Hit]:
        """Best chunks first."""

    async def count(self) -> int:
        """Points stored (published or not)."""

    async def maintain(self) -> None:
        """Background upkeep after a burst of writes (index building); may be a no-op."""

    async def close(self) -> None:
        """Persist and release resources."""
