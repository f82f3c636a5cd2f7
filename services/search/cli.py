"""`voiceassist kb ...`: fill and query the knowledge base through the gRPC API (Envoy by default).

Signing in: --token / --email and the token cache, as for every client (services/core/cli_login.py). Writes need
an admin account. Uploads run a few at a time; `--wait` then follows indexing to the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
from tqdm import tqdm

from services.core.cli_login import SignIn, sign_in_options
from services.core.errors import Reason
from services.core.status import error_info, reason_of
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

PIECE = 1 << 20  # UploadDocument's largest message
SUFFIXES = (".pdf", ".txt", ".text", ".md", ".markdown", ".html", ".htm")
MODES = {"hybrid": search_pb2.SEARCH_MODE_HYBRID, "dense": search_pb2.SEARCH_MODE_DENSE,
         "sparse": search_pb2.SEARCH_MODE_SPARSE}  # fmt: skip
FINAL = (search_pb2.DOCUMENT_STATUS_INDEXED, search_pb2.DOCUMENT_STATUS_FAILED)


@dataclass(frozen=True)
class Connection:
    """A channel and the caller's credentials."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]

    @property
    def search(self) -> search_pb2_grpc.SearchServiceStub:
        """A SearchService stub on the channel."""
        return search_pb2_grpc.SearchServiceStub(self.channel)


@dataclass(frozen=True)
class Added:
    """What became of one upload: the document id (new or the earlier duplicate), or an error."""

    key: str
    document_id: str = ""
    duplicate: bool = False
    error: str = ""


def connect(sign_in: SignIn) -> Connection:
    """A channel to the sign-in's address and the metadata that authenticates calls on it."""
    metadata = sign_in.metadata()
    channel = sign_in.channel(options=[("grpc.max_send_message_length", 8 * PIECE)])
    return Connection(channel, metadata)


def describe(error: grpc.RpcError) -> str:
    """STATUS (REASON): message."""
    reason = error_info(error).reason
    return f"{error.code().name}{f' ({reason})' if reason else ''}: {error.details()}"


def _duplicate_of(error: grpc.RpcError) -> str:
    if reason_of(error) is not Reason.DUPLICATE_DOCUMENT:
        return ""
    return error_info(error).metadata.get("document_id", "")


def _outcome(key: str, call) -> Added:
    try:
        return Added(key, call().document.id)
    except grpc.RpcError as exc:
        existing = _duplicate_of(exc)
        return Added(key, existing, duplicate=True) if existing else Added(key, error=describe(exc))


def upload_file(conn: Connection, path: Path, meta: search_pb2.DocumentMetadata) -> Added:
    """UploadDocument for one file, streamed in 1 MiB pieces."""

    def messages() -> Iterator[search_pb2.UploadDocumentRequest]:
        yield search_pb2.UploadDocumentRequest(metadata=meta)
        with path.open("rb") as handle:
            while piece := handle.read(PIECE):
                yield search_pb2.UploadDocumentRequest(chunk=piece)

    return _outcome(str(path), lambda: conn.search.UploadDocument(messages(), metadata=conn.metadata, timeout=300))


def create_text(conn: Connection, key: str, text: str, meta: search_pb2.DocumentMetadata) -> Added:
    """CreateDocument with text."""
    request = search_pb2.CreateDocumentRequest(metadata=meta, text=text)
    return _outcome(key, lambda: conn.search.CreateDocument(request, metadata=conn.metadata, timeout=60))


def run_all(jobs: list, work, workers: int, label: str) -> list[Added]:
    """`work(job)` for every job, `workers` at a time, with a progress bar."""
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc=label, unit="doc") as bar:
        results = []
        for added in pool.map(work, jobs):
            results.append(added)
            bar.update(1)
        return results


def wait_indexed(conn: Connection, document_ids: Iterable[str], poll_seconds: float = 1.0) -> dict[str, str]:
    """Follow the documents until each is INDEXED or FAILED, with a progress bar; {id: error} of the failed."""
    pending = dict.fromkeys(document_ids)  # ordered: documents finish roughly in upload order
    failed: dict[str, str] = {}
    with tqdm(total=len(pending), desc="indexing", unit="doc") as bar:
        while pending:
            # One WatchDocument stream per document would not scale to thousands: poll, oldest first.
            for document_id in list(pending):
                reply = conn.search.GetDocument(
                    search_pb2.GetDocumentRequest(document_id=document_id), metadata=conn.metadata, timeout=30
                ).document
                if reply.status in FINAL:
                    del pending[document_id]
                    bar.update(1)
                    if reply.status == search_pb2.DOCUMENT_STATUS_FAILED:
                        failed[document_id] = reply.error
                else:
                    break  # the oldest unfinished one is still running: look again later
            if pending:
                time.sleep(poll_seconds)
    return failed


def read_beir_corpus(folder: Path, limit: int | None = None) -> list[dict]:
    """The documents of a BEIR corpus.jsonl (`_id`, `title`, `text`)."""
    corpus = folder / "corpus.jsonl"
    if not corpus.exists():
        raise click.ClickException(f"{corpus} not found (a BEIR folder holds corpus.jsonl)")
    documents = []
    with corpus.open() as handle:
        for line in handle:
            if line.strip():
                documents.append(json.loads(line))
            if limit is not None and len(documents) >= limit:
                break
    return documents


