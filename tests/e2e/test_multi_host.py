"""The mesh across three hosts (network namespaces on one bridge): host a runs Envoy and the control plane, host b
auth, rag and search, host c voice, audit and a second auth worker; PostgreSQL and Redis are reached through the
bridge. Every link between hosts is mutual TLS, and Envoy serves HTTPS (MESH_TLS). When host c's link goes down,
Envoy ejects its auth endpoint within seconds and reads keep succeeding on host b's worker."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services import launcher
from services.control_plane import envoy_config
from services.core import identity, registry
from tests.support.clients import Account, register_and_login
from tests.support.mesh import Cluster, Envoy, drop_schemas, when_written
from tests.support.netns import Host, NetworkLab
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

pytestmark = pytest.mark.mesh

CONTROL_PLANE_PORT, ENVOY_PORT, ENVOY_ADMIN_PORT = 7190, 8080, 9901  # the defaults: every host has its own ports
PLACEMENT = {"b": ["auth", "rag", "search"], "c": ["voice", "audit", "auth"]}


@dataclasses.dataclass
class Mesh:
    """The running system and its hosts."""

    lab: NetworkLab
    envoy: Envoy
    account: Account
    edge: launcher.Tls  # HTTPS to Envoy, verified against the mesh's root

    def auth_endpoint(self, host: str) -> str:
        return f"{self.lab.host(host).address}:{registry.spec('auth').port}"


def _start(host: Host, args: list[str], env: dict[str, str], workdir: Path, name: str) -> None:
    host.popen(args, env={**env, "GRPC_HOST": host.address}, log_path=workdir / f"{host.name}-{name}.log")


@pytest.fixture
def mesh(workdir: Path) -> Iterator[Mesh]:
    cluster = Cluster.create(workdir, mesh=True, tls=True)
    try:
        with NetworkLab(["a", "b", "c"]) as lab:
            yield from _run_mesh(lab, cluster, workdir)
    finally:  # the lab has stopped every process it started: nothing holds the schemas any more
        cluster.stop()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"])


def _run_mesh(lab: NetworkLab, cluster: Cluster, workdir: Path) -> Iterator[Mesh]:
    a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
    env = cluster.env | {
        "DATABASE_URL": f"postgresql+asyncpg://postgres@{lab.gateway}:5432/test",
        "REDIS_URL": f"redis://{lab.gateway}:6379/0",
        "CONTROL_PLANE_ADDR": f"{a.address}:{CONTROL_PLANE_PORT}",
        "ENVOY_HOST": "0.0.0.0",
        "TRUSTED_PROXIES": f"{a.address}/32",  # Envoy's host
        "CONTROL_PLANE_EDGE_HOSTNAMES": f"localhost,{a.address}",  # the test calls Envoy at host a's address
    }
    for spec in registry.SERVICES:  # service-to-service calls go to each service's hosts, round-robin
        hosts = [lab.host(h).address for h, names in PLACEMENT.items() if spec.name in names]
        env[f"{spec.name.upper()}_ADDR"] = "ipv4:" + ",".join(f"{h}:{spec.port}" for h in hosts)
    _start(a, launcher.control_plane_args(CONTROL_PLANE_PORT, None), env, workdir, "control-plane")
    roots = when_written(cluster.trust_bundle, 60)
    control_plane_tls = launcher.Tls.verifying(roots, identity.CONTROL_PLANE)
    launcher.wait_healthy(f"{a.address}:{CONTROL_PLANE_PORT}", [registry.CONTROL_PLANE.grpc_service], 60,
                          tls=control_plane_tls)  # fmt: skip
    for host in (b, c):
        for name in PLACEMENT[host.name]:
            _start(host, launcher.server_args(name, registry.spec(name).port, None), env, workdir, name)
    target = dataclasses.replace(
        envoy_config.xds_target(cluster.settings(), (a.address, CONTROL_PLANE_PORT)),
        listen_host="0.0.0.0", listen_port=ENVOY_PORT, admin_port=ENVOY_ADMIN_PORT, admin_host=a.address,
    )  # fmt: skip
    config = workdir / "envoy.yaml"
    config.write_text(envoy_config.render(target))
    process = a.popen(launcher.envoy_args(config), env={}, log_path=workdir / "a-envoy.log")
    envoy = Envoy(ENVOY_PORT, ENVOY_ADMIN_PORT, process, workdir / "a-envoy.log", host=a.address, tls=True)
    edge = launcher.Tls.verifying(roots)
    launcher.wait_healthy(envoy.address, [s.grpc_service for s in registry.SERVICES], timeout=240, tls=edge)
    with edge.channel(envoy.address) as channel:
        account = register_and_login(channel)
    yield Mesh(lab, envoy, account, edge)


def _read(channel: grpc.Channel, account: Account) -> None:
    auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=account.metadata, timeout=15
    )


def test_a_partitioned_host_is_ejected_and_reads_keep_succeeding(mesh: Mesh) -> None:
    b_auth, c_auth = mesh.auth_endpoint("b"), mesh.auth_endpoint("c")
    results: list[tuple[float, str]] = []  # (finish time, "" or the error)
    done = threading.Event()

    def reads() -> None:
        with mesh.edge.channel(mesh.envoy.address) as channel:
            while not done.is_set():
                try:
                    _read(channel, mesh.account)
                    results.append((time.monotonic(), ""))
                except grpc.RpcError as exc:
                    results.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))
                time.sleep(0.01)

    reader = threading.Thread(target=reads)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while int(mesh.envoy.endpoints("auth").get(c_auth, {}).get("rq_total", 0)) == 0:
            assert time.monotonic() < deadline, "host c's auth worker never got a read"
            time.sleep(0.1)
        retries_before = mesh.envoy.stat("cluster.auth.upstream_rq_retry")

        cut = time.monotonic()
        mesh.lab.host("c").link_down()
        while True:
            flags = mesh.envoy.endpoints("auth").get(c_auth, {}).get("health_flags", "removed")
            if flags != "healthy":
                ejected = time.monotonic()
                break
            assert time.monotonic() - cut < 10, "host c's endpoint still in rotation 10 s after its link went down"
            time.sleep(0.1)
        time.sleep(3)  # reads after the ejection
    finally:
        done.set()
        reader.join(60)
    after = [error for finished, error in results if finished > ejected + 0.5]
    assert len(after) > 50 and [e for e in after if e] == []
    assert ejected - cut < 10 and mesh.envoy.endpoints("auth")[b_auth]["health_flags"] == "healthy"
    # Reads caught on host c when its link went down are retried on host b; only one whose answer was already
    # on its way (Envoy had sent its headers on) cannot be, so a failure or two before the ejection may happen.
    failed = [error for _, error in results if error]
    retried = mesh.envoy.stat("cluster.auth.upstream_rq_retry") - retries_before
    print(f"ejected after {ejected - cut:.1f}s ({flags}); {len(results)} reads, {len(failed)} failed before the "
          f"ejection, {retried} retried")  # fmt: skip
    assert retried > 0
