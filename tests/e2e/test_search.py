"""The search service through Envoy: uploads (gRPC client stream and JSON), background indexing with progress,
hybrid search with page numbers and filters, duplicates, failures, permissions, delete and reindex, and the
mesh path (PostgreSQL, Redis stream) including a worker crash in the middle of a document."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest

from services.core.settings import ROOT
from services.core.status import error_info
from tests.support.admin import create_admin
from tests.support.clients import (
    Account,
    error_reason,
    json_reason,
    register_and_login,
)
from tests.support.mesh import Cluster, drop_schemas, free_port
from tests.support.pdfs import encrypt_pdf, make_pdf
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

S = search_pb2


def upload(stub: search_pb2_grpc.SearchServiceStub, admin: Account, meta: S.DocumentMetadata, data: bytes, piece: int):
    """UploadDocument as a client stream of `piece`-byte messages."""

    def messages() -> Iterator[S.UploadDocumentRequest]:
        yield S.UploadDocumentRequest(metadata=meta)
        for start in range(0, len(data), piece):
            yield S.UploadDocumentRequest(chunk=data[start : start + piece])

    return stub.UploadDocument(messages(), metadata=admin.metadata, timeout=60).document


def watch(stub: search_pb2_grpc.SearchServiceStub, account: Account, document_id: str) -> list[S.WatchDocumentResponse]:
    """Every WatchDocument update until the stream ends."""
    request = S.WatchDocumentRequest(document_id=document_id)
    return list(stub.WatchDocument(request, metadata=account.metadata, timeout=120))


def marker() -> str:
    """A made-up word that occurs in exactly one test's documents."""
    return "zq" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def accounts(embedded: Cluster) -> tuple[Account, Account]:
    """(admin, plain user) on the embedded system."""
    with grpc.insecure_channel(embedded.servers[0].address) as channel:
        return create_admin(embedded, channel), register_and_login(channel)


@pytest.fixture
def search(edge_channel: grpc.Channel) -> search_pb2_grpc.SearchServiceStub:
    """A SearchService stub through Envoy."""
    return search_pb2_grpc.SearchServiceStub(edge_channel)


