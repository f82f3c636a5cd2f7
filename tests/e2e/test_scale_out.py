"""Scale-out through the control plane: workers join and leave Envoy's endpoints without Envoy restarting, a rolling
restart loses no read, Envoy keeps routing while the control plane is down, and a configuration Envoy rejects is
NACKed while the last good one stays in force.

Each test runs its own control plane, auth workers (PostgreSQL + Redis) and an Envoy bootstrapped from xDS.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from services.control_plane import envoy_config
from services.control_plane.server import ControlPlane
from services.control_plane.settings import ControlPlaneSettings
from services.control_plane.xds import CLUSTERS, pack
from services.core import registry
from services.core.runtime import Runtime
from services.core.server import add_services, new_server
from tests.support.clients import Account, register_and_login
from tests.support.mesh import Cluster, Envoy, Server, drop_schemas, free_port
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

pytestmark = pytest.mark.mesh
AUTH = registry.spec("auth").grpc_service


@pytest.fixture
def cluster(workdir: Path) -> Iterator[Cluster]:
    made = Cluster.create(workdir, mesh=True)
    try:
        yield made
    finally:
        made.stop()
        drop_schemas(made.env["DATABASE_SCHEMA_PREFIX"], ["auth"])


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition`; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def _healthy_in_envoy(envoy: Envoy, server: Server) -> bool:
    return envoy.endpoints("auth").get(server.address, {}).get("health_flags") == "healthy"


def _requests(envoy: Envoy, server: Server) -> int:
    return int(envoy.endpoints("auth").get(server.address, {}).get("rq_total", 0))


def _read(channel: grpc.Channel, account: Account) -> None:
    auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
    )


def _wait_for_traffic(envoy: Envoy, server: Server, account: Account, timeout: float = 15) -> None:
    """Read through Envoy until `server` has answered one of the reads: it is in rotation on Envoy's workers (a
    host Envoy lists as healthy joins their load balancers a moment later)."""
    with grpc.insecure_channel(envoy.address) as channel:

        def served() -> bool:
            _read(channel, account)
            return _requests(envoy, server) > 0

        _wait_until(served, timeout, f"{server.address} gets reads through Envoy")


def _start_auth_mesh(cluster: Cluster) -> tuple[Server, Envoy, Account]:
    cluster.start_control_plane()
    first = cluster.start("auth")
    envoy = cluster.start_xds_envoy(wait_for=[AUTH])
    with grpc.insecure_channel(envoy.address) as channel:
        account = register_and_login(channel)
    return first, envoy, account


def test_a_worker_started_after_envoy_gets_traffic_and_a_stopped_one_none(cluster: Cluster) -> None:
    first, envoy, account = _start_auth_mesh(cluster)
    envoy_pid = envoy.process.pid
    second = cluster.start("auth")
    _wait_until(lambda: _healthy_in_envoy(envoy, second), 15, "the new worker is a healthy endpoint in Envoy")
    _wait_for_traffic(envoy, second, account)
    with grpc.insecure_channel(envoy.address) as channel:
        before = _requests(envoy, second), _requests(envoy, first)
        for _ in range(60):
            _read(channel, account)
        assert _requests(envoy, second) > before[0] and _requests(envoy, first) > before[1]  # both in rotation

        assert second.stop() == 0  # withdraws first: it returns once Envoy has stopped sending it calls
        assert second.address not in envoy.endpoints("auth")
        before = _requests(envoy, first)
        for _ in range(60):
            _read(channel, account)
        assert _requests(envoy, first) - before >= 60
    assert envoy.process.poll() is None and envoy.process.pid == envoy_pid  # never restarted or reloaded
    assert envoy.stat("cluster_manager.cds.update_rejected") == 0


def test_rolling_restart_of_two_workers_fails_no_read(cluster: Cluster) -> None:
    first, envoy, account = _start_auth_mesh(cluster)
    second = cluster.start("auth")
    _wait_for_traffic(envoy, second, account)
    done, failures, count = threading.Event(), [], [0]

    def reads() -> None:
        with grpc.insecure_channel(envoy.address) as channel:
            while not done.is_set() or count[0] < 1000:
                try:
                    _read(channel, account)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                count[0] += 1
                time.sleep(0.004)  # keep the reads flowing across both restarts

    reader = threading.Thread(target=reads)
    reader.start()
    try:
        for worker in (first, second):
            assert worker.stop() == 0
            served = _requests(envoy, worker)
            restarted = cluster.start("auth", port=worker.port)
            _wait_until(lambda r=restarted, n=served: _requests(envoy, r) > n, 15, "the restarted worker serves again")
    finally:
        done.set()
        reader.join(120)
    assert count[0] >= 1000
    assert failures == []


def test_envoy_keeps_routing_without_the_control_plane_and_resyncs_when_it_returns(cluster: Cluster) -> None:
    first, envoy, account = _start_auth_mesh(cluster)
    assert cluster.control_plane is not None
    cluster.control_plane.kill()
    with grpc.insecure_channel(envoy.address) as channel:
        for _ in range(20):
            _read(channel, account)  # the last configuration stays in force
        second = cluster.start("auth")  # announces itself to nobody yet: it keeps trying
        time.sleep(1)
        assert second.address not in envoy.endpoints("auth")
        cluster.start_control_plane(port=cluster.control_plane.port)
        _wait_until(lambda: _healthy_in_envoy(envoy, second), 20, "the worker that started meanwhile joins Envoy")
        assert _healthy_in_envoy(envoy, first)  # the restarted control plane heard from the old worker too
    _wait_for_traffic(envoy, second, account)


def _static_cluster(name: str, connect_timeout: str) -> dict[str, object]:
    return {"name": name, "type": "STATIC", "connect_timeout": connect_timeout,
            "load_assignment": envoy_config.load_assignment(name, [("127.0.0.1", free_port())])}  # fmt: skip


async def test_a_configuration_envoy_rejects_is_nacked_and_the_last_good_one_stays(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    # The control plane runs in this process, so the test can hand it snapshots no registry would produce.
    port = free_port()
    cluster.env.update(CONTROL_PLANE_PORT=str(port), CONTROL_PLANE_ADDR=f"127.0.0.1:{port}")
    cluster.reserve_envoy_ports()
    settings = cluster.settings()
    runtime = Runtime(settings, [registry.CONTROL_PLANE.name], settings.control_plane_addr)
    plane = ControlPlane(settings, ControlPlaneSettings(_env_file=None, warm_up_seconds=0))
    cache = plane.cache
    server = new_server(runtime)
    assert server.add_insecure_port(settings.control_plane_addr) == port
    add_services(server, runtime, [])
    plane.register(server)
    await server.start()
    try:
        await asyncio.to_thread(cluster.start, "auth")  # announces itself to the control plane here
        envoy = await asyncio.to_thread(cluster.start_xds_envoy, [AUTH], ("127.0.0.1", port))
        good = cache.snapshot
        assert good is not None
        rejected = envoy.stat("cluster_manager.cds.update_rejected")
        bad = pack(CLUSTERS, _static_cluster("bad", "0s"))  # Envoy requires a positive connect timeout
        cache.set({**good.resources, CLUSTERS: {**good.resources[CLUSTERS], "bad": bad}})
        await asyncio.to_thread(
            _wait_until, lambda: envoy.stat("cluster_manager.cds.update_rejected") > rejected, 10, "Envoy NACKs it"
        )
        clusters = await asyncio.to_thread(envoy.admin, "/clusters")
        assert "bad::" not in clusters and "auth::" in clusters
        nacks = [r for r in caplog.records if r.getMessage().startswith("envoy rejected a configuration")]
        assert nacks and "bad" in nacks[0].error and nacks[0].type == "CDS"  # Envoy's own reason, logged
        with grpc.insecure_channel(envoy.address) as channel:
            account = await asyncio.to_thread(register_and_login, channel)
            await asyncio.to_thread(_read, channel, account)  # still routing with the configuration it accepted
        extra = pack(CLUSTERS, _static_cluster("extra", "1s"))
        cache.set({**good.resources, CLUSTERS: {**good.resources[CLUSTERS], "extra": extra}})
        await asyncio.to_thread(
            _wait_until, lambda: "extra::" in envoy.admin("/clusters"), 10, "a later good configuration is accepted"
        )
        assert envoy.stat("cluster_manager.cds.update_rejected") == rejected + 1  # the bad one was not sent again
    finally:
        await server.stop(0)
        await runtime.close()
