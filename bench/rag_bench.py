"""Rag: Ask latency with the extractive generator over a SciFact knowledge base (end to end through the embedded
system: PHI detection, the search service, generation, storage), StreamAsk time to first delta, how often answers
cite a judged abstract, and the extractive relevance threshold re-measured offline.

Needs ../shared/eval/retrieval/scifact (BEIR format); skips cleanly without it.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import grpc

from bench.common import RUNS, embedded_system, median, percentile, table
from bench.retrieval_eval import DATA, load_eval
from services.rag.extractive import MIN_COVERAGE, NOT_FOUND, best_coverage, terms
from services.rag.retrieval import Passage
from services.search import cli
from tests.support.admin import create_admin
from tests.support.clients import register_and_login
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2

QUESTIONS = 50  # SciFact test claims asked per run
EXTRA_DOCUMENTS = 250  # unjudged abstracts indexed next to the judged ones, so retrieval has to choose


def _passage(doc: dict) -> Passage:
    return Passage(str(doc["_id"]), doc.get("title", ""), str(doc["_id"]), doc.get("text", ""), 0, 0.0)


def threshold_rows(corpus: list[dict], queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> list[tuple]:
    """Share of claims whose best sentence passes MIN_COVERAGE: with the judged abstract among 8 passages, with 8
    random abstracts, and with the 8 abstracts sharing most words with the claim (judged ones removed)."""
    by_id = {str(d["_id"]): d for d in corpus}
    bags = {i: set(terms(f"{d.get('title', '')} {d.get('text', '')}")) for i, d in by_id.items()}
    df = Counter(t for bag in bags.values() for t in bag)
    rng = random.Random(7)
    ids = list(by_id)
    judged, unrelated, lexical = [], [], []
    for query_id, relevant in qrels.items():
        claim = queries[query_id]
        others = [i for i in rng.sample(ids, 16) if i not in relevant][:8]
        mixed = list(relevant)[:8] + others[: max(0, 8 - len(relevant))]
        wanted = set(terms(claim))
        close = sorted(
            (i for i in ids if i not in relevant),
            key=lambda i: -sum(math.log(len(ids) / df[t]) for t in wanted & bags[i]),
        )[:8]
        judged.append(best_coverage(claim, [_passage(by_id[i]) for i in mixed]))
        unrelated.append(best_coverage(claim, [_passage(by_id[i]) for i in others]))
        lexical.append(best_coverage(claim, [_passage(by_id[i]) for i in close]))

    def passing(values: list[float]) -> str:
        return f"{sum(v >= MIN_COVERAGE for v in values) / len(values):.0%}"

    return [
        (f"answered: judged abstract among 8 passages (n={len(judged)})", passing(judged)),
        ("answered: 8 random abstracts (should be refused)", passing(unrelated)),
        ("answered: 8 lexically closest unjudged abstracts", passing(lexical)),
    ]


def main() -> None:
    if not (DATA / "corpus.jsonl").exists():
        print(f"\nrag_bench: skipped ({DATA} not found)")
        return
    corpus, queries, qrels = load_eval()
    asked = dict(list(queries.items())[:QUESTIONS])
    wanted_ids = {doc for q in asked for doc in qrels[q]}
    rng = random.Random(11)
    extra = rng.sample([d for d in corpus if str(d["_id"]) not in wanted_ids], EXTRA_DOCUMENTS)
    documents = [d for d in corpus if str(d["_id"]) in wanted_ids] + extra

    with embedded_system() as system:
        server = system.servers[0]
        with grpc.insecure_channel(server.address) as channel:
            admin = create_admin(system, channel)
            conn = cli.Connection(channel, admin.metadata)
            added = cli.ingest_beir(conn, documents, search_pb2.DocumentMetadata(source_type="journal"), workers=8)
            failed = cli.wait_indexed(conn, [a.document_id for a in added if a.document_id and not a.duplicate])
            to_corpus = {a.document_id: a.key for a in added if a.document_id}
            user = register_and_login(channel)
            stub = rag_pb2_grpc.RagServiceStub(channel)

            p50s, p95s, firsts, stages = [], [], [], Counter()
            answered = cited_judged = 0
            for run in range(RUNS):
                conversation = stub.CreateConversation(
                    rag_pb2.CreateConversationRequest(title=f"bench {run}"), metadata=user.metadata
                ).conversation
                times = []
                for query_id, claim in asked.items():
                    request = rag_pb2.AskRequest(conversation_id=conversation.id, query=claim)
                    begin = time.perf_counter()
                    answer = stub.Ask(request, metadata=user.metadata, timeout=60)
                    times.append((time.perf_counter() - begin) * 1000)
                    for stage in ("phi_ms", "retrieval_ms", "generation_ms", "total_ms"):
                        stages[stage] += getattr(answer.timings, stage)
                    if run == 0:
                        answered += answer.content != NOT_FOUND
                        cited = {to_corpus.get(c.document_id) for c in answer.citations}
                        cited_judged += bool(cited & set(qrels[query_id]))
                p50s.append(median(times))
                p95s.append(percentile(times, 95))
                stream_request = rag_pb2.StreamAskRequest(
                    conversation_id=conversation.id, query=next(iter(asked.values()))
                )
                for _ in range(10):
                    begin = time.perf_counter()
                    for _event in stub.StreamAsk(stream_request, metadata=user.metadata, timeout=60):
                        firsts.append((time.perf_counter() - begin) * 1000)
                        break
    count = RUNS * len(asked)
    rows = [
        ("knowledge base", f"{len(documents)} SciFact abstracts ({len(failed)} failed to index); {len(asked)} claims"),
        (f"Ask p50 / p95, extractive, gRPC direct (median of {RUNS} runs)",
         f"{median(p50s):.1f} / {median(p95s):.1f} ms"),
        ("  server stages, mean: PHI / retrieval / generation / total",
         " / ".join(f"{stages[s] / count:.1f}" for s in ("phi_ms", "retrieval_ms", "generation_ms", "total_ms"))
         + " ms"),
        ("StreamAsk first message p50 (gRPC direct)", f"{median(firsts):.1f} ms"),
        ("answers that quote the knowledge base (not 'not found')", f"{answered / len(asked):.0%}"),
        ("answers citing a judged abstract", f"{cited_judged / len(asked):.0%}"),
    ]  # fmt: skip
    rows += threshold_rows(corpus, queries, qrels)
    table(
        f"rag Ask on SciFact (embedded mode, extractive generator, MIN_COVERAGE {MIN_COVERAGE}; 2 cores shared "
        "with other work: noisy)",
        rows,
    )


if __name__ == "__main__":
    main()