def test_pdf_by_stream_and_markdown_as_json_are_indexed_and_found_with_pages_and_filters(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    word = marker()
    pdf = make_pdf(
        [
            ["Chapter one covers asthma.", "Inhaled corticosteroids control airway inflammation."],
            [f"Gout flares respond to colchicine {word} within a day.", "Allopurinol lowers urate."],
            ["Chapter three covers migraine.", "Triptans abort attacks."],
        ]
    )
    meta = S.DocumentMetadata(
        title="Rheumatology handbook",
        source_type="textbook",
        specialty="Rheumatology",
        tags=["handbook"],
        file_name="handbook.pdf",
    )
    pdf_doc = upload(search, admin, meta, pdf, piece=700)
    assert pdf_doc.status == S.DOCUMENT_STATUS_PENDING and pdf_doc.metadata.media_type == "application/pdf"
    assert pdf_doc.metadata.specialty == "rheumatology" and pdf_doc.size_bytes == len(pdf)

    markdown = f"# Heart failure notes\n\nBeta blockers reduce mortality in heart failure {word}.\n\n- Start low\n"
    created = edge_http.post(
        "/v1/documents",
        json={
            "metadata": {
                "title": "HF notes",
                "sourceType": "guideline",
                "specialty": "cardiology",
                "fileName": "hf.md",
            },
            "text": markdown,
        },
        headers=admin.headers,
    )
    assert created.status_code == 200, created.text
    md_id = created.json()["document"]["id"]
    assert created.json()["document"]["metadata"]["mediaType"] == "text/markdown"

    updates = watch(search, user, pdf_doc.id)
    assert updates[0].document.status in (
        S.DOCUMENT_STATUS_PENDING,
        S.DOCUMENT_STATUS_PARSING,
        S.DOCUMENT_STATUS_EMBEDDING,
        S.DOCUMENT_STATUS_INDEXED,
    )
    final = updates[-1]
    assert final.document.status == S.DOCUMENT_STATUS_INDEXED, final.document.error
    assert final.document.page_count == 3 and final.chunks_done == final.chunks_total == final.document.chunk_count
    assert [u.chunks_done for u in updates] == sorted(u.chunks_done for u in updates)
    # The same stream as JSON through Envoy: an array of updates ending INDEXED.
    streamed = edge_http.get(f"/v1/documents/{md_id}:watch", headers=user.headers, timeout=120)
    assert streamed.status_code == 200
    assert streamed.json()[-1]["document"]["status"] == "DOCUMENT_STATUS_INDEXED"

    query = {"query": f"colchicine for gout flares {word}", "pageSize": 5}
    found = edge_http.post("/v1/search", json=query, headers=user.headers)
    assert found.status_code == 200, found.text
    top = found.json()["results"][0]
    assert top["documentId"] == pdf_doc.id and top["title"] == "Rheumatology handbook" and top["page"] == 2
    assert word in top["snippet"] and top["relevanceScore"] > 0
    marked = {top["snippet"][h.get("start", 0) : h["end"]].lower() for h in top["highlights"]}
    assert {"colchicine", word} <= marked

    reply = search.Search(
        S.SearchRequest(query=f"heart failure beta blockers {word}", mode=S.SEARCH_MODE_SPARSE),
        metadata=user.metadata,
        timeout=30,
    )
    assert reply.mode == S.SEARCH_MODE_SPARSE and reply.results[0].document_id == md_id
    assert reply.results[0].page == 0 and reply.results[0].specialty == "cardiology"

    # Filters exclude: the PDF's specialty, source type and tag each rule the Markdown file out, and vice versa.
    def hits(filters: dict) -> set[str]:
        body = {"query": f"{word} colchicine heart failure", "filters": filters, "pageSize": 50}
        answer = edge_http.post("/v1/search", json=body, headers=user.headers)
        assert answer.status_code == 200, answer.text
        return {r["documentId"] for r in answer.json().get("results", [])}

    assert {pdf_doc.id, md_id} <= hits({})
    assert pdf_doc.id in hits({"specialty": "rheumatology"}) and md_id not in hits({"specialty": "rheumatology"})
    assert hits({"specialty": "cardiology", "documentIds": [pdf_doc.id]}) == set()
    assert md_id not in hits({"sourceType": "textbook"}) and pdf_doc.id not in hits({"sourceType": "guideline"})
    assert hits({"tags": ["handbook", "no-such-tag"], "documentIds": [pdf_doc.id, md_id]}) == {pdf_doc.id}


def test_same_content_twice_is_already_exists_naming_the_first(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, _ = accounts
    text = f"Hyperkalaemia is treated with calcium gluconate first. {marker()}"
    first = edge_http.post("/v1/documents", json={"text": text}, headers=admin.headers).json()["document"]
    again = edge_http.post("/v1/documents", json={"text": text, "metadata": {"title": "x"}}, headers=admin.headers)
    assert again.status_code == 409 and json_reason(again.json()) == "DUPLICATE_DOCUMENT"
    assert error_info(again.json()).metadata["document_id"] == first["id"]
    with pytest.raises(grpc.RpcError) as caught:
        upload(search, admin, S.DocumentMetadata(media_type="text/plain"), text.encode(), piece=10)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(caught.value) == "DUPLICATE_DOCUMENT"
    assert first["id"] in caught.value.details()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\nxref\ngarbage", "damaged", id="corrupt"
        ),
        pytest.param(encrypt_pdf(make_pdf([["Secret dosing table."]]), "s3cret"), "password-protected", id="encrypted"),
        pytest.param(b"just text pretending to be a PDF", "not a PDF", id="not-pdf"),
    ],
)
def test_bad_pdfs_end_failed_with_a_reason(
    search: search_pb2_grpc.SearchServiceStub, accounts: tuple[Account, Account], data: bytes, reason: str
) -> None:
    admin, _ = accounts
    data += marker().encode() if not data.startswith(b"%PDF") or reason == "damaged" else b""
    document = upload(search, admin, S.DocumentMetadata(file_name="bad.pdf"), data, piece=1 << 20)
    final = watch(search, admin, document.id)[-1].document
    assert final.status == S.DOCUMENT_STATUS_FAILED and reason in final.error
    assert final.chunk_count == 0
    # The service is fine afterwards: the failure was the document's, not the worker's.
    assert search.GetDocument(S.GetDocumentRequest(document_id=document.id), metadata=admin.metadata).document.error


