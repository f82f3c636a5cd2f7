"""Both vector store adapters against the same behaviour: the embedded Qdrant engine (qdrant-edge-py) and
qdrant-client (local mode here; the same calls go to a Qdrant server when QDRANT_URL is set)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.search.edge_index import EdgeIndex, IndexLocked
from services.search.embeddings import DIMENSIONS
from services.search.index import ChunkFilter, ChunkPoint, Mode, SearchQuery, VectorIndex, point_id, version_of
from services.search.qdrant_server_index import ServerIndex
from services.search.sparse import Bm25Encoder

ENCODER = Bm25Encoder()
DOCS = {
    # document id: (specialty, source type, tags, chunk texts)
    "doc-cardio": (
        "cardiology",
        "guideline",
        ["heart"],
        ["Beta blockers lower mortality in heart failure.", "Digoxin controls the ventricular rate."],
    ),
    "doc-endo": (
        "endocrinology",
        "textbook",
        ["diabetes", "drugs"],
        ["Metformin is first-line in type 2 diabetes.", "Insulin treats hyperglycaemia."],
    ),
    "doc-neuro": ("neurology", "journal", [], ["Triptans abort migraine attacks.", "Heart rate rises with pain."]),
}


def axis(n: int) -> list[float]:
    """A unit vector along axis n: a query on axis n is nearest to the chunk on it."""
    vector = [0.0] * DIMENSIONS
    vector[n] = 1.0
    return vector


def points(document_id: str, generation: int = 1, first_axis: int = 0) -> list[ChunkPoint]:
    """The document's chunks as points, chunk i on axis first_axis + i."""
    specialty, source_type, tags, texts = DOCS[document_id]
    version = version_of(document_id, generation)
    return [
        ChunkPoint(
            point_id(version, i),
            axis(first_axis + i),
            ENCODER.document(text),
            {
                "document_id": document_id,
                "version": version,
                "chunk_index": i,
                "page": i + 1,
                "text": text,
                "title": document_id,
                "specialty": specialty,
                "source_type": source_type,
                "tags": tags,
            },
        )
        for i, text in enumerate(texts)
    ]


