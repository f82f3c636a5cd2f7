"""Faults, each a test: the mesh on a PostgreSQL and a Redis of its own, which the tests stop and start again while
calls run through Envoy; a search worker killed mid-document; a voice client that vanishes without a word; SIGTERM
with calls and streams in flight.

Every service keeps running through a backend outage: recovery must need no restart.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import registry
from tests.support.admin import create_admin
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login
from tests.support.draining import sigterm_while_handling
from tests.support.mesh import Cluster, Server, free_port
from tests.support.private_backends import PrivatePostgres, PrivateRedis
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.search.v1 import search_pb2, search_pb2_grpc
from voiceassist.voice.v1 import voice_pb2, voice_pb2_grpc

pytestmark = pytest.mark.mesh

HOSTED = ("auth", "audit", "search")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class System:
    """auth, audit and search (one process each) behind an xDS-driven Envoy, on private backends."""

    cluster: Cluster
    postgres: PrivatePostgres
    redis: PrivateRedis
    servers: dict[str, Server]

    @property
    def edge(self) -> str:
        """Envoy's address for gRPC calls."""
        assert self.cluster.envoy is not None
        return self.cluster.envoy.address

    @property
    def http(self) -> str:
        """Envoy's base URL for JSON calls."""
        assert self.cluster.envoy is not None
        return self.cluster.envoy.http


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    postgres = PrivatePostgres.create()
    redis = PrivateRedis()
    redis.start()
    cluster = Cluster.create(
        tmp_path_factory.mktemp("faults"), mesh=True, DATABASE_URL=postgres.url, REDIS_URL=redis.url,
        # Small embedding batches make a long document take long enough to be killed halfway through; a crashed
        # worker's job is taken over after 2 s.
        SEARCH_EMBED_BATCH_SIZE="2", SEARCH_INDEX_BATCH_CHUNKS="2", SEARCH_JOB_CLAIM_IDLE_SECONDS="2",
    )  # fmt: skip
    ports = {name: free_port() for name in HOSTED}
    for name, port in ports.items():
        cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    try:
        cluster.start_control_plane()
        servers = {name: cluster.start(name, port=port) for name, port in ports.items()}
        cluster.start_xds_envoy([registry.spec(name).grpc_service for name in HOSTED])
        yield System(cluster, postgres, redis, servers)
    finally:
        cluster.stop()
        redis.destroy()
        postgres.destroy()


@pytest.fixture(scope="module")
def admin(system: System) -> Account:
    with grpc.insecure_channel(system.servers["auth"].address) as channel:
        return create_admin(system.cluster, channel)


def _document(text: str) -> search_pb2.CreateDocumentRequest:
    return search_pb2.CreateDocumentRequest(
        metadata=search_pb2.DocumentMetadata(file_name=f"{uuid.uuid4().hex}.txt"), text=text
    )


def _final(search: search_pb2_grpc.SearchServiceStub, account: Account, document_id: str) -> search_pb2.Document:
    """The document once WatchDocument ends (INDEXED or FAILED)."""
    updates = search.WatchDocument(
        search_pb2.WatchDocumentRequest(document_id=document_id), metadata=account.metadata, timeout=60
    )
    return list(updates)[-1].document


def _health(address: str, name: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=registry.spec(name).grpc_service), timeout=2)
                .status
            )
        except grpc.RpcError:
            return -1


def _wait_health(system: System, names: tuple[str, ...], wanted: int, timeout: float = 30) -> None:
    """Poll each server's own health service until every one of `names` reports `wanted`."""
    deadline = time.monotonic() + timeout
    while any(_health(system.servers[n].address, n) != wanted for n in names):
        if time.monotonic() > deadline:
            found = {n: _health(system.servers[n].address, n) for n in names}
            raise AssertionError(f"health not {wanted} within {timeout}s: {found}")
        time.sleep(0.1)


@dataclass
class Load:
    """Threads calling `call` in a loop until stopped; every outcome with the time its call started (monotonic)."""

    call: Callable[[], str]  # returns an outcome such as "OK", "UNAVAILABLE" or "503"
    threads: int = 4
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.outcomes.append((started, self.call()))
            time.sleep(0.01)

    def since(self, moment: float) -> list[str]:
        """The outcomes of calls that started after `moment`."""
        return [outcome for at, outcome in list(self.outcomes) if at > moment]

    def wait_for(self, count: int, after: float, timeout: float = 30) -> None:
        """Until at least `count` calls that started after `after` finished."""
        deadline = time.monotonic() + timeout
        while len(self.since(after)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} calls in {timeout}s"
            time.sleep(0.05)