def test_non_admin_cannot_write_but_can_read_and_search(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    with pytest.raises(grpc.RpcError) as caught:
        upload(search, user, S.DocumentMetadata(file_name="a.txt"), b"hello there", piece=5)
    assert (
        caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(caught.value) == "PERMISSION_DENIED"
    )
    denied = edge_http.post("/v1/documents", json={"text": "x"}, headers=user.headers)
    assert denied.status_code == 403 and json_reason(denied.json()) == "PERMISSION_DENIED"
    doc = edge_http.post("/v1/documents", json={"text": f"Readable {marker()}"}, headers=admin.headers).json()
    doc_id = doc["document"]["id"]
    assert edge_http.delete(f"/v1/documents/{doc_id}", headers=user.headers).status_code == 403
    assert edge_http.post(f"/v1/documents/{doc_id}:reindex", json={}, headers=user.headers).status_code == 403
    assert edge_http.get(f"/v1/documents/{doc_id}", headers=user.headers).status_code == 200
    assert edge_http.post("/v1/search", json={"query": "readable"}, headers=user.headers).status_code == 200
    anonymous = edge_http.post("/v1/search", json={"query": "readable"})
    assert anonymous.status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"text": "x", "metadata": {"mediaType": "application/msword"}}, 400, "UNSUPPORTED_MEDIA_TYPE"),
        (
            {"data": base64.b64encode(b"x").decode(), "metadata": {"fileName": "scan.tiff"}},
            400,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        ({"metadata": {"title": "no content"}}, 400, "VALIDATION_ERROR"),
        ({"text": "x", "metadata": {"sourceType": "blog"}}, 400, "VALIDATION_ERROR"),
        ({"text": "x", "metadata": {"tags": ["t"] * 40}}, 400, "VALIDATION_ERROR"),
        ({"text": "x" * 5_000_001}, 429, "PAYLOAD_TOO_LARGE"),
    ],
    ids=["media-type", "file-name", "no-content", "source-type", "too-many-tags", "too-large"],
)
def test_bad_create_requests_are_refused(
    edge_http: httpx.Client, accounts: tuple[Account, Account], body: dict, status: int, reason: str
) -> None:
    admin, _ = accounts
    reply = edge_http.post("/v1/documents", json=body, headers=admin.headers)
    assert reply.status_code == status and json_reason(reply.json()) == reason, reply.text


