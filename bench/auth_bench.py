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
from tests.support.clients import STRONG_PASSWORD, register_and_login
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc


def main() -> None:
    require_tools("h2load", "wrk")
    with embedded_system() as system, tempfile.TemporaryDirectory() as tmp:
        server, envoy = system.servers[0], system.envoy
        assert envoy is not None
        with grpc.insecure_channel(server.address) as channel:
            account = register_and_login(channel)
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            login_ms = []
            for _ in range(30):
                started = time.perf_counter()
                stub.Login(auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD), timeout=30)
                login_ms.append((time.perf_counter() - started) * 1000)
        body = Path(tmp) / "empty.grpc"
        body.write_bytes(grpc_frame(b""))
        headers = {"content-type": "application/grpc", "te": "trailers", **account.headers}
        path = "/voiceassist.auth.v1.AuthService/GetCurrentUser"
        direct = [h2load_rps(f"http://{server.address}{path}", body, headers) for _ in range(RUNS)]
        via_envoy = [h2load_rps(f"http://{envoy.address}{path}", body, headers) for _ in range(RUNS)]
        json = [wrk_rps(f"{envoy.http}/v1/users/me", account.headers) for _ in range(RUNS)]
    table(
        "auth (embedded mode, 2 cores; load tool on the same machine)",
        [
            (
                "Login p50 / p95 (argon2id m=19MiB t=2, sequential)",
                f"{median(login_ms):.1f} / {percentile(login_ms, 95):.1f} ms",
            ),
            (f"GetCurrentUser gRPC direct (median of {RUNS})", f"{median(direct):,.0f} calls/s"),
            (f"GetCurrentUser gRPC through Envoy (median of {RUNS})", f"{median(via_envoy):,.0f} calls/s"),
            (f"GET /v1/users/me JSON through Envoy (median of {RUNS})", f"{median(json):,.0f} calls/s"),
        ],
    )


if __name__ == "__main__":
    main()
