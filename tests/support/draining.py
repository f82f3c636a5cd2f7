"""Graceful shutdown under load, watched through a server's own Prometheus metrics: SIGTERM arrives while the
server is known to be handling every call a test started."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable

import httpx

from tests.support.mesh import Server


def rpc_counts(metrics_port: int, grpc_service: str, method: str) -> tuple[float, float]:
    """(calls of `grpc_service` in flight, `method` calls finished), from the server's Prometheus endpoint."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    in_flight = finished = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_in_flight{") and f'grpc_service="{grpc_service}"' in line:
            in_flight = float(line.rsplit(" ", 1)[1])
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            finished += float(line.rsplit(" ", 1)[1])
    return in_flight, finished


async def sigterm_while_handling(
    server: Server, metrics_port: int, grpc_service: str, method: str, calls: list[Awaitable[object]], streams: int = 0
) -> list[object]:
    """SIGTERM `server` once it handles all `calls` of `method` (started by the caller; some may be done) plus
    `streams` open streams of the same service; the calls' results, exceptions included."""
    pending = [asyncio.ensure_future(call) for call in calls]
    while True:
        in_flight, finished = await asyncio.to_thread(rpc_counts, metrics_port, grpc_service, method)
        if in_flight + finished >= len(pending) + streams:
            break
        await asyncio.sleep(0.01)
    assert finished < len(pending), "the calls finished before SIGTERM could arrive"
    server.process.send_signal(signal.SIGTERM)
    return await asyncio.gather(*pending, return_exceptions=True)