def test_oversized_stream_and_bad_search_input_are_refused(
    embedded: Cluster, search: search_pb2_grpc.SearchServiceStub, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    with pytest.raises(grpc.RpcError) as caught:
        upload(search, admin, S.DocumentMetadata(file_name="big.txt"), b"a" * ((1 << 20) + 1), piece=(1 << 20) + 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request in (
        S.SearchRequest(query=""),
        S.SearchRequest(query="q" * 2001),
        S.SearchRequest(query="ok", page_size=-1),
        S.SearchRequest(query="ok", limit=-1),
        S.SearchRequest(query="ok", filters=S.SearchFilters(document_ids=["not-a-uuid"])),
        S.SearchRequest(query="ok", page_token="garbage!"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            search.Search(request, metadata=user.metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request


def test_delete_and_reindex_and_list(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    word = marker()
    html = (
        f"<html><head><title>Sepsis bundle</title></head><body><h1>Sepsis</h1><p>Give antibiotics {word} "
        f"within one hour.</p><script>alert('{word}script')</script></body></html>"
    )
    doc = edge_http.post(
        "/v1/documents",
        json={"text": html, "metadata": {"mediaType": "text/html", "specialty": "critical care", "title": ""}},
        headers=admin.headers,
    ).json()["document"]
    assert doc["metadata"]["title"] == ""
    indexed = watch(search, admin, doc["id"])[-1].document
    assert indexed.status == S.DOCUMENT_STATUS_INDEXED and indexed.metadata.title == "Sepsis bundle"

    def found(query: str) -> list[S.SearchResult]:
        return list(search.Search(S.SearchRequest(query=query, page_size=50), metadata=user.metadata).results)

    top = found(f"antibiotics {word}")[0]
    assert top.document_id == doc["id"] and top.title == "Sepsis bundle"
    assert not [r for r in found(f"{word}script") if r.document_id == doc["id"] and "alert" in r.snippet]

    reindexed = search.ReindexDocument(S.ReindexDocumentRequest(document_id=doc["id"]), metadata=admin.metadata)
    assert reindexed.document.status == S.DOCUMENT_STATUS_PENDING
    after = watch(search, admin, doc["id"])[-1]
    assert after.document.status == S.DOCUMENT_STATUS_INDEXED and after.chunks_done == after.chunks_total
    hits = [r for r in found(f"antibiotics {word}") if r.document_id == doc["id"]]
    assert len(hits) == after.chunks_total  # the old generation's chunks are gone, not doubled

    listed = edge_http.get(
        "/v1/documents", params={"specialty": "critical care", "pageSize": 1}, headers=user.headers
    ).json()
    assert listed["documents"][0]["id"] == doc["id"] and listed["totalSize"] >= 1

    deleted = edge_http.delete(f"/v1/documents/{doc['id']}", headers=admin.headers)
    assert deleted.status_code == 200
    assert not [r for r in found(f"antibiotics {word}") if r.document_id == doc["id"]]
    gone = edge_http.get(f"/v1/documents/{doc['id']}", headers=user.headers)
    assert gone.status_code == 404 and json_reason(gone.json()) == "NOT_FOUND"
    again = edge_http.delete(f"/v1/documents/{doc['id']}", headers=admin.headers)
    assert again.status_code == 404
    with pytest.raises(grpc.RpcError) as caught:
        watch(search, user, doc["id"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_search_pages_without_repeating_results(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    word = marker()
    ids = []
    for n in range(5):
        text = f"Note {n} on anticoagulation {word}: warfarin needs INR monitoring, variant {n}."
        ids.append(
            edge_http.post(
                "/v1/documents", json={"text": text, "metadata": {"tags": [word]}}, headers=admin.headers
            ).json()["document"]["id"]
        )
    for doc_id in ids:
        assert watch(search, admin, doc_id)[-1].document.status == S.DOCUMENT_STATUS_INDEXED
    seen: list[str] = []
    token = ""
    while True:
        request = S.SearchRequest(
            query=f"warfarin {word}", page_size=2, page_token=token, filters=S.SearchFilters(tags=[word])
        )
        reply = search.Search(request, metadata=user.metadata)
        seen += [r.document_id for r in reply.results]
        token = reply.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids)


def test_search_reads_the_deprecated_limit_only_when_page_size_is_unset(
    search: search_pb2_grpc.SearchServiceStub, edge_http: httpx.Client, accounts: tuple[Account, Account]
) -> None:
    admin, user = accounts
    word = marker()
    for n in range(3):
        body = {"text": f"Digoxin note {n} {word}: check levels and potassium.", "metadata": {"tags": [word]}}
        doc = edge_http.post("/v1/documents", json=body, headers=admin.headers).json()["document"]
        assert watch(search, admin, doc["id"])[-1].document.status == S.DOCUMENT_STATUS_INDEXED

    def found(sizes: dict[str, int]) -> int:
        body = {"query": f"digoxin {word}", "filters": {"tags": [word]}, **sizes}
        reply = edge_http.post("/v1/search", json=body, headers=user.headers)
        assert reply.status_code == 200, reply.text
        return len(reply.json()["results"])

    # Clients of the first release send `limit` (field 3); page_size wins whenever it is set.
    assert found({"limit": 2}) == 2
    assert found({"pageSize": 3, "limit": 1}) == 3
    assert found({"pageSize": 1, "limit": 3}) == 1


@pytest.mark.mesh
def test_mesh_indexing_resumes_after_a_worker_is_killed_mid_document(tmp_path) -> None:
    """PostgreSQL + Redis stream: SIGKILL the only search process halfway through a document; a new process takes
    the job over and finishes it without re-embedding the chunks already stored."""
    cluster = Cluster.create(
        tmp_path,
        mesh=True,
        SEARCH_EMBED_BATCH_SIZE="2",
        SEARCH_INDEX_BATCH_CHUNKS="2",
        SEARCH_JOB_CLAIM_IDLE_SECONDS="2",
    )
    ports = {"auth": free_port(), "search": free_port()}
    for name, port in ports.items():
        cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    try:
        auth = cluster.start("auth", port=ports["auth"])
        first = cluster.start("search", port=ports["search"])
        with grpc.insecure_channel(auth.address) as auth_channel:
            admin = create_admin(cluster, auth_channel)
        word = marker()
        sentences = " ".join(f"Sentence {n} about renal dosing of {word} and creatinine clearance." for n in range(600))
        with grpc.insecure_channel(first.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            doc = upload(stub, admin, S.DocumentMetadata(file_name="renal.txt"), sentences.encode(), piece=4096)
            progress = stub.WatchDocument(S.WatchDocumentRequest(document_id=doc.id), metadata=admin.metadata)
            for update in progress:
                if update.chunks_done >= 4:
                    break
            progress.cancel()
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        stopped_at = update.chunks_done
        second = cluster.start("search", port=free_port())
        with grpc.insecure_channel(second.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            updates = watch(stub, admin, doc.id)
            final = updates[-1]
            assert final.document.status == S.DOCUMENT_STATUS_INDEXED, final.document.error
            assert final.chunks_done == final.chunks_total > stopped_at
            # Resumed, not restarted: progress never falls back to zero, because the new worker counts the chunks the
            # index already holds (the last batch before the kill may not have reached the disk, so not all of them).
            assert all(u.chunks_done > 0 for u in updates)
            hits = stub.Search(S.SearchRequest(query=f"renal dosing {word}", page_size=50), metadata=admin.metadata)
            assert len({r.chunk_id for r in hits.results}) == min(50, final.chunks_total)
    finally:
        cluster.stop()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"], ["auth", "search"])


@pytest.mark.mesh
def test_mesh_a_batch_with_a_broken_document_indexes_the_others(tmp_path) -> None:
    """Documents queued while no worker runs are taken as one batch and their chunks embedded together; the broken
    PDF among them ends FAILED alone, every other document INDEXED with all its chunks."""
    cluster = Cluster.create(tmp_path, mesh=True)
    ports = {"auth": free_port(), "search": free_port()}
    for name, port in ports.items():
        cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    try:
        auth = cluster.start("auth", port=ports["auth"])
        with grpc.insecure_channel(auth.address) as auth_channel:
            admin = create_admin(cluster, auth_channel)
        word = marker()
        texts = [
            f"Note {n} on {word}. " + " ".join(f"Dose {i} of drug {n}." for i in range(1 + 60 * n)) for n in range(5)
        ]
        idle = cluster.start("search", port=ports["search"], SEARCH_INDEX_WORKERS="0")  # queues jobs, indexes none
        with grpc.insecure_channel(idle.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            good = [upload(stub, admin, S.DocumentMetadata(file_name="n.txt"), t.encode(), 4096).id for t in texts]
            bad_pdf = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\nxref\ngarbage" + word.encode()
            broken = upload(stub, admin, S.DocumentMetadata(file_name="bad.pdf"), bad_pdf, 1 << 20)
            waiting = stub.GetDocument(S.GetDocumentRequest(document_id=good[0]), metadata=admin.metadata)
            assert waiting.document.status == S.DOCUMENT_STATUS_PENDING
        idle.stop()
        worker = cluster.start("search", port=free_port())
        with grpc.insecure_channel(worker.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            failed = watch(stub, admin, broken.id)[-1].document
            assert failed.status == S.DOCUMENT_STATUS_FAILED and "damaged" in failed.error
            for document_id in good:
                final = watch(stub, admin, document_id)[-1]
                assert final.document.status == S.DOCUMENT_STATUS_INDEXED, final.document.error
                assert final.chunks_done == final.chunks_total == final.document.chunk_count > 0
            hits = stub.Search(S.SearchRequest(query=f"note {word}", page_size=50), metadata=admin.metadata).results
            assert {r.document_id for r in hits} == set(good)
    finally:
        cluster.stop()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"], ["auth", "search"])


@pytest.mark.mesh
def test_mesh_upload_and_search_through_envoy(mesh: Cluster, mesh_http: httpx.Client) -> None:
    search_server = next(s for s in mesh.servers if s.services == "search")
    with grpc.insecure_channel(mesh.servers[0].address) as channel:
        admin = create_admin(mesh, channel)
    word = marker()
    created = mesh_http.post(
        "/v1/documents", json={"text": f"Lithium levels need monitoring {word}."}, headers=admin.headers
    )
    assert created.status_code == 200, created.text
    with grpc.insecure_channel(search_server.address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        final = watch(stub, admin, created.json()["document"]["id"])[-1]
    assert final.document.status == S.DOCUMENT_STATUS_INDEXED
    found = mesh_http.post("/v1/search", json={"query": f"lithium {word}"}, headers=admin.headers).json()
    assert found["results"][0]["documentId"] == final.document.id


def test_cli_ingests_a_folder_and_searches_it_through_envoy(
    embedded: Cluster, accounts: tuple[Account, Account], tmp_path
) -> None:
    admin, user = accounts
    assert embedded.envoy is not None
    word = marker()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "asthma.md").write_text(f"# Asthma\n\nSalbutamol relieves bronchospasm {word}.\n")
    (tmp_path / "notes" / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "gout.pdf").write_bytes(make_pdf([["Page one."], [f"Colchicine for gout {word}."]]))
    base = {**os.environ, "VOICEASSIST_ADDRESS": embedded.envoy.address}

    def cli(*args: str, token: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "kb", *args],
            cwd=ROOT,
            env={**base, "VOICEASSIST_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=180,
        )

    ingested = cli(
        "ingest",
        str(tmp_path / "notes"),
        str(tmp_path / "gout.pdf"),
        "--specialty",
        "respiratory",
        token=admin.access_token,
    )
    assert ingested.returncode == 0, ingested.stderr
    assert "2 uploaded, 0 already present, 0 refused" in ingested.stdout
    again = cli("ingest", str(tmp_path / "gout.pdf"), "--no-wait", token=admin.access_token)
    assert "0 uploaded, 1 already present" in again.stdout
    denied = cli("ingest", str(tmp_path / "notes"), "--no-wait", token=user.access_token)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr

    found = cli("search", f"colchicine {word}", "--json", "--specialty", "respiratory", token=user.access_token)
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)["results"]
    assert results[0]["page"] == 2 and word in results[0]["snippet"]
