"""A service killed (kill -9) in the middle of a server stream, seen through a real Envoy.

Envoy cannot end such a stream with a status: the response headers went out with the first message, so it resets
the stream (gRPC: RST_STREAM, which gRPC reports as INTERNAL "Stream removed"; JSON: the connection closes before
the chunked body ends). Our own client library reports the reset as UNAVAILABLE; a JSON client sees a body that
never completed, never a clean end.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.core.clients import open_channel
from tests.support.admin import create_admin
from tests.support.clients import Account
from tests.support.mesh import Cluster, Server, all_upstreams
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

# Long enough that indexing is still under way when the watcher has its first update.
TEXT = "\n\n".join(f"Paragraph {i}: heat stroke is treated by cooling at once. " * 20 for i in range(3000)).encode()


class Crashable:
    def __init__(self, cluster: Cluster, server: Server, account: Account, document_id: str) -> None:
        self.cluster, self.server, self.account, self.document_id = cluster, server, account, document_id

    def kill(self) -> None:
        self.server.process.send_signal(signal.SIGKILL)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Crashable]:
    """An embedded server behind Envoy, with a document it is still indexing."""
    cluster = Cluster.create(tmp_path, mesh=False)
    try:
        server = cluster.start("all")
        cluster.start_envoy(all_upstreams(server))
        with grpc.insecure_channel(server.address) as channel:
            account = create_admin(cluster, channel)
            metadata = search_pb2.DocumentMetadata(title="Heat", file_name="heat.txt", media_type="text/plain")
            requests = [search_pb2.UploadDocumentRequest(metadata=metadata)] + [
                search_pb2.UploadDocumentRequest(chunk=TEXT[i : i + (1 << 20)]) for i in range(0, len(TEXT), 1 << 20)
            ]
            stub = search_pb2_grpc.SearchServiceStub(channel)
            reply = stub.UploadDocument(iter(requests), metadata=account.metadata, timeout=60)
        yield Crashable(cluster, server, account, reply.document.id)
    finally:
        cluster.stop()


async def test_our_client_reports_a_stream_reset_by_a_crash_as_unavailable(system: Crashable) -> None:
    assert system.cluster.envoy is not None
    channel = open_channel(system.cluster.envoy.address)
    try:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        request = search_pb2.WatchDocumentRequest(document_id=system.document_id)
        updates = stub.WatchDocument(request, metadata=system.account.metadata, timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in updates:
                system.kill()
        # Without the client's mapping: INTERNAL "Stream removed (RST_STREAM ...)".
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "RST_STREAM" in (caught.value.details() or "")
    finally:
        await asyncio.shield(channel.close())


def test_a_json_stream_cut_by_a_crash_does_not_end_cleanly(system: Crashable) -> None:
    assert system.cluster.envoy is not None
    path = f"/v1/documents/{system.document_id}:watch"
    with (
        httpx.Client(base_url=system.cluster.envoy.http, timeout=60) as http,
        http.stream("GET", path, headers=system.account.headers) as reply,
    ):
        assert reply.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            for _ in reply.iter_bytes():
                system.kill()
