"""Settings of the search service (environment variables prefixed SEARCH_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.limits import MIB, SEARCH
from services.core.settings import ServiceSettings


class SearchSettings(ServiceSettings):
    """Upload limits, chunking, the embedding model, BM25, fusion and the indexing queue."""

    model_config = SettingsConfigDict(env_prefix="SEARCH_", env_file=".env", extra="ignore", frozen=True)

    max_upload_bytes: int = Field(SEARCH.upload_bytes, description="Largest file UploadDocument accepts (all chunks).")
    max_concurrent_uploads: int = Field(
        8, description="UploadDocument streams buffered at once per process (memory bound: this x max_upload_bytes)."
    )
    max_create_bytes: int = Field(
        SEARCH.create_bytes, description="Largest document CreateDocument accepts (text or bytes)."
    )
    max_pages: int = Field(5000, description="PDFs with more pages fail instead of tying up a worker.")
    max_chunks: int = Field(20_000, description="Documents that split into more chunks fail (about 5M words).")
    chunk_max_tokens: int = Field(
        256, description="Largest chunk in model tokens; 256 is all-MiniLM-L6-v2's window, so no chunk is truncated."
    )
    chunk_overlap_tokens: int = Field(
        40, description="Tokens of trailing sentences repeated at the next chunk's start."
    )
    embed_batch_size: int = Field(
        4,
        description="Chunks per inference call. Larger is slower here: on SciFact chunks (2 cores, int8 MiniLM) "
        "4 ran 28 ms/chunk, 16 ran 50 ms/chunk (padding and cache misses outweigh the per-call overhead).",
    )
    index_batch_chunks: int = Field(
        32,
        description="Chunks embedded, upserted and reported as progress per step, across the documents of a batch: "
        "one index write and one database transaction for all of them.",
    )
    embed_threads: int = Field(0, description="onnxruntime intra-op threads for indexing; 0 = one per core.")
    query_embed_threads: int = Field(
        1,
        description="onnxruntime intra-op threads of the query model (a second session, so a search never waits "
        "for an indexing batch); one thread keeps latency steady on a busy machine.",
    )
    bm25_k: float = Field(1.2, description="BM25 term-frequency saturation.")
    bm25_b: float = Field(0.75, description="BM25 length normalisation (0 = none, 1 = full).")
    bm25_avg_len: float = Field(
        150.0, description="Expected chunk length in BM25 terms (after stop words), for length normalisation."
    )
    rrf_k: int = Field(60, description="Reciprocal rank fusion constant: higher flattens the rank weighting.")
    prefetch_limit: int = Field(
        100, description="Candidates each of dense and BM25 contributes to hybrid fusion (at least the page depth)."
    )
    snippet_chars: int = Field(480, description="Longest snippet returned per result, cut around the query terms.")
    collection: str = Field("kb_chunks", description="Qdrant collection (server) or shard folder (embedded).")
    index_workers: int = Field(
        2,
        description="Documents indexed at once by each search process: a small document need not wait behind a long "
        "one, and one worker's database and index writes overlap the other's embedding (which runs one at a time).",
    )
    index_batch_documents: int = Field(
        32,
        description="Most queued documents a worker takes at once: their chunks share embedding calls (one or two "
        "chunks of an abstract alone waste most of a call) and their progress one transaction per step.",
    )
    index_batch_bytes: int = Field(
        16 * MIB,
        description="Most bytes of documents a worker parses and chunks at once (memory bound); the rest of a batch "
        "waits its turn, and a larger document runs alone.",
    )
    index_maintain_quiet_seconds: float = Field(
        2.0,
        description="Index upkeep (the embedded engine's HNSW build) waits until indexing has been idle this long: "
        "the build holds the GIL, so during a backlog it paused the whole process for 10-20 s at a time.",
    )
    queue_max_pending: int = Field(
        10_000, description="Embedded mode: most documents waiting in the in-process queue before uploads are refused."
    )
    job_claim_idle_seconds: int = Field(
        120, description="Mesh mode: a queued job whose worker has been silent this long is taken over by another."
    )
    watch_poll_seconds: float = Field(
        0.5, description="WatchDocument re-reads progress at least this often (workers may run in other processes)."
    )


@lru_cache
def search_settings() -> SearchSettings:
    """The process-wide search settings (read once)."""
    return SearchSettings()
