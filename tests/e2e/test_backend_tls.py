"""TLS to PostgreSQL and Redis (docs/backend-tls.md): a service on a PostgreSQL and a Redis of the test's own that
speak TLS only and want a client certificate, every certificate from a throw-away CA.

DATABASE_URL carries libpq's sslmode/sslrootcert/sslcert/sslkey, REDIS_URL is rediss:// with redis-py's ssl_*
parameters. A server whose certificate does not check stops the service at start-up with a message that says so; a
plaintext connection to the TLS-only server, or a TLS one to a server without TLS, is refused.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.core.db import Database, DatabaseUnreachable, postgres_tls
from services.core.settings import ROOT, CoreSettings
from tests.support.clients import register_and_login
from tests.support.mesh import Cluster
from tests.support.private_backends import PrivatePostgres, PrivateRedis, ThrowawayPki

pytestmark = pytest.mark.mesh

MIGRATIONS = ROOT / "services" / "auth" / "migrations"


@dataclass
class Backends:
    """The TLS-only servers, the CA they trust (`pki`) and one they do not (`stranger`)."""

    pki: ThrowawayPki
    stranger: ThrowawayPki
    postgres: PrivatePostgres
    redis: PrivateRedis


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    folder = tmp_path_factory.mktemp("backend-tls")
    pki, stranger = ThrowawayPki.create(folder / "pki"), ThrowawayPki.create(folder / "stranger")
    postgres = PrivatePostgres.create(tls=pki)
    server = PrivateRedis(tls=pki)
    try:
        server.start()
        yield Backends(pki, stranger, postgres, server)
    finally:
        server.destroy()
        postgres.destroy()


def _cluster(tmp_path: Path, backends: Backends, **env: str) -> Cluster:
    urls = {"DATABASE_URL": backends.postgres.tls_url(backends.pki), "REDIS_URL": backends.redis.url}
    return Cluster.create(tmp_path, mesh=True, MESH_TLS="false", **{**urls, **env})


def _database(tmp_path: Path, url: str) -> Database:
    return Database("tlstest", CoreSettings(_env_file=None, data_dir=tmp_path, database_url=url))


def test_a_service_works_over_verified_tls(tmp_path: Path, backends: Backends) -> None:
    cluster = _cluster(tmp_path, backends)
    try:
        server = cluster.start("auth")
        with grpc.insecure_channel(server.address) as channel:
            assert register_and_login(channel).access_token
        # Every connection of auth's pool is TLS with our client certificate (migrations ran on one of them).
        connections = backends.postgres.sql(
            "SELECT ssl, client_dn FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'auth'"
        ).splitlines()
        assert connections and set(connections) == {"t|/CN=postgres"}
        # Redis took auth's writes (the server speaks nothing but TLS): fail-open would have hidden an outage.
        with redis.Redis.from_url(backends.redis.url) as client:
            assert list(client.scan_iter(match=f"{cluster.env['REDIS_KEY_PREFIX']}*"))
        assert "redis unreachable" not in server.log_text()
    finally:
        cluster.stop()


def test_a_database_certificate_from_another_ca_stops_the_service(tmp_path: Path, backends: Backends) -> None:
    untrusted = backends.postgres.tls_url(backends.pki, trust=backends.stranger)
    cluster = _cluster(tmp_path, backends, DATABASE_URL=untrusted)
    try:
        server = cluster.start("auth", wait=False)
        assert server.process.wait(timeout=60) != 0
        said = f"DatabaseUnreachable: auth: cannot connect to the database at localhost:{backends.postgres.port}: "
        assert said + "[SSL: CERTIFICATE_VERIFY_FAILED]" in server.log_text()
    finally:
        cluster.stop()


def test_a_redis_certificate_from_another_ca_is_an_outage_that_says_why(tmp_path: Path, backends: Backends) -> None:
    """Redis is fail-open (AUTH_FAIL_CLOSED): the service serves, and its log names the TLS failure."""
    untrusted = backends.redis.tls_url(trust=backends.stranger)
    cluster = _cluster(tmp_path, backends, REDIS_URL=untrusted)
    try:
        server = cluster.start("auth")
        with grpc.insecure_channel(server.address) as channel:
            register_and_login(channel)
        unreachable = [line for line in server.log_text().splitlines() if "redis unreachable" in line]
        assert unreachable and "CERTIFICATE_VERIFY_FAILED" in unreachable[0]
    finally:
        cluster.stop()


async def test_verify_full_checks_the_host_name_and_verify_ca_does_not(tmp_path: Path, backends: Backends) -> None:
    """The server's certificate names localhost only: at 127.0.0.1 it is the right CA's but not that host's."""
    for sslmode, fails in (("verify-full", True), ("verify-ca", False)):
        db = _database(tmp_path, backends.postgres.tls_url(backends.pki, sslmode).replace("@localhost:", "@127.0.0.1:"))
        try:
            if fails:
                with pytest.raises(DatabaseUnreachable, match="IP address mismatch"):
                    await db.migrate(MIGRATIONS)
            else:
                assert await db.ping()
        finally:
            await db.close()


