"""The cost of encryption: the authenticated read (GET /v1/users/me) through Envoy to auth, with mutual TLS between
the processes and HTTPS at the edge, against the same mesh in plaintext, side by side in one run.

Two clusters on the same PostgreSQL and Redis, each a control plane, one auth process and Envoy over xDS; runs
alternate (plaintext, TLS, plaintext, ...) and every figure is a median of RUNS runs. wrk keeps its connections
open, as browsers and the SDK do, so the figure is the steady cost (record encryption), not handshakes; CPU
milliseconds per request come from /proc.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import RUNS, WrkRun, measured, median, require_tools, table, wrk
from services.core import registry
from tests.support.clients import register_and_login
from tests.support.mesh import Cluster, drop_schemas

SECONDS = 10
TARGET_RATIO = 0.8  # requests/s with TLS over plaintext: encryption should cost no more than a fifth


def _start(workdir: Path, tls: bool) -> tuple[Cluster, str, dict[str, str], dict[str, list[int]]]:
    workdir.mkdir()
    cluster = Cluster.create(workdir, mesh=True, tls=tls, LOG_LEVEL="WARNING")
    cluster.start_control_plane()
    auth = cluster.start("auth")
    cluster.point_at("auth", auth)
    envoy = cluster.start_xds_envoy(wait_for=[registry.spec("auth").grpc_service])
    with cluster.edge_channel() as channel:
        account = register_and_login(channel)
    pids = {"auth": [auth.process.pid], "envoy": [envoy.process.pid]}
    return cluster, f"{envoy.http}/v1/users/me", account.headers, pids


def main() -> None:
    require_tools("wrk")
    with tempfile.TemporaryDirectory(prefix="bench-mtls-") as tmp:
        clusters: list[Cluster] = []
        try:
            sides = {}
            for name, tls in (("plaintext", False), ("mutual TLS", True)):
                started = _start(Path(tmp) / name.replace(" ", "-"), tls)
                clusters.append(started[0])
                sides[name] = started[1:]
            for url, headers, _ in sides.values():
                wrk(url, headers, seconds=3)  # warm-up
            results: dict[str, list[tuple[WrkRun, dict[str, float]]]] = {name: [] for name in sides}
            for _ in range(RUNS):
                for name, (url, headers, pids) in sides.items():
                    results[name].append(measured(url, headers, pids, SECONDS))
        finally:
            for cluster in clusters:
                cluster.stop()
                drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"], ["auth"])

    def rps(name: str) -> float:
        return median([run.rps for run, _ in results[name]])

    def cpu(name: str, group: str) -> float:
        return median([c[group] for _, c in results[name]])

    def latency(name: str) -> str:
        runs = [run for run, _ in results[name]]
        return f"{median([r.p50_ms for r in runs]):.1f} / {median([r.p99_ms for r in runs]):.1f} ms"

    ratio = rps("mutual TLS") / rps("plaintext")
    rows = [
        ("GET /v1/users/me req/s: plaintext / mutual TLS", f"{rps('plaintext'):,.0f} / {rps('mutual TLS'):,.0f}"),
        (
            "ratio mutual TLS / plaintext",
            f"{ratio:.2f}x",
            f">= {TARGET_RATIO}",
            "met" if ratio >= TARGET_RATIO else "not met",
        ),
        ("p50 / p99 plaintext", latency("plaintext")),
        ("p50 / p99 mutual TLS", latency("mutual TLS")),
    ]
    for group in ("auth", "envoy"):
        rows.append((f"CPU ms per request, {group}: plaintext / mutual TLS",
                     f"{cpu('plaintext', group):.2f} / {cpu('mutual TLS', group):.2f}"))  # fmt: skip
    table(
        f"transport security: the authenticated read through Envoy with mutual TLS between the processes and HTTPS "
        f"at the edge, against plaintext; wrk -t2 -c50 {SECONDS}s on kept-alive connections, runs alternating, "
        f"medians of {RUNS}; everything on the same 2 cores",
        rows,
    )


if __name__ == "__main__":
    main()