def _grpc_code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def _json_me(http: httpx.Client, account: Account) -> str:
    try:
        reply = http.get("/v1/users/me", headers=account.headers)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return "OK" if reply.status_code == 200 else str(reply.status_code)


def _database_reads(channel: grpc.Channel, account: Account) -> dict[str, Callable[[], str]]:
    """One call per service that must read its database to answer, each returning its outcome."""
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    search = search_pb2_grpc.SearchServiceStub(channel)
    return {
        "auth": lambda: _grpc_code(
            lambda: auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=account.metadata, timeout=10)
        ),
        "search": lambda: _grpc_code(
            lambda: search.ListDocuments(search_pb2.ListDocumentsRequest(), metadata=account.metadata, timeout=10)
        ),
    }


def test_postgres_restart_makes_services_not_serving_and_calls_unavailable_then_recovers_without_restarts(
    system: System,
) -> None:
    pids = {name: server.process.pid for name, server in system.servers.items()}
    with grpc.insecure_channel(system.edge) as edge, httpx.Client(base_url=system.http, timeout=30) as http:
        account = register_and_login(edge)
        through_envoy = _database_reads(edge, account)
        with Load(lambda: _json_me(http, account)) as load:
            load.wait_for(20, after=0)
            assert set(load.since(0)) == {"OK"}

            system.postgres.stop("fast")
            _wait_health(system, HOSTED, NOT_SERVING)
            # Directly and through Envoy: a database outage is UNAVAILABLE (retryable), never INTERNAL.
            for name in ("auth", "search"):
                with grpc.insecure_channel(system.servers[name].address) as channel:
                    assert _database_reads(channel, account)[name]() == "UNAVAILABLE", name
                assert through_envoy[name]() == "UNAVAILABLE", name
            outage = time.monotonic()
            load.wait_for(5, after=outage)
            assert set(load.since(outage)) == {"503"}, "a database outage answered other than 503 through Envoy"

            system.postgres.start()
            _wait_health(system, HOSTED, SERVING)
            # Back in Envoy's rotation once each answers through it (its next health check); from then on, every
            # call succeeds: no dead pooled connection, no flapping.
            deadline = time.monotonic() + 30
            while any(call() != "OK" for call in through_envoy.values()):
                assert time.monotonic() < deadline, "not routed again within 30 s of the database's return"
                time.sleep(0.1)
            recovered = time.monotonic()
            load.wait_for(50, after=recovered)
            again = [call() for _ in range(10) for call in through_envoy.values()]
        assert set(load.since(recovered)) == {"OK"} and set(again) == {"OK"}
    assert {name: server.process.pid for name, server in system.servers.items()} == pids
    assert all(server.process.poll() is None for server in system.servers.values())


def _events(channel: grpc.Channel, account: Account, request_id: str) -> list[audit_pb2.Event]:
    reply = audit_pb2_grpc.AuditServiceStub(channel).ListEvents(
        audit_pb2.ListEventsRequest(filter=audit_pb2.EventFilter(request_id=request_id)),
        metadata=account.metadata, timeout=10,
    )  # fmt: skip
    return list(reply.events)