@pytest.fixture(params=["edge", "qdrant-client"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorIndex]:
    """A fresh, opened index of each kind holding the three documents (published)."""
    store: VectorIndex = EdgeIndex(tmp_path / "shard") if request.param == "edge" else ServerIndex(":memory:", "kb")
    await store.open()
    for n, document_id in enumerate(DOCS):
        await store.upsert(points(document_id, first_axis=2 * n))
        await store.publish({document_id: version_of(document_id, 1)})
    yield store
    await store.close()


def query(mode: Mode, text: str = "", dense_axis: int | None = None, **where) -> SearchQuery:
    """A query by text (BM25) and/or an axis (dense)."""
    sparse = ENCODER.query(text) if text else None
    dense = axis(dense_axis) if dense_axis is not None else None
    return SearchQuery(mode, dense, sparse, ChunkFilter(**where), limit=10)


def texts(hits) -> list[str]:
    """The chunk texts of hits, best first."""
    return [h.payload["text"] for h in hits]


async def test_each_mode_ranks_by_its_own_signal(index: VectorIndex) -> None:
    dense = await index.search(query(Mode.DENSE, dense_axis=3))
    assert texts(dense)[0] == "Insulin treats hyperglycaemia." and len(dense) == 6
    sparse = await index.search(query(Mode.SPARSE, "heart failure"))
    # BM25 only returns chunks sharing a term; "failure" is rarer than "heart", so its chunk ranks first.
    assert texts(sparse) == ["Beta blockers lower mortality in heart failure.", "Heart rate rises with pain."]
    # Fusion: the chunk first in BM25 and second in dense beats the one first in dense only.
    hybrid = await index.search(query(Mode.HYBRID, "heart failure", dense_axis=5))
    assert texts(hybrid)[:2] == ["Heart rate rises with pain.", "Beta blockers lower mortality in heart failure."]
    assert hybrid[0].payload["page"] == 2 and hybrid[0].payload["document_id"] == "doc-neuro"


async def test_filters_restrict_every_mode(index: VectorIndex) -> None:
    for mode in Mode:
        hits = await index.search(query(mode, "heart", dense_axis=0, specialty="neurology"))
        assert {h.payload["document_id"] for h in hits} == {"doc-neuro"}
    by_source = await index.search(query(Mode.HYBRID, "insulin", dense_axis=0, source_type="textbook"))
    assert {h.payload["document_id"] for h in by_source} == {"doc-endo"}
    by_tags = await index.search(query(Mode.DENSE, dense_axis=0, tags=("drugs", "heart")))
    assert {h.payload["document_id"] for h in by_tags} == {"doc-cardio", "doc-endo"}
    by_ids = await index.search(query(Mode.DENSE, dense_axis=0, document_ids=("doc-neuro", "doc-cardio")))
    assert {h.payload["document_id"] for h in by_ids} == {"doc-cardio", "doc-neuro"}
    none = await index.search(query(Mode.DENSE, dense_axis=0, specialty="cardiology", document_ids=("doc-endo",)))
    assert none == []


async def test_offset_pages_do_not_overlap(index: VectorIndex) -> None:
    graded = [6.0 - n if n < 6 else 0.0 for n in range(DIMENSIONS)]  # a distinct score for every chunk
    everything = await index.search(SearchQuery(Mode.DENSE, graded, None, ChunkFilter(), limit=6))
    first = await index.search(SearchQuery(Mode.DENSE, graded, None, ChunkFilter(), limit=3))
    second = await index.search(SearchQuery(Mode.DENSE, graded, None, ChunkFilter(), limit=3, offset=3))
    assert [h.id for h in first + second] == [h.id for h in everything]


async def test_unpublished_chunks_are_invisible_and_a_new_version_replaces_the_old(index: VectorIndex) -> None:
    new = points("doc-cardio", generation=2, first_axis=10)
    await index.upsert(new)
    assert await index.existing([p.id for p in new] + [point_id("doc-cardio:9", 0)]) == {p.id for p in new}
    hits = await index.search(query(Mode.DENSE, dense_axis=10))
    assert all(h.payload["version"] == "doc-cardio:1" for h in hits if h.payload["document_id"] == "doc-cardio")
    await index.publish({"doc-cardio": version_of("doc-cardio", 2)})
    hits = await index.search(query(Mode.DENSE, dense_axis=10))
    assert hits[0].id == new[0].id
    assert {h.payload["version"] for h in hits if h.payload["document_id"] == "doc-cardio"} == {"doc-cardio:2"}
    assert await index.count() == 6


async def test_delete_document_removes_only_its_chunks(index: VectorIndex) -> None:
    await index.delete_document("doc-endo")
    assert await index.count() == 4
    hits = await index.search(query(Mode.HYBRID, "insulin metformin", dense_axis=2))
    assert "doc-endo" not in {h.payload["document_id"] for h in hits}


async def test_queries_without_terms_match_nothing_in_sparse_mode(index: VectorIndex) -> None:
    assert await index.search(SearchQuery(Mode.SPARSE, None, ENCODER.query("zzyzx"), ChunkFilter())) == []


async def test_embedded_index_survives_a_restart_and_refuses_a_second_process(tmp_path: Path) -> None:
    first = EdgeIndex(tmp_path / "shard")
    await first.open()
    await first.upsert(points("doc-neuro"))
    await first.publish({"doc-neuro": version_of("doc-neuro", 1)})
    with pytest.raises(IndexLocked):
        await EdgeIndex(tmp_path / "shard").open()
    await first.close()
    again = EdgeIndex(tmp_path / "shard")
    await again.open()
    assert texts(await again.search(query(Mode.SPARSE, "migraine"))) == ["Triptans abort migraine attacks."]
    await again.close()
