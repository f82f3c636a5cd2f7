"""BM25 as sparse vectors: term ids and term-frequency weights here, inverse document frequency in Qdrant.

Tokenisation is Qdrant's own BM25 analyser (shipped in qdrant-edge-py, the same one Qdrant's server-side BM25
uses): Unicode word splitting, lower case, English stop words and the Snowball English stemmer; a term's id is
a hash of its stem. Documents get BM25's saturated, length-normalised term frequency; queries get 1 per term;
the collection's IDF modifier multiplies in each term's IDF at search time, so scores stay right as the corpus
grows without re-encoding anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import qdrant_edge

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class SparseVector:
    """Term ids and weights (plain lists: both vector stores take them as they are)."""

    indices: list[int]
    values: list[float]


class Bm25Encoder:
    """Text to BM25 sparse vectors."""

    def __init__(self, k: float = 1.2, b: float = 0.75, avg_len: float = 150.0) -> None:
        self._model = qdrant_edge.Bm25(qdrant_edge.Bm25Config(k=k, b=b, avg_len=avg_len, language="english"))

    def document(self, text: str) -> SparseVector:
        """Weights of an indexed chunk."""
        vector = self._model.embed_document(text)
        return SparseVector(list(vector.indices), list(vector.values))

    def query(self, text: str) -> SparseVector:
        """Weights of a query: every distinct term once."""
        vector = self._model.embed_query(text)
        return SparseVector(list(vector.indices), list(vector.values))

    def matches(self, text: str, query_terms: frozenset[int]) -> list[tuple[int, int]]:
        """(start, end) of every word of `text` whose term is among `query_terms` ("treated" matches "treat")."""
        spans = []
        seen: dict[str, bool] = {}
        for match in _WORD.finditer(text):
            word = match.group().lower()
            hit = seen.get(word)
            if hit is None:
                hit = seen[word] = any(i in query_terms for i in self._model.embed_query(word).indices)
            if hit:
                spans.append(match.span())
        return spans


def best_window(text: str, spans: list[tuple[int, int]], max_chars: int) -> tuple[str, list[tuple[int, int]]]:
    """The part of `text` (at most `max_chars`, cut at word boundaries) with the most matched words, and the
    matches' offsets inside it. Text without matches gives its beginning."""
    if len(text) <= max_chars:
        return text, spans
    start = 0
    if spans:
        best, right = 0, 0
        for left, (span_start, _) in enumerate(spans):
            while right < len(spans) and spans[right][1] - span_start <= max_chars:
                right += 1
            if right - left > best:
                best, start = right - left, span_start
        # Centre the matches a little: begin up to a sixth of the window before the first one.
        start = max(0, start - max_chars // 6)
        start = min(start, len(text) - max_chars)
        if start > 0:
            space = text.find(" ", start)
            start = space + 1 if 0 <= space < start + 40 else start
    end = min(len(text), start + max_chars)
    if end < len(text):
        space = text.rfind(" ", start, end)
        end = space if space > start + max_chars // 2 else end
    inside = [(s - start, e - start) for s, e in spans if s >= start and e <= end]
    return text[start:end], inside
