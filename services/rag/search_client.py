"""The knowledge base as the answer pipeline sees it: the search service's Search RPC through its generated stub.

The stub comes from the runtime's channel pool, which forwards the caller's bearer token and request id, so the search
service authorises the same user and logs the same request.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.rag.retrieval import Passage, RetrievalFailed
from voiceassist.search.v1 import search_pb2, search_pb2_grpc


class SearchRetriever:
    """A Retriever over SearchService/Search (hybrid mode)."""

    def __init__(self, stub: Callable[[], search_pb2_grpc.SearchServiceStub], timeout_seconds: float) -> None:
        self._stub = stub  # asked per call: the channel behind it is replaced when certificates renew
        self._timeout = timeout_seconds

    async def retrieve(self, query: str, specialty: str, limit: int) -> list[Passage]:
        """The best chunks for `query`; RetrievalFailed when the search service cannot answer."""
        request = search_pb2.SearchRequest(
            query=query,
            page_size=limit,
            mode=search_pb2.SEARCH_MODE_HYBRID,
            filters=search_pb2.SearchFilters(specialty=specialty) if specialty else None,
        )
        try:
            reply = await self._stub().Search(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise RetrievalFailed(exc.code().name) from None
        return [
            Passage(r.document_id, r.title, r.chunk_id, r.snippet, r.page, r.relevance_score) for r in reply.results
        ]