def test_redis_down_fails_open_or_closed_as_configured_and_recovers_without_losing_audit_events(
    system: System, admin: Account
) -> None:
    # A second auth process on the same backends, configured to fail closed; called directly (not announced, so
    # Envoy routes only to the fail-open one).
    closed = system.cluster.start("auth", AUTH_FAIL_CLOSED="true", CONTROL_PLANE_ADDR="")
    with grpc.insecure_channel(system.edge) as edge, grpc.insecure_channel(closed.address) as closed_channel:
        account = register_and_login(edge)
        open_auth = auth_pb2_grpc.AuthServiceStub(edge)
        closed_auth = auth_pb2_grpc.AuthServiceStub(closed_channel)
        me = auth_pb2.GetCurrentUserRequest()
        assert _grpc_code(lambda: closed_auth.GetCurrentUser(me, metadata=account.metadata, timeout=10)) == "OK"

        search = search_pb2_grpc.SearchServiceStub(edge)
        document = _document(f"Renal dosing of vancomycin {uuid.uuid4().hex} during a Redis outage.")

        system.redis.stop()
        try:
            # The indexing queue is Redis: an upload cannot be queued, so it is refused as retryable (and undone, so
            # the retry is not a duplicate).
            assert _grpc_code(lambda: search.CreateDocument(document, metadata=admin.metadata, timeout=10)) == (
                "UNAVAILABLE"
            )
            # Fail-open (the default): token checks and login rate limits let calls through.
            assert _grpc_code(lambda: open_auth.GetCurrentUser(me, metadata=account.metadata, timeout=10)) == "OK"
            logins = [f"redis-outage-{uuid.uuid4().hex}" for _ in range(3)]
            for request_id in logins:
                reply = open_auth.Login(
                    auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD),
                    metadata=(("x-request-id", request_id),), timeout=30,
                )  # fmt: skip
                assert reply.access_token
            # Fail-closed: refused as retryable, never let through and never INTERNAL.
            for _ in range(3):
                assert (
                    _grpc_code(lambda: closed_auth.GetCurrentUser(me, metadata=account.metadata, timeout=10))
                    == "UNAVAILABLE"
                )
            # Services stay SERVING: none of them needs Redis to answer health.
            _wait_health(system, HOSTED, SERVING, timeout=5)
        finally:
            system.redis.start()

        deadline = time.monotonic() + 30
        while _grpc_code(lambda: closed_auth.GetCurrentUser(me, metadata=account.metadata, timeout=10)) != "OK":
            assert time.monotonic() < deadline, "the fail-closed process never recovered"
            time.sleep(0.2)
        # The logins' audit events, buffered by auth while Redis was down, reach the ledger: none lost.
        deadline = time.monotonic() + 30
        while not all(_events(edge, account, request_id) for request_id in logins):
            assert time.monotonic() < deadline, "audit events recorded during the Redis outage were lost"
            time.sleep(0.3)
        assert all(len(_events(edge, account, request_id)) == 1 for request_id in logins)  # and none twice
        # The indexing workers, whose blocking reads failed with Redis, take jobs again.
        created = search.CreateDocument(document, metadata=admin.metadata, timeout=10).document
        assert _final(search, admin, created.id).status == search_pb2.DOCUMENT_STATUS_INDEXED
    assert closed.process.poll() is None and all(s.process.poll() is None for s in system.servers.values())
    closed.stop()


def test_a_search_worker_killed_mid_document_resumes_it_once_restarted(system: System, admin: Account) -> None:
    word = uuid.uuid4().hex
    text = " ".join(f"Sentence {n} about renal dosing of {word} and creatinine clearance." for n in range(600))
    with grpc.insecure_channel(system.edge) as edge:
        search = search_pb2_grpc.SearchServiceStub(edge)
        document = search.CreateDocument(_document(text), metadata=admin.metadata, timeout=30).document
        progress = search.WatchDocument(
            search_pb2.WatchDocumentRequest(document_id=document.id), metadata=admin.metadata, timeout=60
        )
        for update in progress:
            if update.chunks_done >= 4:
                break
        progress.cancel()
        assert update.document.status == search_pb2.DOCUMENT_STATUS_EMBEDDING  # killed halfway through
        killed = system.servers["search"]
        killed.kill()
        # Started again on its port, as the supervisor restarts a crashed worker; it takes the silent job over.
        system.servers["search"] = system.cluster.start("search", port=killed.port)
        reads = search_pb2.GetDocumentRequest(document_id=document.id)
        deadline = time.monotonic() + 30
        while _grpc_code(lambda: search.GetDocument(reads, metadata=admin.metadata, timeout=10)) != "OK":
            assert time.monotonic() < deadline, "Envoy does not route to the restarted worker"
            time.sleep(0.1)
        updates = list(search.WatchDocument(
            search_pb2.WatchDocumentRequest(document_id=document.id), metadata=admin.metadata, timeout=120
        ))  # fmt: skip
        final = updates[-1]
        assert final.document.status == search_pb2.DOCUMENT_STATUS_INDEXED, final.document.error
        assert final.chunks_done == final.chunks_total > update.chunks_done
        hits = search.Search(
            search_pb2.SearchRequest(query=f"renal dosing {word}", page_size=50), metadata=admin.metadata, timeout=30
        ).results
        assert len({hit.chunk_id for hit in hits}) == len(hits) == min(50, final.chunks_total)  # each chunk once


