"""Search: retrieval quality on SciFact (nDCG@10, Recall@100 for DENSE, SPARSE, HYBRID), ingest throughput and
search latency at that scale, all through the gRPC API of the embedded system (`serve all`, embedded Qdrant).

Needs ../shared/eval/retrieval/scifact (BEIR format); skips cleanly without it. Results are chunks: a document's
rank is that of its best chunk, and documents are collected page by page (up to 250 chunks deep) until 100
distinct ones are ranked.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict

import grpc

from bench.common import RUNS, embedded_system, median, percentile, table
from services.core.settings import ROOT
from services.search import cli
from tests.support.admin import create_admin
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

DATA = ROOT.parent / "shared" / "eval" / "retrieval" / "scifact"
MODES = {
    "DENSE": search_pb2.SEARCH_MODE_DENSE,
    "SPARSE": search_pb2.SEARCH_MODE_SPARSE,
    "HYBRID": search_pb2.SEARCH_MODE_HYBRID,
}
SPECIALTY = "biomedical"
INGEST_TARGET = 40  # documents/s from the first upload until every document is INDEXED
P95_TARGET_MS = 20  # HYBRID + filter search p95


def ranked_documents(stub, metadata, query: str, mode: int, depth: int = 100) -> list[str]:
    """Document ids best first (each at its best chunk's rank), paging until `depth` documents or the end."""
    seen: dict[str, None] = {}
    token = ""
    while len(seen) < depth:
        reply = stub.Search(
            search_pb2.SearchRequest(query=query, mode=mode, page_size=50, page_token=token),
            metadata=metadata,
            timeout=60,
        )
        for result in reply.results:
            seen.setdefault(result.document_id)
        token = reply.next_page_token
        if not token:
            break
    return list(seen)[:depth]


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """nDCG@k with graded gains (BEIR's definition)."""
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(sorted(relevant.values(), reverse=True)[:k]))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """Share of relevant documents among the first k."""
    return len(set(ranked[:k]) & set(relevant)) / len(relevant) if relevant else 0.0


def load_eval() -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    """Corpus, test queries by id, and test qrels {query id: {corpus id: gain}}."""
    corpus = cli.read_beir_corpus(DATA)
    queries = {}
    with (DATA / "queries.jsonl").open() as handle:
        for line in handle:
            item = json.loads(line)
            queries[str(item["_id"])] = item["text"]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (DATA / "qrels" / "test.tsv").open() as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return corpus, {q: queries[q] for q in qrels}, qrels


def main() -> None:
    if not (DATA / "corpus.jsonl").exists():
        print(f"\nretrieval_eval: skipped ({DATA} not found)")
        return
    corpus, queries, qrels = load_eval()
    with embedded_system() as system:
        server = system.servers[0]
        with grpc.insecure_channel(server.address) as channel:
            admin = create_admin(system, channel)
            conn = cli.Connection(channel, admin.metadata)
            started = time.perf_counter()
            meta = search_pb2.DocumentMetadata(source_type="journal", specialty=SPECIALTY)
            added = cli.ingest_beir(conn, corpus, meta, workers=8)
            uploaded = time.perf_counter() - started
            failed = cli.wait_indexed(conn, [a.document_id for a in added if a.document_id and not a.duplicate])
            indexed = time.perf_counter() - started
            to_corpus = {a.document_id: a.key for a in added if a.document_id}
            admin = create_admin(system, channel)  # a fresh access token: a slow ingest outlives the first (15 min)
            errors = [a for a in added if a.error]

            stub = search_pb2_grpc.SearchServiceStub(channel)
            quality = {}
            for name, mode in MODES.items():
                ndcg, recall = [], []
                for query_id, text in queries.items():
                    ranked = [to_corpus.get(d, d) for d in ranked_documents(stub, admin.metadata, text, mode)]
                    ndcg.append(ndcg_at(ranked, qrels[query_id], 10))
                    recall.append(recall_at(ranked, qrels[query_id], 100))
                quality[name] = (sum(ndcg) / len(ndcg), sum(recall) / len(recall))

            latency: dict[str, list[float]] = {}
            filters = search_pb2.SearchFilters(specialty=SPECIALTY)
            for label, mode, where in (
                ("HYBRID + filter", MODES["HYBRID"], filters),
                ("HYBRID", MODES["HYBRID"], None),
                ("DENSE", MODES["DENSE"], None),
                ("SPARSE", MODES["SPARSE"], None),
            ):
                p50s, p95s = [], []
                for _ in range(RUNS):
                    times = []
                    for text in queries.values():
                        request = search_pb2.SearchRequest(query=text, mode=mode, page_size=10, filters=where)
                        begin = time.perf_counter()
                        stub.Search(request, metadata=admin.metadata, timeout=30)
                        times.append((time.perf_counter() - begin) * 1000)
                    p50s.append(median(times))
                    p95s.append(percentile(times, 95))
                latency[label] = [median(p50s), median(p95s)]

    rows = [
        (
            "corpus",
            f"{len(corpus):,} abstracts, {len(queries)} test queries; {len(errors)} refused, {len(failed)} failed",
        ),
        ("ingest: uploads accepted", f"{len(corpus) / uploaded:,.1f} documents/s ({uploaded:.0f} s)"),
        (
            "ingest: uploaded -> all INDEXED",
            f"{len(corpus) / indexed:,.1f} documents/s ({indexed:.0f} s)",
            f">= {INGEST_TARGET} documents/s",
            "met" if len(corpus) / indexed >= INGEST_TARGET else "not met",
        ),
    ]
    for name, (ndcg, recall) in quality.items():
        rows.append((f"{name:<6} nDCG@10 / Recall@100", f"{ndcg:.3f} / {recall:.3f}"))
    for label, (p50, p95) in latency.items():
        rows.append((f"Search {label} p50 / p95 (gRPC direct, median of {RUNS})", f"{p50:.1f} / {p95:.1f} ms"))
    p95 = latency["HYBRID + filter"][1]
    rows.append(
        (
            "Search HYBRID + filter p95",
            f"{p95:.1f} ms",
            f"<= {P95_TARGET_MS} ms",
            "met" if p95 <= P95_TARGET_MS else "not met",
        )
    )
    table(
        "search retrieval on SciFact (embedded mode, 2 shared cores; target: HYBRID nDCG@10 >= 0.70)",
        rows,
    )


if __name__ == "__main__":
    main()
