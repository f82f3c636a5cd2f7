"""`voiceassist up` as an operator runs it: every port a setting, a process that dies is named and restarted while
the rest answers, a taken port stops the start within seconds naming it, two systems run side by side, and SIGTERM
stops everything in order."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from services import launcher
from services.core import registry
from services.core.settings import ROOT
from tests.support.clients import register_and_login
from tests.support.mesh import TEST_DATABASE_URL, TEST_REDIS_URL, drop_schemas, free_port, free_ports
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

EVERY_SERVICE = [s.grpc_service for s in registry.SERVICES]


@dataclass
class System:
    """A running `voiceassist up` and everything it printed."""

    process: subprocess.Popen[str]
    env: dict[str, str]
    output: list[str] = field(default_factory=list)

    @property
    def envoy(self) -> str:
        """host:port of its Envoy."""
        return f"127.0.0.1:{self.env['ENVOY_PORT']}"

    @property
    def roots(self) -> Path | None:
        """The mesh's root certificate when it runs mutual TLS (`up --mesh`), else None (embedded: plaintext)."""
        path = Path(self.env["DATA_DIR"]) / "mesh-ca" / "root.pem"
        return path if "--mesh" in self.process.args else None

    def channel(self) -> grpc.Channel:
        """A gRPC channel to its Envoy (TLS verified against the mesh's root in mesh mode)."""
        tls = self.tls()
        return tls.channel(self.envoy) if tls else grpc.insecure_channel(self.envoy)

    def jwks(self) -> dict:
        """GET /v1/auth/jwks through its Envoy."""
        if self.roots is None:
            return httpx.get(f"http://{self.envoy}/v1/auth/jwks", timeout=10).json()
        verify = ssl.create_default_context(cafile=str(self.roots))
        return httpx.get(f"https://{self.envoy}/v1/auth/jwks", timeout=10, verify=verify).json()

    def tls(self) -> launcher.Tls | None:
        """How to reach its Envoy for health checks."""
        return launcher.Tls.verifying(self.roots.read_bytes()) if self.roots else None

    def text(self) -> str:
        """What it printed so far."""
        return "\n".join(self.output)

    def wait_for(self, needle: str, timeout: float) -> None:
        """Until `needle` was printed; fails with the output when `up` exited or time ran out."""
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not printed (exit {self.process.poll()}):\n{self.text()[-5000:]}")
            time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _up(workdir: Path, mesh: bool, **settings: str) -> System:
    env = {**os.environ, "ENVIRONMENT": "test", "DATA_DIR": str(workdir / "data"), **settings}
    args = [sys.executable, "-m", "services.cli", "up", *(["--mesh"] if mesh else [])]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    system = System(process, env)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            system.output.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return system


def _ports(mesh: bool, auth_workers: int = 1) -> dict[str, str]:
    """A free port for every setting `up` listens on."""
    ports = {"ENVOY_PORT": free_port(), "ENVOY_ADMIN_PORT": free_port()}
    if mesh:
        ports |= {"CONTROL_PLANE_PORT": free_port(), "CONTROL_PLANE_METRICS_PORT": free_port()}
        for spec in registry.SERVICES:
            count = auth_workers if spec.name == "auth" else 1
            name = spec.name.upper()
            ports |= {f"{name}_PORT": free_ports(count), f"{name}_METRICS_PORT": free_ports(count)}
    else:
        ports |= {"EMBEDDED_PORT": free_port(), "EMBEDDED_METRICS_PORT": free_port()}
    return {k: str(v) for k, v in ports.items()}


