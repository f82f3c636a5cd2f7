"""Real servers, control planes and Envoys for tests: processes on free ports, ready when gRPC health says so."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import redis

from services import launcher
from services.control_plane import envoy_config
from services.core import identity, registry
from services.core.certificates import OperatorCertificate
from services.core.settings import CoreSettings

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
EVERY_SERVICE = tuple(s.grpc_service for s in registry.SERVICES)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for a service's workers)."""
    for _ in range(100):
        first = free_port()
        if first + count < 65536 and not any(launcher.port_in_use("127.0.0.1", first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class Server:
    """One `voiceassist serve` process."""

    services: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        """host:port of its gRPC server."""
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything it logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        return launcher.stop_all([self.process])[0]

    def kill(self) -> int:
        """SIGKILL and wait: a crash."""
        self.process.kill()
        return self.process.wait()


@dataclass
class Envoy:
    """An Envoy process in front of some servers."""

    port: int
    admin_port: int
    process: subprocess.Popen
    log: Path
    host: str = "127.0.0.1"  # where this test process reaches its listener and its admin interface
    tls: bool = False  # HTTPS at the listener (mesh TLS)

    @property
    def http(self) -> str:
        """Base URL for JSON calls."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port for gRPC calls."""
        return f"{self.host}:{self.port}"

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        return launcher.stop_all([self.process])[0]

    def admin(self, path: str) -> str:
        """GET a page of Envoy's admin interface."""
        return httpx.get(f"http://{self.host}:{self.admin_port}{path}", timeout=10).text

    def endpoints(self, cluster: str) -> dict[str, dict[str, str]]:
        """Envoy's view of a cluster's endpoints: "host:port" -> {"rq_total": ..., "health_flags": ..., ...}."""
        found: dict[str, dict[str, str]] = {}
        for line in self.admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and ":" in parts[1]:
                found.setdefault(parts[1], {})[parts[2]] = parts[3]
        return found

    def stat(self, name: str) -> int:
        """One counter or gauge from Envoy's /stats (0 when absent)."""
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


@dataclass
class Cluster:
    """Servers (and optionally Envoy) sharing one environment: data dir, database schemas, Redis prefix."""

    workdir: Path
    env: dict[str, str]
    servers: list[Server] = field(default_factory=list)
    envoy: Envoy | None = None
    control_plane: Server | None = None
    _operator: OperatorCertificate | None = None

    @classmethod
    def create(cls, workdir: Path, *, mesh: bool, tls: bool = False, **extra_env: str) -> Cluster:
        """A cluster in `workdir`; `mesh` uses PostgreSQL and Redis, otherwise SQLite and in-process stores; `tls`
        runs mutual TLS between its processes and HTTPS at Envoy (start the control plane first: it issues the
        certificates)."""
        run = uuid.uuid4().hex[:8]
        env = {
            "MESH_TLS": "true" if tls else "false",
            "MESH_JOIN_TOKEN": uuid.uuid4().hex if tls else "",
            "ENVIRONMENT": "test",
            "DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "INFO",
            "DATABASE_URL": TEST_DATABASE_URL if mesh else "",
            "DATABASE_SCHEMA_PREFIX": f"t{run}_",
            "REDIS_URL": TEST_REDIS_URL if mesh else "",
            "REDIS_KEY_PREFIX": f"test:{run}:",
            "SHUTDOWN_GRACE_SECONDS": "10",
            # Every test call comes from 127.0.0.1: the per-IP limits would throttle the suite itself. The
            # rate-limit tests set the production values back.
            "AUTH_LOGIN_PER_MINUTE": "10000",
            "AUTH_REGISTER_PER_HOUR": "10000",
            "AUTH_REFRESH_PER_MINUTE": "10000",
        }
        env.update(extra_env)
        return cls(workdir, env)

    def settings(self) -> CoreSettings:
        """The core settings this cluster's processes read."""
        fields = CoreSettings.model_fields
        return CoreSettings(_env_file=None, **{k.lower(): v for k, v in self.env.items() if k.lower() in fields})

    def start(
        self, services: str, *, port: int | None = None, metrics_port: int | None = None, wait: bool = True,
        **extra_env: str,
    ) -> Server:  # fmt: skip
        """Start `voiceassist serve SERVICES` and (unless `wait` is false) wait until every hosted service is
        SERVING."""
        port = port or free_port()
        log = self.workdir / f"{services}-{port}.log"
        env = {**self.env, **extra_env}
        process = launcher.start_server(services, port, metrics_port, env=env, log_path=log)
        server = Server(services, port, process, log)
        self.servers.append(server)
        names = (
            [s.grpc_service for s in registry.SERVICES] if services == "all" else [registry.spec(services).grpc_service]
        )
        if wait:
            self.wait_serving(server, names)
        return server

    @property
    def tls(self) -> bool:
        """Whether this cluster runs mutual TLS."""
        return self.env.get("MESH_TLS") == "true"

    @property
    def trust_bundle(self) -> Path:
        """The mesh's root certificate (PEM), written by the control plane."""
        return self.settings().trust_bundle_path

    def operator(self) -> identity.Credentials:
        """A certificate for the operator workload, issued by this cluster's control plane."""
        if self._operator is None:
            self._operator = OperatorCertificate(self.settings())
        return self._operator()

    def server_tls(self, server_name: str, credentials: identity.Credentials | None = None) -> launcher.Tls | None:
        """How to reach one of this cluster's servers (its certificate names `server_name`): mutual TLS with
        `credentials` (default: the operator's), or None in plaintext."""
        if not self.tls:
            return None
        return launcher.Tls.presenting(credentials or self.operator(), server_name)

    def channel(self, server: Server, credentials: identity.Credentials | None = None) -> grpc.Channel:
        """A gRPC channel straight to `server` (mutual TLS in a TLS cluster)."""
        tls = self.server_tls(_server_name(server.services), credentials)
        return tls.channel(server.address) if tls else grpc.insecure_channel(server.address)

    def http_client(self, **options: Any) -> httpx.Client:
        """A JSON client of this cluster's Envoy (HTTPS verified against the mesh's root in a TLS cluster)."""
        assert self.envoy is not None
        verify: ssl.SSLContext | bool = True
        if self.envoy.tls:
            verify = ssl.create_default_context(cafile=str(self.trust_bundle))
        return httpx.Client(base_url=self.envoy.http, verify=verify, **{"timeout": 30, **options})

    def edge_channel(self) -> grpc.Channel:
        """A gRPC channel through this cluster's Envoy."""
        assert self.envoy is not None
        tls = self.edge_tls() if self.envoy.tls else None
        return tls.channel(self.envoy.address) if tls else grpc.insecure_channel(self.envoy.address)

    def edge_tls(self) -> launcher.Tls | None:
        """How to reach Envoy's listener: HTTPS verified against the mesh's root, or None in plaintext."""
        return launcher.Tls.verifying(self.trust_bundle.read_bytes()) if self.tls else None

    def wait_serving(self, server: Server, names: list[str], timeout: float = 180) -> None:
        """Wait until `server` reports every name SERVING; its log in the error when it does not."""
        try:
            tls = self.server_tls(_server_name(server.services))
            launcher.wait_healthy(server.address, names, timeout=timeout, tls=tls)
        except TimeoutError:
            raise RuntimeError(f"{server.services} did not start:\n{server.log_text()[-4000:]}") from None

    def point_at(self, name: str, server: Server) -> None:
        """Make later servers call service `name` at `server`."""
        self.env[f"{name.upper()}_ADDR"] = server.address

    def reserve_envoy_ports(self) -> tuple[int, int]:
        """Envoy's listener and admin ports (chosen once: a control plane renders the listener before Envoy
        starts)."""
        if "ENVOY_PORT" not in self.env:
            self.env["ENVOY_PORT"], self.env["ENVOY_ADMIN_PORT"] = str(free_port()), str(free_port())
        return int(self.env["ENVOY_PORT"]), int(self.env["ENVOY_ADMIN_PORT"])

    def start_envoy(self, upstreams: dict[str, Server]) -> Envoy:
        """Render a static Envoy config for `upstreams` (service name -> server), start it, wait until every
        upstream is healthy through it."""
        self.reserve_envoy_ports()
        target = dataclasses.replace(
            envoy_config.embedded_target(self.settings(), str(envoy_config.DESCRIPTOR)),
            cors_origins=("http://localhost:3000",),
            upstreams={name: [("127.0.0.1", server.port)] for name, server in upstreams.items()},
            access_log_path=str(self.workdir / "envoy-access.log"),
        )
        return self._run_envoy(target)

    def start_control_plane(self, port: int | None = None, **extra_env: str) -> Server:
        """Start a control plane; servers started later announce themselves to it, and `start_xds_envoy` points
        an Envoy at it."""
        self.reserve_envoy_ports()
        port = port or int(self.env.get("CONTROL_PLANE_PORT") or free_port())
        self.env["CONTROL_PLANE_PORT"] = str(port)
        self.env["CONTROL_PLANE_ADDR"] = f"127.0.0.1:{port}"
        log = self.workdir / f"control-plane-{port}.log"
        args = launcher.control_plane_args(port, None)
        process = launcher.spawn(args, env={**self.env, **extra_env}, log_path=log)
        server = Server("control-plane", port, process, log)
        self.control_plane = server
        try:
            tls = None
            if self.tls:  # server-authenticated TLS, once the control plane has written its root
                tls = launcher.Tls.verifying(when_written(self.trust_bundle, timeout=60), identity.CONTROL_PLANE)
            launcher.wait_healthy(server.address, [registry.CONTROL_PLANE.grpc_service], timeout=60, tls=tls)
        except TimeoutError:
            raise RuntimeError(f"the control plane did not start:\n{server.log_text()[-4000:]}") from None
        return server

    def start_xds_envoy(
        self, wait_for: Iterable[str] = EVERY_SERVICE, control_plane: tuple[str, int] | None = None
    ) -> Envoy:
        """Start an Envoy driven by this cluster's control plane (or the one at `control_plane`); wait until
        `wait_for` answer SERVING through it."""
        if control_plane is None:
            assert self.control_plane is not None, "start_control_plane first"
            control_plane = ("127.0.0.1", self.control_plane.port)
        target = dataclasses.replace(
            envoy_config.xds_target(self.settings(), control_plane),
            access_log_path=str(self.workdir / "envoy-access.log"),
        )
        return self._run_envoy(target, wait_for)

    def _run_envoy(self, target: envoy_config.EnvoyTarget, wait_for: Iterable[str] = EVERY_SERVICE) -> Envoy:
        config = self.workdir / f"envoy-{target.listen_port}.yaml"
        config.write_text(envoy_config.render(target))
        log = self.workdir / f"envoy-{target.listen_port}.log"
        process = launcher.start_envoy(config, log_path=log)
        self.envoy = Envoy(target.listen_port, target.admin_port, process, log, tls=target.control_plane is not None
                           and self.tls)  # fmt: skip
        try:
            launcher.wait_envoy_ready(target.admin_port, timeout=60, process=self.envoy.process)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}; its log:\n{log.read_text(errors='replace')[-3000:]}") from None
        launcher.wait_healthy(self.envoy.address, list(wait_for), timeout=60,
                              tls=self.edge_tls() if self.envoy.tls else None)  # fmt: skip
        return self.envoy

    def stop(self) -> list[int]:
        """Stop everything (Envoy first, the control plane last) and forget this cluster's Redis keys; exit codes."""
        processes = ([self.envoy.process] if self.envoy else []) + [s.process for s in self.servers]
        processes += [self.control_plane.process] if self.control_plane else []
        codes = launcher.stop_all(processes)
        if self.env.get("REDIS_URL"):
            _delete_redis_prefix(self.env["REDIS_URL"], self.env["REDIS_KEY_PREFIX"])
        return codes


def when_written(path: Path, timeout: float) -> bytes:
    """The contents of `path` once it exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written in {timeout}s")
        time.sleep(0.1)
    return path.read_bytes()


def _server_name(services: str) -> str:
    """The name a server's certificate carries: its service, or the control plane's workload name."""
    if services == "all":  # every service, each named in the certificate
        return registry.SERVICES[0].name
    return identity.CONTROL_PLANE if services == "control-plane" else services


def _delete_redis_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass  # a test that stopped its own Redis: nothing to clean
    finally:
        client.close()


def all_upstreams(server: Server) -> dict[str, Server]:
    """Every service at one embedded server."""
    return {s.name: server for s in registry.SERVICES}


def drop_schemas(prefix: str, names: Iterable[str] = tuple(s.name for s in registry.SERVICES)) -> None:
    """Remove a test run's PostgreSQL schemas."""
    statements = "; ".join(f'DROP SCHEMA IF EXISTS "{prefix}{name}" CASCADE' for name in names)
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-q", "-c", statements], check=False,
                   capture_output=True)  # fmt: skip