async def test_plaintext_to_the_tls_only_server_is_refused(tmp_path: Path, backends: Backends) -> None:
    db = _database(tmp_path, f"{backends.postgres.url}?sslmode=disable")
    try:
        with pytest.raises(DBAPIError, match="no encryption"):
            await db.ping()
    finally:
        await db.close()


async def test_tls_to_a_server_without_tls_is_refused(tmp_path: Path) -> None:
    plain = PrivatePostgres.create()
    db = _database(tmp_path, f"{plain.url}?sslmode=require")
    try:
        with pytest.raises(DatabaseUnreachable, match="rejected SSL upgrade"):
            await db.migrate(MIGRATIONS)
    finally:
        await db.close()
        plain.destroy()


def _context(query: str) -> ssl.SSLContext:
    _url, args = postgres_tls(make_url(f"postgresql+asyncpg://u@h/d?{query}"))
    assert isinstance(args["ssl"], ssl.SSLContext)
    return args["ssl"]


def test_libpq_ssl_modes_become_asyncpgs_ssl_argument(tmp_path: Path) -> None:
    ca = ThrowawayPki.create(tmp_path).file("ca.pem")
    url, args = postgres_tls(make_url(f"postgresql+asyncpg://u@h/d?sslmode=verify-full&sslrootcert={ca}&x=1"))
    assert url.query == {"x": "1"} and args["ssl"].check_hostname
    assert args["ssl"].verify_mode == ssl.CERT_REQUIRED
    verify_ca = _context(f"sslmode=verify-ca&sslrootcert={ca}")
    assert verify_ca.verify_mode == ssl.CERT_REQUIRED and not verify_ca.check_hostname
    assert _context("sslmode=require").verify_mode == ssl.CERT_NONE
    assert _context(f"ssl=require&sslrootcert={ca}").verify_mode == ssl.CERT_REQUIRED  # as libpq does
    assert postgres_tls(make_url("postgresql+asyncpg://u@h/d?sslmode=disable"))[1] == {"ssl": False}
    assert postgres_tls(make_url("postgresql+asyncpg://u@h/d?sslmode=prefer"))[1] == {"ssl": "prefer"}
    assert postgres_tls(make_url("postgresql+asyncpg://u@h/d"))[1] == {}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmode=verify-full", "needs sslrootcert"),
        ("sslmode=verify", "none of disable"),
        ("sslmode=require&ssl=require", "both ssl and sslmode"),
        ("sslrootcert=/ca.pem", "with an sslmode"),
        ("sslmode=require&sslkey=/k.pem", "sslkey without sslcert"),
        ("sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem", "cannot load sslrootcert=/nonexistent/ca.pem"),
    ],
)
def test_a_tls_parameter_that_cannot_work_is_refused(query: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        postgres_tls(make_url(f"postgresql+asyncpg://u@h/d?{query}"))