def _pid_of(port: str) -> int:
    """The process started as `serve ... --port PORT`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
                return int(proc.name)
    raise AssertionError(f"no server on port {port}")


@pytest.fixture(scope="module")
def mesh_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """`voiceassist up --mesh` with two auth workers and every port from settings."""
    prefix = f"t{os.urandom(4).hex()}_"
    system = _up(
        tmp_path_factory.mktemp("up-mesh"), mesh=True, DATABASE_URL=TEST_DATABASE_URL, REDIS_URL=TEST_REDIS_URL,
        DATABASE_SCHEMA_PREFIX=prefix, REDIS_KEY_PREFIX=f"test:{prefix}", AUTH_WORKERS="2",
        AUTH_LOGIN_PER_MINUTE="1000", AUTH_REGISTER_PER_HOUR="1000", SHUTDOWN_GRACE_SECONDS="5",
        **_ports(mesh=True, auth_workers=2),
    )  # fmt: skip
    try:
        system.wait_for("VoiceAssist Mesh is up (auth x2", timeout=300)
        yield system
    finally:
        code = system.stop()
        drop_schemas(prefix)
        assert code == 0, system.text()[-3000:]
        assert "stopped (envoy: 0," in system.text() and "control-plane: 0)" in system.text()


@pytest.mark.mesh
def test_kill_9_of_a_service_is_named_and_restarted_while_the_others_answer(mesh_system: System) -> None:
    with mesh_system.channel() as channel:
        account = register_and_login(channel)
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        voice = voice_pb2_grpc.VoiceServiceStub(channel)
        audit_port = mesh_system.env["AUDIT_PORT"]
        os.kill(_pid_of(audit_port), signal.SIGKILL)
        deadline, calls = time.monotonic() + 60, 0
        while "audit is serving again" not in mesh_system.text():
            assert time.monotonic() < deadline, mesh_system.text()[-3000:]
            auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=account.metadata, timeout=10)
            voice.ListVoices(voice_pb2.ListVoicesRequest(), metadata=account.metadata, timeout=10)
            calls += 1
        assert calls > 0
    assert "audit died (killed by SIGKILL)" in mesh_system.text()
    launcher.wait_healthy(mesh_system.envoy, [registry.spec("audit").grpc_service], timeout=30, tls=mesh_system.tls())


@pytest.mark.mesh
def test_two_systems_run_side_by_side_with_their_own_ports(mesh_system: System, workdir: Path) -> None:
    other = _up(workdir, mesh=False, **_ports(mesh=False))
    try:
        other.wait_for("VoiceAssist Mesh is up", timeout=300)
        keys = []
        for system in (mesh_system, other):
            with system.channel() as channel:
                register_and_login(channel)  # each answers with its own accounts
            keys.append(system.jwks()["keys"][0]["kid"])
        assert keys[0] != keys[1]  # two systems, not one answering twice
    finally:
        assert other.stop() == 0


def test_a_taken_port_stops_up_within_seconds_naming_it(workdir: Path) -> None:
    ports = _ports(mesh=True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(ports["RAG_PORT"])))
        squatter.listen()
        started = time.monotonic()
        system = _up(workdir, mesh=True, DATABASE_URL=TEST_DATABASE_URL, REDIS_URL=TEST_REDIS_URL, **ports)
        code = system.process.wait(30)
        elapsed = time.monotonic() - started
    assert code != 0 and elapsed < 10, system.text()
    assert f"RAG_PORT + 0: 127.0.0.1:{ports['RAG_PORT']}" in system.text()


def test_a_server_on_a_taken_port_exits_within_seconds_naming_it() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "serve", "auth", "--port", str(port), "--no-metrics"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, "DATA_DIR": "/nonexistent"},
        )  # fmt: skip
    assert done.returncode != 0 and time.monotonic() - started < 10
    assert f"auth: cannot listen on 127.0.0.1:{port}: the port is in use" in done.stderr


@pytest.mark.parametrize(
    ("command", "missing"),
    [(["up", "--mesh"], "QDRANT_URL"), (["serve", "search", "--workers", "2"], "QDRANT_URL")],
)
def test_more_workers_than_per_process_state_allows_are_refused(command: list[str], missing: str) -> None:
    env = {**os.environ, "DATABASE_URL": TEST_DATABASE_URL, "REDIS_URL": TEST_REDIS_URL, "QDRANT_URL": "",
           "SEARCH_WORKERS": "2"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "services.cli", *command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode != 0
    assert f"search cannot run 2 workers: without {missing} its state is per process" in done.stderr
