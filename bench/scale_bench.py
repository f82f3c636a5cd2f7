"""Scale-out: authenticated reads (GET /v1/users/me: JWT check, revocation lookup in Redis, one PostgreSQL row)
through Envoy driven by the control plane, with one auth worker and with two, in one run.

The second worker joins and leaves Envoy's endpoints through the control plane between runs (no Envoy restart), and
the runs alternate (1, 2, 1, 2, ...) so that the machine's drift hits both alike; each figure is a median.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import grpc

from bench.common import RUNS, measured, median, pids_named, require_tools, table, wrk_rps
from services.core import registry
from tests.support.clients import register_and_login
from tests.support.mesh import Cluster, Envoy, Server, drop_schemas

TARGET_RATIO = 1.4
SECONDS = 10


def _serving(envoy: Envoy, server: Server, url: str, headers: dict[str, str]) -> None:
    """Wait until Envoy sends `server` reads (it joined the load balancers of Envoy's workers)."""
    deadline = time.monotonic() + 30
    while int(envoy.endpoints("auth").get(server.address, {}).get("rq_total", 0)) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.address} got no reads through Envoy")
        wrk_rps(url, headers, seconds=1, connections=4)


def main() -> None:
    require_tools("wrk")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cluster = Cluster.create(Path(tmp), mesh=True, LOG_LEVEL="WARNING")
        try:
            cluster.start_control_plane()
            first = cluster.start("auth")
            envoy = cluster.start_xds_envoy(wait_for=[registry.spec("auth").grpc_service])
            with grpc.insecure_channel(envoy.address) as channel:
                account = register_and_login(channel)
            url = f"{envoy.http}/v1/users/me"
            wrk_rps(url, account.headers, seconds=3)  # warm up
            one, two, costs = [], [], []
            for _ in range(RUNS):
                one.append(wrk_rps(url, account.headers, seconds=SECONDS))
                second = cluster.start("auth")
                _serving(envoy, second, url, account.headers)
                wrk_rps(url, account.headers, seconds=3)  # the new worker warms up (pools, caches) like the first
                groups = {
                    "auth": [first.process.pid, second.process.pid],
                    "envoy": [envoy.process.pid],
                    "postgresql": pids_named("postgres"),
                    "redis": pids_named("redis-server"),
                }
                run, cpu = measured(url, account.headers, groups, SECONDS)
                rps = run.rps
                two.append(rps)
                costs.append(cpu)
                second.stop()  # withdraws from Envoy, then stops
            assert envoy.endpoints("auth").keys() == {first.address}
        finally:
            cluster.stop()
            drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"], ["auth"])
    ratio = median(two) / median(one)
    cpu_ms = {name: median([c[name] for c in costs]) for name in costs[0]}
    table(
        f"scale-out: GET /v1/users/me through Envoy (xDS) to auth workers on PostgreSQL + Redis; wrk -t2 -c50 "
        f"{SECONDS}s, runs alternating, median of {RUNS}; load tool, Envoy, PostgreSQL and Redis on the same 2 cores",
        [
            ("1 auth worker", f"{median(one):,.0f} req/s (runs: {', '.join(f'{r:,.0f}' for r in one)})"),
            ("2 auth workers", f"{median(two):,.0f} req/s (runs: {', '.join(f'{r:,.0f}' for r in two)})"),
            (
                "2 workers / 1 worker",
                f"{ratio:.3f}x",  # three places: 1.397 shown as "1.40x" read as met
                f">= {TARGET_RATIO}",
                "met" if ratio >= TARGET_RATIO else "not met",
            ),
            (
                "CPU per read with 2 workers (ms, median)",
                ", ".join(f"{name} {ms:.2f}" for name, ms in cpu_ms.items()) + f"; total {sum(cpu_ms.values()):.2f}",
            ),
        ],
    )


if __name__ == "__main__":
    main()
