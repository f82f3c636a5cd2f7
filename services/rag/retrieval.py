"""What the answer pipeline needs from the knowledge base: passages for a question. The search service provides them
(`search_client.SearchRetriever`); the pipeline only sees this contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk; its number in prompts and [n] markers is its position in the result list plus one."""

    document_id: str
    title: str
    chunk_id: str
    text: str
    page: int
    score: float


class RetrievalFailed(Exception):
    """The knowledge base could not be searched (down, too slow)."""


class Retriever(Protocol):
    """Searches the knowledge base."""

    async def retrieve(self, query: str, specialty: str, limit: int) -> list[Passage]:
        """The best passages for `query`, best first; restricted to `specialty` when it is not empty."""
        ...