def ingest_beir(
    conn: Connection, documents: list[dict], meta: search_pb2.DocumentMetadata, workers: int
) -> list[Added]:
    """CreateDocument for every BEIR document (title as title, text as plain text)."""

    def work(doc: dict) -> Added:
        own = search_pb2.DocumentMetadata()
        own.CopyFrom(meta)
        own.title = (doc.get("title") or "")[:500]
        own.file_name = f"{doc['_id']}.txt"
        own.media_type = "text/plain"
        return create_text(conn, str(doc["_id"]), doc.get("text") or doc.get("title") or "", own)

    return run_all(documents, work, workers, "uploading")


def _report(results: list[Added]) -> None:
    new = sum(1 for r in results if r.document_id and not r.duplicate)
    duplicates = sum(1 for r in results if r.duplicate)
    errors = [r for r in results if r.error]
    click.echo(f"{new} uploaded, {duplicates} already present, {len(errors)} refused")
    for r in errors[:20]:
        click.echo(f"  {r.key}: {r.error}", err=True)


def _files(paths: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise click.ClickException(f"{path} does not exist")
    return found


def _metadata_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--specialty", default="", help="Specialty of every document, e.g. cardiology."),
        click.option("--source-type", default="",
                     help="textbook, journal, guideline, drug_reference, note, web or other."),
        click.option("--tag", "tags", multiple=True, help="A tag for every document (repeatable)."),
        click.option("--workers", default=4, show_default=True, help="Uploads in flight."),
        click.option("--wait/--no-wait", default=True, show_default=True, help="Follow indexing to the end."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@click.group("kb")
def kb() -> None:
    """The knowledge base: upload documents and search them."""


@kb.command("ingest")
@click.argument("paths", nargs=-1, required=True)
@sign_in_options
@_metadata_options
def ingest_command(paths, sign_in, specialty, source_type, tags, workers, wait) -> None:
    """Upload files (PDF, text, Markdown, HTML; folders are searched) as admin."""
    conn = connect(sign_in)
    files = _files(paths)

    def work(path: Path) -> Added:
        meta = search_pb2.DocumentMetadata(specialty=specialty, source_type=source_type, tags=list(tags),
                                           file_name=path.name)  # fmt: skip
        return upload_file(conn, path, meta)

    results = run_all(files, work, workers, "uploading")
    _report(results)
    _finish(conn, results, wait)


@kb.command("ingest-beir")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--limit", type=int, help="Only the first N documents.")
@click.option("--map-out", type=click.Path(dir_okay=False, path_type=Path), help="Write {corpus id: document id}.")
@sign_in_options
@_metadata_options
def ingest_beir_command(folder, limit, map_out, sign_in, specialty, source_type, tags, workers, wait) -> None:
    """Upload a BEIR corpus (FOLDER/corpus.jsonl) as admin, one document per line."""
    conn = connect(sign_in)
    meta = search_pb2.DocumentMetadata(specialty=specialty, source_type=source_type or "journal", tags=list(tags))
    results = ingest_beir(conn, read_beir_corpus(folder, limit), meta, workers)
    _report(results)
    if map_out:
        map_out.write_text(json.dumps({r.key: r.document_id for r in results if r.document_id}))
    _finish(conn, results, wait)


def _finish(conn: Connection, results: list[Added], wait: bool) -> None:
    if wait:
        failed = wait_indexed(conn, [r.document_id for r in results if r.document_id and not r.duplicate])
        for document_id, error in failed.items():
            click.echo(f"  FAILED {document_id}: {error}", err=True)
    if any(r.error for r in results):
        raise SystemExit(1)


@kb.command("search")
@click.argument("query")
@click.option("--mode", type=click.Choice(list(MODES)), default="hybrid", show_default=True)
@click.option("--specialty", default="", help="Only this specialty.")
@click.option("--source-type", default="", help="Only this source type.")
@click.option("--tag", "tags", multiple=True, help="Only documents with one of these tags.")
@click.option("--limit", default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
@sign_in_options
def search_command(query, mode, specialty, source_type, tags, limit, as_json, sign_in) -> None:
    """Search the knowledge base (any signed-in account)."""
    conn = connect(sign_in)
    request = search_pb2.SearchRequest(
        query=query, mode=MODES[mode], page_size=limit,
        filters=search_pb2.SearchFilters(specialty=specialty, source_type=source_type, tags=list(tags)),
    )  # fmt: skip
    try:
        reply = conn.search.Search(request, metadata=conn.metadata, timeout=30)
    except grpc.RpcError as exc:
        raise click.ClickException(describe(exc)) from None
    if as_json:
        from google.protobuf.json_format import MessageToJson

        click.echo(MessageToJson(reply))
        return
    if not reply.results:
        click.echo("no results")
    for rank, result in enumerate(reply.results, 1):
        page = f" p.{result.page}" if result.page else ""
        click.echo(f"{rank:>2}. {result.title}{page}  [{result.relevance_score:.4f}]  {result.document_id}")
        click.echo(f"    {result.snippet[:300]}")
