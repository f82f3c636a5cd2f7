"""Real servers and a real Envoy for tests: processes on free ports, ready when gRPC health says so."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services import envoy_config, launcher
from services.core import registry
from services.core.settings import ROOT

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@dataclass
class Envoy:
    """An Envoy process in front of some servers."""

    port: int
    admin_port: int
    process: subprocess.Popen
    log: Path

    @property
    def http(self) -> str:
        """Base URL for JSON calls."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port for gRPC calls."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        return launcher.stop_all([self.process])[0]


@dataclass
class Cluster:
    """Servers (and optionally Envoy) sharing one environment: data dir, database schemas, Redis prefix."""

    workdir: Path
    env: dict[str, str]
    servers: list[Server] = field(default_factory=list)
    envoy: Envoy | None = None

    @classmethod
    def create(cls, workdir: Path, *, mesh: bool, **extra_env: str) -> Cluster:
        """A cluster in `workdir`; `mesh` uses PostgreSQL and Redis, otherwise SQLite and in-process stores."""
        run = uuid.uuid4().hex[:8]
        env = {
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

    def start(
        self, services: str, *, port: int | None = None, metrics_port: int | None = None, **extra_env: str
    ) -> Server:
        """Start `voiceassist serve SERVICES` and wait until every hosted service is SERVING."""
        port = port or free_port()
        log = self.workdir / f"{services}-{port}.log"
        env = {**self.env, **extra_env}
        process = launcher.start_server(services, port, metrics_port, env=env, log_path=log)
        server = Server(services, port, process, log)
        self.servers.append(server)
        names = (
            [s.grpc_service for s in registry.SERVICES] if services == "all" else [registry.spec(services).grpc_service]
        )
        try:
            launcher.wait_healthy(server.address, names, timeout=180)
        except TimeoutError:
            raise RuntimeError(f"{services} did not start:\n{server.log_text()[-4000:]}") from None
        return server

    def point_at(self, name: str, server: Server) -> None:
        """Make later servers call service `name` at `server`."""
        self.env[f"{name.upper()}_ADDR"] = server.address

    def start_envoy(self, upstreams: dict[str, Server]) -> Envoy:
        """Render an Envoy config for `upstreams` (service name -> server), start it, wait until every upstream
        is healthy through it."""
        port, admin = free_port(), free_port()
        target = envoy_config.EnvoyTarget(
            "test",
            "127.0.0.1",
            port,
            admin,
            {name: ("127.0.0.1", server.port) for name, server in upstreams.items()},
            str(ROOT / "gen" / "voiceassist.binpb"),
            ("http://localhost:3000",),
            access_log_path=str(self.workdir / "envoy-access.log"),
        )
        config = self.workdir / f"envoy-{port}.yaml"
        config.write_text(envoy_config.render(target))
        log = self.workdir / f"envoy-{port}.log"
        self.envoy = Envoy(port, admin, launcher.start_envoy(config, log_path=log), log)
        launcher.wait_envoy_ready(admin)
        launcher.wait_healthy(self.envoy.address, [s.grpc_service for s in registry.SERVICES], timeout=60)
        return self.envoy

    def stop(self) -> list[int]:
        """Stop everything and forget this cluster's Redis keys; exit codes."""
        processes = [s.process for s in self.servers] + ([self.envoy.process] if self.envoy else [])
        codes = launcher.stop_all(processes)
        if self.env.get("REDIS_URL"):
            _delete_redis_prefix(self.env["REDIS_URL"], self.env["REDIS_KEY_PREFIX"])
        return codes


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