async def test_sigterm_finishes_a_hundred_calls_ends_ten_streams_with_a_status_and_exits_zero(
    system: System, admin: Account
) -> None:
    metrics = free_port()
    # Not announced to Envoy, no indexing workers, and a job queue under a Redis prefix nobody reads: the documents
    # it is given stay PENDING, so their WatchDocument streams stay open until the server stops. Its own data dir:
    # the embedded index admits one process.
    server = system.cluster.start(
        "search", metrics_port=metrics, CONTROL_PLANE_ADDR="", SEARCH_INDEX_WORKERS="0",
        REDIS_KEY_PREFIX=f"test:{uuid.uuid4().hex[:8]}:", SHUTDOWN_GRACE_SECONDS="5",
        DATA_DIR=str(system.cluster.workdir / "sigterm"),
    )  # fmt: skip
    service = registry.spec("search").grpc_service
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        documents = [
            (await stub.CreateDocument(_document(f"Note {n} {uuid.uuid4().hex}."), metadata=admin.metadata)).document
            for n in range(10)
        ]
        streams = [
            stub.WatchDocument(search_pb2.WatchDocumentRequest(document_id=d.id), metadata=admin.metadata, timeout=60)
            for d in documents
        ]
        for stream in streams:
            assert (await stream.read()).document.status == search_pb2.DOCUMENT_STATUS_PENDING
        request = search_pb2.SearchRequest(query="renal dosing of vancomycin in the elderly", page_size=10)
        calls = [stub.Search(request, metadata=admin.metadata, timeout=60) for _ in range(100)]
        results = await sigterm_while_handling(server, metrics, service, "Search", calls, streams=10)
        assert [r for r in results if isinstance(r, BaseException)] == []
        ends = []
        for stream in streams:
            try:
                while await stream.read() is not grpc.aio.EOF:
                    pass
                ends.append("OK")
            except grpc.aio.AioRpcError as exc:
                ends.append(exc.code().name)
    # Streams that outlive the grace period are ended by the server with a status a client retries elsewhere
    # (UNAVAILABLE), not reset; then the process exits cleanly.
    assert ends == ["UNAVAILABLE"] * 10
    assert server.process.wait(timeout=30) == 0
    assert "stopped" in server.log_text()


@dataclass
class SilenceableRelay:
    """A TCP relay in front of a server that can go silent: after `vanish()` it forwards nothing either way but
    keeps both connections open, as a phone that lost its signal (no FIN, no RST, no HTTP/2 goodbye)."""

    target: tuple[str, int]
    port: int = field(default_factory=free_port)
    silent: bool = False
    _server: asyncio.Server | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        """Listen on 127.0.0.1:port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    def vanish(self) -> None:
        """From now on, drop every byte."""
        self.silent = True

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        copies = asyncio.gather(self._copy(reader, up_writer), self._copy(up_reader, writer), return_exceptions=True)
        self._tasks.append(asyncio.ensure_future(copies))
        try:
            await copies
        except asyncio.CancelledError:
            pass  # close(): the connections end with the relay
        finally:
            writer.close()
            up_writer.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.silent:
                writer.write(data)
                await writer.drain()


def _voice_footprint(metrics_port: int) -> tuple[float, float, float]:
    """(open Transcribe streams, voice session tasks, recognizer streams), from the server's Prometheus endpoint."""
    values: dict[str, float] = {}
    for line in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return (
        values.get('voice_sessions_active{method="Transcribe"}', 0.0),
        values["voice_session_tasks"],
        values["voice_recognizer_streams"],
    )


async def test_a_voice_client_that_vanishes_silently_has_its_session_ended_with_nothing_left_behind(
    system: System,
) -> None:
    metrics = free_port()
    # The idle timeout is what ends the session of a peer that went silent: the server then ends a call whose status
    # can no longer be delivered, and must free everything all the same. Not announced: called through the relay.
    voice = system.cluster.start(
        "voice", metrics_port=metrics, CONTROL_PLANE_ADDR="", VOICE_RECOGNIZER_WORKERS="1",
        VOICE_IDLE_TIMEOUT_SECONDS="3",
    )  # fmt: skip
    relay = SilenceableRelay(("127.0.0.1", voice.port))
    await relay.start()
    with grpc.insecure_channel(system.edge) as edge:
        account = register_and_login(edge)
    speaking = asyncio.Event()

    async def requests() -> AsyncIterator[voice_pb2.TranscribeRequest]:
        config = voice_pb2.RecognitionConfig(
            encoding=voice_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16000, interim_results=True
        )
        yield voice_pb2.TranscribeRequest(config=config)
        while True:  # 100 ms of quiet noise every 100 ms: a live microphone
            yield voice_pb2.TranscribeRequest(audio_content=bytes(3200))
            speaking.set()
            await asyncio.sleep(0.1)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            call = voice_pb2_grpc.VoiceServiceStub(channel).Transcribe(requests(), metadata=account.metadata)
            await speaking.wait()
            deadline = time.monotonic() + 20
            while (busy := await asyncio.to_thread(_voice_footprint, metrics))[0] != 1 or busy[1:] < (1, 1):
                assert time.monotonic() < deadline, f"no session running: {busy}"
                await asyncio.sleep(0.05)
            relay.vanish()
            vanished = time.monotonic()
            while await asyncio.to_thread(_voice_footprint, metrics) != (0, 0, 0):
                assert time.monotonic() - vanished < 10, "the session of a vanished client is still running"
                await asyncio.sleep(0.2)
            call.cancel()
    finally:
        await relay.close()
    assert voice.process.poll() is None
    voice.stop()
