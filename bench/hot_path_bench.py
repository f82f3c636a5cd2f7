"""Hot path: the mesh against the FastAPI monolith it replaces (bench/peer/), the same work side by side in one run.

One process each: the mesh's auth (or search) worker behind Envoy (driven by the control plane, as in production)
and the peer's uvicorn worker, on the same PostgreSQL and Redis with the same account and token, and for search the
same index (the search service's, copied for the peer). Runs alternate (mesh, peer, mesh, ...) so that the machine's
drift hits both alike; every figure is a median of RUNS runs. CPU milliseconds per request come from /proc/<pid>/stat
before and after each run: steadier than requests/s on a noisy 2-core machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from google.protobuf.json_format import MessageToDict

from bench.common import RUNS, Post, WrkRun, measured, median, require_tools, table, wrk
from services import launcher
from services.core import registry
from services.core.settings import ROOT
from services.search import cli as search_cli
from services.search.settings import search_settings
from tests.support.admin import create_admin
from tests.support.clients import register_and_login
from tests.support.mesh import Cluster, Server, drop_schemas, free_port
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.search.v1 import search_pb2

SECONDS = 10
READ_TARGET = 1.0  # mesh / peer requests per second, one process each
SCIFACT = ROOT.parent / "shared" / "eval" / "retrieval" / "scifact"
SEARCH_DOCUMENTS = 1000
QUERIES = 50
CONNECTIONS = 50


@dataclass
class Side:
    """One side of a comparison: where to send the load and which processes serve it."""

    url: str
    serving: dict[str, list[int]]  # the measured processes: name -> pids


@dataclass
class Result:
    runs: list[WrkRun]
    cpu: list[dict[str, float]]

    def rps(self) -> float:
        return median([r.rps for r in self.runs])

    def cpu_ms(self, name: str) -> float:
        return median([c[name] for c in self.cpu])

    def latency(self) -> str:
        return f"{median([r.p50_ms for r in self.runs]):.1f} / {median([r.p99_ms for r in self.runs]):.1f} ms"


def _compare(mesh: Side, peer: Side, headers: dict[str, str], posts: list[Post] | None = None) -> tuple[Result, Result]:
    """Alternating wrk runs against both sides after a warm-up of each (GETs of the url, or `posts` in turn)."""
    for side in (mesh, peer):
        wrk(side.url, headers, seconds=3, posts=posts)
    results = (Result([], []), Result([], []))
    for _ in range(RUNS):
        for side, result in zip((mesh, peer), results, strict=True):
            run, cpu = measured(side.url, headers, side.serving, SECONDS, posts)
            result.runs.append(run)
            result.cpu.append(cpu)
    return results


def _start_peer(cluster: Cluster, jwks: list[dict], index: Path | None, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "bench.peer.app:app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    env = {**cluster.env, "PEER_JWKS": json.dumps(jwks), "PEER_INDEX": str(index or "")}
    process = launcher.spawn(args, env=env, log_path=workdir / "peer.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/docs", timeout=1)
            return process, base
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError((workdir / "peer.log").read_text()[-3000:]) from None
            time.sleep(0.2)


def _rows(call: str, mesh: Result, peer: Result, services: list[str], target: float | None) -> list[tuple[str, ...]]:
    ratio = mesh.rps() / peer.rps()
    own, peer_cpu = sum(mesh.cpu_ms(name) for name in services), peer.cpu_ms("peer")
    ratio_row: tuple[str, ...] = (f"{call}: ratio mesh / peer", f"{ratio:.2f}x")
    cpu_row: tuple[str, ...] = (
        f"{call}: CPU ms per request, {' + '.join(services)} / peer",
        f"{own:.2f} / {peer_cpu:.2f}",
    )
    if target is not None:
        ratio_row += (f">= {target}", "met" if ratio >= target else "not met")
        cpu_row += ("<= peer", "met" if own <= peer_cpu else "not met")
    return [
        (f"{call}: mesh / peer req/s", f"{mesh.rps():,.0f} / {peer.rps():,.0f}"),
        ratio_row,
        (f"{call}: p50 / p99 mesh", mesh.latency()),
        (f"{call}: p50 / p99 peer", peer.latency()),
        cpu_row,
        (f"{call}: CPU ms per request, Envoy (mesh only)", f"{mesh.cpu_ms('envoy'):.2f}"),
    ]


def _index_copy(cluster: Cluster, search: Server, workdir: Path) -> tuple[Path | None, Server]:
    """Index SEARCH_DOCUMENTS SciFact abstracts through the mesh, then copy the search service's index for the
    peer (stopped first, so the copy is whole; the search service restarts on the same port). The copy (None
    without the shared evaluation data) and the search server."""
    if not (SCIFACT / "corpus.jsonl").exists():
        return None, search
    with grpc.insecure_channel(search.address) as channel, grpc.insecure_channel(cluster.envoy.address) as edge:
        admin = create_admin(cluster, edge)
        conn = search_cli.Connection(channel, admin.metadata)
        meta = search_pb2.DocumentMetadata(source_type="journal", specialty="biomedical")
        added = search_cli.ingest_beir(conn, search_cli.read_beir_corpus(SCIFACT, SEARCH_DOCUMENTS), meta, workers=4)
        failed = search_cli.wait_indexed(conn, [a.document_id for a in added if a.document_id])
        if failed:
            raise RuntimeError(f"{len(failed)} documents failed to index")
    search.stop()
    copy = workdir / "peer-index"
    shutil.copytree(Path(cluster.env["DATA_DIR"]) / "qdrant" / search_settings().collection, copy)
    restarted = cluster.start("search", port=search.port)
    launcher.wait_healthy(cluster.envoy.address, [registry.spec("search").grpc_service], timeout=60)
    return copy, restarted


def _questions() -> list[str]:
    with (SCIFACT / "queries.jsonl").open() as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()][:QUERIES]


def _conversations(envoy_http: str, headers: dict[str, str]) -> list[str]:
    """As many conversations as load connections: questions asked in turn rarely meet in one conversation."""
    with httpx.Client(base_url=envoy_http, headers=headers, timeout=30) as http:
        made = [http.post("/v1/conversations", json={"title": f"bench {i}"}) for i in range(CONNECTIONS)]
    return [reply.json()["conversation"]["id"] for reply in made]


def main() -> None:
    require_tools("wrk")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster.create(workdir, mesh=True)
        peer = None
        try:
            cluster.start_control_plane()
            # Every process knows where the others are: rag calls search, and a health check through Envoy may
            # land on any of them.
            ports = {name: free_port() for name in ("auth", "search", "rag")}
            for name, port in ports.items():
                cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
            auth, search, rag = (cluster.start(name, port=port) for name, port in ports.items())
            envoy = cluster.start_xds_envoy(wait_for=[registry.spec(n).grpc_service for n in ("auth", "search", "rag")])
            with grpc.insecure_channel(envoy.address) as channel:
                account = register_and_login(channel)
                keys = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=10).keys
            jwks = [MessageToDict(k, preserving_proto_field_name=True) for k in keys]
            index, search = _index_copy(cluster, search, workdir)
            peer, peer_url = _start_peer(cluster, jwks, index, workdir)
            read = _compare(
                Side(f"{envoy.http}/v1/users/me", {"auth": [auth.process.pid], "envoy": [envoy.process.pid]}),
                Side(f"{peer_url}/v1/users/me", {"peer": [peer.pid]}),
                account.headers,
            )
            found = answered = None
            if index is not None:
                questions = _questions()
                searches = [("/v1/search", json.dumps({"query": q, "pageSize": 10})) for q in questions]
                found = _compare(
                    Side(f"{envoy.http}/v1/search", {"search": [search.process.pid], "envoy": [envoy.process.pid]}),
                    Side(f"{peer_url}/v1/search", {"peer": [peer.pid]}),
                    account.headers,
                    searches,
                )
                chats = _conversations(envoy.http, account.headers)
                asks = [
                    (f"/v1/conversations/{chats[i % len(chats)]}:ask", json.dumps({"query": q}))
                    for i, q in enumerate(questions)
                ]
                mesh_side = {"rag": [rag.process.pid], "search": [search.process.pid], "envoy": [envoy.process.pid]}
                answered = _compare(
                    Side(envoy.http, mesh_side), Side(peer_url, {"peer": [peer.pid]}), account.headers, asks
                )
        finally:
            if peer is not None:
                launcher.stop_all([peer])
            cluster.stop()
            drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"], ["auth", "search", "rag"])
    rows = _rows("GET /v1/users/me", *read, ["auth"], READ_TARGET)
    if found is not None and answered is not None:
        rows += _rows(f"POST /v1/search (hybrid; {QUERIES} SciFact queries in turn)", *found, ["search"], None)
        rows += _rows("POST .../conversations/{id}:ask (extractive; the same questions)", *answered,
                      ["rag", "search"], None)  # fmt: skip
    else:
        rows.append(("search and Ask", f"skipped ({SCIFACT} not found)"))
    table(
        f"hot path: the mesh (Envoy over xDS, one process per service) against the FastAPI + uvicorn peer (one "
        f"process) on the same PostgreSQL + Redis and the same index ({SEARCH_DOCUMENTS} SciFact abstracts); wrk "
        f"-t2 -c{CONNECTIONS} {SECONDS}s, runs alternating, medians of {RUNS}; everything on the same 2 cores",
        rows,
    )


if __name__ == "__main__":
    main()
