"""Auth: login latency (argon2id cost) and GetCurrentUser throughput, direct gRPC and JSON through Envoy."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import grpc

from bench.common import (
    RUNS,
    embedded_system,
    grpc_frame,
    h2load_rps,
    median,
    percentile,
    require_tools,
    table,
    wrk_rps,
)
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login
from tests.support.mesh import Cluster, drop_schemas
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

PATH = "/voiceassist.auth.v1.AuthService/GetCurrentUser"


def _login_ms(address: str) -> tuple[list[float], Account]:
    with grpc.insecure_channel(address) as channel:
        account = register_and_login(channel)
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        login_ms = []
        for _ in range(30):
            started = time.perf_counter()
            stub.Login(auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD), timeout=30)
            login_ms.append((time.perf_counter() - started) * 1000)
    return login_ms, account


def _grpc_headers(account: Account) -> dict[str, str]:
    return {"content-type": "application/grpc", "te": "trailers", **account.headers}


def main() -> None:
    require_tools("h2load", "wrk")
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "empty.grpc"
        body.write_bytes(grpc_frame(b""))
        with embedded_system() as system:
            server, envoy = system.servers[0], system.envoy
            assert envoy is not None
            login_ms, account = _login_ms(server.address)
            headers = _grpc_headers(account)
            direct = [h2load_rps(f"http://{server.address}{PATH}", body, headers) for _ in range(RUNS)]
            via_envoy = [h2load_rps(f"http://{envoy.address}{PATH}", body, headers) for _ in range(RUNS)]
            json = [wrk_rps(f"{envoy.http}/v1/users/me", account.headers) for _ in range(RUNS)]
        # The production path: one auth process on PostgreSQL (asyncpg) with the revocation list in Redis.
        mesh = Cluster.create(Path(tmp), mesh=True)
        try:
            auth = mesh.start("auth")
            mesh_login_ms, mesh_account = _login_ms(auth.address)
            mesh_direct = [
                h2load_rps(f"http://{auth.address}{PATH}", body, _grpc_headers(mesh_account)) for _ in range(RUNS)
            ]
        finally:
            mesh.stop()
            drop_schemas(mesh.env["DATABASE_SCHEMA_PREFIX"], ["auth", "audit"])
    table(
        "auth (embedded mode: SQLite, in-process stores; mesh: one auth process on PostgreSQL + Redis; 2 cores, load "
        "tool on the same machine)",
        [
            (
                "Login p50 / p95 (argon2id m=19MiB t=2, sequential)",
                f"{median(login_ms):.1f} / {percentile(login_ms, 95):.1f} ms",
            ),
            (f"GetCurrentUser gRPC direct (median of {RUNS})", f"{median(direct):,.0f} calls/s"),
            (f"GetCurrentUser gRPC through Envoy (median of {RUNS})", f"{median(via_envoy):,.0f} calls/s"),
            (f"GET /v1/users/me JSON through Envoy (median of {RUNS})", f"{median(json):,.0f} calls/s"),
            (
                "mesh (PostgreSQL + Redis): Login p50 / p95",
                f"{median(mesh_login_ms):.1f} / {percentile(mesh_login_ms, 95):.1f} ms",
            ),
            (f"mesh: GetCurrentUser gRPC direct (median of {RUNS})", f"{median(mesh_direct):,.0f} calls/s"),
        ],
    )


if __name__ == "__main__":
    main()
