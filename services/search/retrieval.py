"""Search over indexed chunks: dense, BM25 or both fused with reciprocal rank fusion, with filters, paging,
and snippets that show where the query terms occur."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import SEARCH
from services.core.pagination import decode_page_token, encode_page_token, page_size
from services.search.embeddings import Embedder
from services.search.index import ChunkFilter, Hit, Mode, SearchQuery, VectorIndex
from services.search.knowledge import check_document_id, normalise_label
from services.search.sparse import Bm25Encoder, best_window

TIE_MARGIN = 10  # results fetched past the page so that ties at its edge are ordered the same on every page


@dataclass(frozen=True)
class Result:
    """One matching chunk, ready to show."""

    document_id: str
    title: str
    chunk_id: str
    snippet: str
    highlights: list[tuple[int, int]]
    page: int
    score: float
    specialty: str
    source_type: str


@dataclass(frozen=True)
class Results:
    """A page of results."""

    results: list[Result]
    mode: Mode
    next_page_token: str


def clean_filter(specialty: str, source_type: str, document_ids: list[str], tags: list[str]) -> ChunkFilter:
    """Filters normalised like stored metadata (labels are lower case); bounded lists."""
    if len(document_ids) > SEARCH.filter_documents:
        raise invalid("filters.document_ids", f"at most {SEARCH.filter_documents}")
    if len(tags) > SEARCH.filter_tags:
        raise invalid("filters.tags", f"at most {SEARCH.filter_tags}")
    ids = tuple(sorted({check_document_id(d, "filters.document_ids") for d in document_ids}))
    return ChunkFilter(
        specialty=normalise_label(specialty),
        source_type=normalise_label(source_type),
        document_ids=ids,
        tags=tuple(sorted({normalise_label(t) for t in tags} - {""})),
    )


class Retriever:
    """Search use case."""

    def __init__(
        self,
        index: VectorIndex,
        embedder: Embedder,
        encoder: Bm25Encoder,
        *,
        prefetch: int,
        rrf_k: int,
        snippet_chars: int,
    ) -> None:
        self._index = index
        self._embedder = embedder
        self._encoder = encoder
        self._prefetch = prefetch
        self._rrf_k = rrf_k
        self._snippet_chars = snippet_chars

    async def search(self, query: str, mode: Mode, chunks: ChunkFilter, limit: int, page_token: str) -> Results:
        """The best chunks for `query`, `limit` per page."""
        query = " ".join(query.split())
        if not query:
            raise invalid("query", "required")
        if len(query) > SEARCH.query_chars:
            raise invalid("query", f"at most {SEARCH.query_chars} characters")
        limit = page_size(limit, SEARCH.results)
        fingerprint = {
            "q": query,
            "m": mode.value,
            "f": [chunks.specialty, chunks.source_type, chunks.document_ids, chunks.tags],
        }
        cursor = decode_page_token(page_token, fingerprint)
        offset = int(cursor[0]) if cursor and isinstance(cursor[0], int) else 0
        if offset < 0 or offset >= SEARCH.paging_depth:
            raise ServiceError(Reason.INVALID_PAGE_TOKEN, "page_token is past the paging depth")
        limit = min(limit, SEARCH.paging_depth - offset)
        sparse = self._encoder.query(query)
        terms = frozenset(sparse.indices)
        dense = None
        if mode is not Mode.SPARSE:
            dense = (await self._embedder.embed([query]))[0].tolist()
        hits: list[Hit] = []
        if dense is not None or terms:
            # Rank fusion ties often (ranks 1+3 score as 3+1) and the engine orders ties as it likes, so pages are cut
            # from one deterministic order: a window from the top, sorted by score then id, a few spare past the page.
            hits = await self._index.search(
                SearchQuery(
                    mode=mode, dense=dense, sparse=sparse if terms else None, filter=chunks,
                    limit=offset + limit + TIE_MARGIN, offset=0, prefetch=self._prefetch, rrf_k=self._rrf_k,
                )
            )  # fmt: skip
            hits.sort(key=lambda hit: (-hit.score, hit.id))
        results = [self._result(hit, terms) for hit in hits[offset : offset + limit]]
        following = offset + len(results)
        more = len(results) == limit and following < SEARCH.paging_depth
        token = encode_page_token([following], fingerprint) if more else ""
        return Results(results, mode, token)

    def _result(self, hit: Hit, terms: frozenset[int]) -> Result:
        payload = hit.payload
        text = str(payload.get("text", ""))
        spans = self._encoder.matches(text, terms) if terms else []
        snippet, highlights = best_window(text, spans, self._snippet_chars)
        return Result(
            document_id=str(payload.get("document_id", "")),
            title=str(payload.get("title", "")),
            chunk_id=hit.id,
            snippet=snippet,
            highlights=highlights,
            page=int(payload.get("page", 0)),
            score=hit.score,
            specialty=str(payload.get("specialty", "")),
            source_type=str(payload.get("source_type", "")),
        )
