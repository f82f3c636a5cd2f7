"""Fixtures: the whole system as real processes.

`embedded` is `voiceassist serve all` (SQLite, in-process stores) behind Envoy, as `make run` starts it.
`mesh` is one process per service on PostgreSQL and Redis behind Envoy, as production runs it.
Both are started once per test session; tests isolate themselves with fresh accounts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.core import registry
from tests.support.mesh import Cluster, all_upstreams, drop_schemas, free_port


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """All services in one process (embedded mode) + Envoy."""
    cluster = Cluster.create(tmp_path_factory.mktemp("embedded"), mesh=False)
    try:
        server = cluster.start("all")
        cluster.start_envoy(all_upstreams(server))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One process per service on PostgreSQL and Redis (mesh mode), announced to a control plane that drives
    Envoy over xDS, as `make mesh` runs it."""
    cluster = Cluster.create(tmp_path_factory.mktemp("mesh"), mesh=True)
    ports = {s.name: free_port() for s in registry.SERVICES}
    for name, port in ports.items():
        cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    try:
        cluster.start_control_plane()
        for spec in registry.SERVICES:
            cluster.start(spec.name, port=ports[spec.name])
        cluster.start_xds_envoy()
        yield cluster
    finally:
        cluster.stop()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"])


@pytest.fixture
def embedded_channel(embedded: Cluster) -> Iterator[grpc.Channel]:
    """A gRPC channel straight to the embedded server (no Envoy)."""
    with grpc.insecure_channel(embedded.servers[0].address) as channel:
        yield channel


@pytest.fixture
def edge_channel(embedded: Cluster) -> Iterator[grpc.Channel]:
    """A gRPC channel through Envoy to the embedded server."""
    assert embedded.envoy is not None
    with grpc.insecure_channel(embedded.envoy.address) as channel:
        yield channel


@pytest.fixture
def edge_http(embedded: Cluster) -> Iterator[httpx.Client]:
    """A JSON client of Envoy in front of the embedded server."""
    assert embedded.envoy is not None
    with httpx.Client(base_url=embedded.envoy.http, timeout=30) as client:
        yield client


@pytest.fixture
def mesh_http(mesh: Cluster) -> Iterator[httpx.Client]:
    """A JSON client of Envoy in front of the mesh."""
    assert mesh.envoy is not None
    with httpx.Client(base_url=mesh.envoy.http, timeout=30) as client:
        yield client


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch folder for a test's own processes."""
    return tmp_path
