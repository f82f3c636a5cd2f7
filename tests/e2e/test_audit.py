"""The audit ledger on the production path (PostgreSQL, Redis stream, consumer group, Envoy JSON) and in embedded
mode: nothing lost while the audit service is down or crashes, exactly once, tamper evidence that an independent
verifier checks, visibility, pagination, NDJSON export, precise errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
import redis
from google.protobuf import field_mask_pb2, json_format
from google.rpc import error_details_pb2

from services.audit import ledger_proofs as lp
from services.core.audit_client import STREAM, AuditClient, RedisStreamSink
from services.core.redis_store import RedisConnection
from services.core.settings import ROOT
from tests.support.admin import create_admin
from tests.support.clients import (
    Account,
    error_detail,
    error_reason,
    json_login,
    json_reason,
    register_and_login,
    unique_email,
)
from tests.support.mesh import TEST_DATABASE_URL, Cluster, Server, drop_schemas, free_port
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

A = audit_pb2
POLL_SECONDS = 60


def _poll(check, what: str, timeout: float = POLL_SECONDS):
    """Call `check` until it returns something truthy (the ledger is fed asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _json_events(http: httpx.Client, account: Account, **params: str) -> list[dict]:
    reply = http.get("/v1/audit/events", params=params, headers=account.headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]


def _register_json(http: httpx.Client) -> Account:
    email = unique_email("audit")
    assert http.post("/v1/auth:register", json={"email": email, "password": "zebra-Umbrella-42-tonic"}).is_success
    body = json_login(http, email).json()
    return Account(email, body["user"]["id"], body["accessToken"], body["refreshToken"])


# --- the shared mesh: auth events reach the ledger through the Redis stream, read back as JSON through Envoy


@pytest.fixture(scope="module")
def mesh_admin(mesh: Cluster) -> Account:
    """An admin of the shared mesh."""
    auth = next(s for s in mesh.servers if s.services == "auth")
    with grpc.insecure_channel(auth.address) as channel:
        return create_admin(mesh, channel)


@pytest.fixture
def audit_direct(mesh: Cluster) -> Iterator[audit_pb2_grpc.AuditServiceStub]:
    """AuditService at the audit server itself: AppendEvent is internal, Envoy does not route it."""
    server = next(s for s in mesh.servers if s.services == "audit")
    with mesh.channel(server) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)


@pytest.fixture
def audit_stub(mesh: Cluster) -> Iterator[audit_pb2_grpc.AuditServiceStub]:
    """AuditService through Envoy (gRPC)."""
    assert mesh.envoy is not None
    with grpc.insecure_channel(mesh.envoy.address) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)


def test_login_appears_in_list_events_through_envoy_with_the_clients_request_id(mesh_http: httpx.Client) -> None:
    account = _register_json(mesh_http)
    request_id = f"audit-{uuid.uuid4().hex}"
    login = mesh_http.post(
        "/v1/auth:login",
        json={"email": account.email, "password": "zebra-Umbrella-42-tonic"},
        headers={"x-request-id": request_id, "user-agent": "audit-test/1.0"},
    )
    assert login.status_code == 200
    account.access_token = login.json()["accessToken"]
    [event] = _poll(lambda: _json_events(mesh_http, account, **{"filter.requestId": request_id}), "the login event")
    assert event["action"] == "auth.login.success" and event["outcome"] == "OUTCOME_SUCCESS"
    assert event["requestId"] == request_id and event["service"] == "auth"
    assert event["actor"] == {"id": account.user_id, "email": "", "role": "user"}
    assert event["method"] == "/voiceassist.auth.v1.AuthService/Login" and event["userAgent"].startswith("audit-test")
    assert event["clientIp"] and int(event["sequence"]) >= 1  # the address Envoy saw
    single = mesh_http.get(f"/v1/audit/events/{event['eventId']}", headers=account.headers)
    assert single.status_code == 200 and single.json()["event"] == event


def test_users_see_only_their_own_events_and_admins_and_viewers_see_everyone(
    mesh_http: httpx.Client, mesh_admin: Account
) -> None:
    alice, bob = _register_json(mesh_http), _register_json(mesh_http)
    bob_events = _poll(lambda: len(found := _json_events(mesh_http, bob)) == 2 and found, "bob's two events")
    alice_events = _poll(lambda: len(found := _json_events(mesh_http, alice)) == 2 and found, "alice's two events")
    assert {e["actor"]["id"] for e in alice_events} == {alice.user_id}
    assert _json_events(mesh_http, alice, **{"filter.actorId": bob.user_id}) == []
    hidden = mesh_http.get(f"/v1/audit/events/{bob_events[0]['eventId']}", headers=alice.headers)
    assert hidden.status_code == 404 and json_reason(hidden.json()) == "NOT_FOUND"
    denied = mesh_http.post("/v1/audit:verify", json={}, headers=alice.headers)
    assert denied.status_code == 403 and json_reason(denied.json()) == "PERMISSION_DENIED"

    seen_by_admin = _json_events(mesh_http, mesh_admin, **{"filter.actorId": bob.user_id})
    assert [e["eventId"] for e in seen_by_admin] == [e["eventId"] for e in bob_events]
    promote = mesh_http.patch(f"/v1/users/{alice.user_id}?updateMask=role", json={"role": "ROLE_VIEWER"},
                              headers=mesh_admin.headers)  # fmt: skip
    assert promote.status_code == 200
    viewer = json_login(mesh_http, alice.email).json()
    viewer_account = Account(alice.email, alice.user_id, viewer["accessToken"], viewer["refreshToken"])
    seen_by_viewer = _json_events(mesh_http, viewer_account, **{"filter.actorId": bob.user_id})
    assert [e["eventId"] for e in seen_by_viewer] == [e["eventId"] for e in bob_events]
    assert mesh_http.get(f"/v1/audit/events/{bob_events[0]['eventId']}", headers=viewer_account.headers).is_success


def test_pages_are_stable_and_a_page_token_only_works_for_its_own_query(
    mesh_http: httpx.Client, mesh_admin: Account
) -> None:
    for _ in range(3):
        _register_json(mesh_http)
    params = {"filter.actionPrefix": "auth.", "pageSize": "2"}
    first = mesh_http.get("/v1/audit/events", params=params, headers=mesh_admin.headers).json()
    assert len(first["events"]) == 2 and first["nextPageToken"]
    seen = [int(e["sequence"]) for e in first["events"]]
    token = first["nextPageToken"]
    for _ in range(3):  # more events keep arriving; the keyset cursor neither skips nor repeats
        _register_json(mesh_http)
        page = mesh_http.get("/v1/audit/events", params={**params, "pageToken": token}, headers=mesh_admin.headers)
        assert page.status_code == 200
        seen += [int(e["sequence"]) for e in page.json()["events"]]
        token = page.json()["nextPageToken"]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert all(e["action"].startswith("auth.") for e in first["events"])

    for bad in ({**params, "pageToken": token, "filter.actionPrefix": "search."}, {"pageToken": "not-a-token"}):
        refused = mesh_http.get("/v1/audit/events", params=bad, headers=mesh_admin.headers)
        assert refused.status_code == 400 and json_reason(refused.json()) == "INVALID_PAGE_TOKEN"
    # A token is bound to the caller's visibility too: an admin's token is no use to a user.
    user = _register_json(mesh_http)
    replayed = mesh_http.get("/v1/audit/events", params={**params, "pageToken": token}, headers=user.headers)
    assert replayed.status_code == 400 and json_reason(replayed.json()) == "INVALID_PAGE_TOKEN"
    negative = mesh_http.get("/v1/audit/events", params={"pageSize": "-1"}, headers=mesh_admin.headers)
    assert negative.status_code == 400 and json_reason(negative.json()) == "VALIDATION_ERROR"
    capped = mesh_http.get("/v1/audit/events", params={"pageSize": "100000"}, headers=mesh_admin.headers)
    assert capped.status_code == 200 and len(capped.json()["events"]) <= 1000


def test_export_streams_ndjson_through_envoy(mesh_http: httpx.Client) -> None:
    account = _register_json(mesh_http)
    listed = _poll(lambda: len(events := _json_events(mesh_http, account)) >= 2 and events, "the account's events")
    with mesh_http.stream("GET", "/v1/audit/events:export", headers=account.headers) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert [line["event"]["eventId"] for line in lines][: len(listed)] == [e["eventId"] for e in listed]
    assert all("error" not in line or line["error"] is None for line in lines)
    resumed = mesh_http.get(
        "/v1/audit/events:export", params={"afterSequence": listed[0]["sequence"]}, headers=account.headers
    )
    assert json.loads(resumed.text.splitlines()[0])["event"]["eventId"] == listed[1]["eventId"]


@contextlib.contextmanager
def damaged_second_event(mesh: Cluster, http: httpx.Client) -> Iterator[tuple[Account, dict, dict]]:
    """A new account whose second event (of two) is damaged in the ledger (its metadata is no longer JSON), mended
    on exit; yields the account and its two events as JSON."""
    account = _register_json(http)
    first, second = _poll(lambda: len(found := _json_events(http, account)) == 2 and found, "two events")
    schema, sequence = mesh.env["DATABASE_SCHEMA_PREFIX"] + "audit", int(second["sequence"])
    [original] = asyncio.run(_fetch(schema, "SELECT metadata FROM ledger WHERE sequence = $1", sequence))
    damage = "UPDATE ledger SET metadata = $1 WHERE sequence = $2"
    asyncio.run(_superuser_edit(schema, damage, "{broken", sequence))
    try:
        yield account, first, second
    finally:
        asyncio.run(_superuser_edit(schema, damage, original["metadata"], sequence))


def test_an_error_mid_export_is_the_last_ndjson_line_and_the_calls_status(
    mesh: Cluster, mesh_http: httpx.Client, audit_stub: audit_pb2_grpc.AuditServiceStub
) -> None:
    with damaged_second_event(mesh, mesh_http) as (account, first, second):
        with mesh_http.stream("GET", "/v1/audit/events:export", headers=account.headers) as reply:
            assert reply.status_code == 200  # the first event went out before the damaged one was read
            lines = [json.loads(line) for line in reply.iter_lines() if line]
        assert lines[0]["event"]["eventId"] == first["eventId"] and len(lines) == 2
        error = lines[-1]["error"]
        assert error["code"] == grpc.StatusCode.DATA_LOSS.value[0] and json_reason(error) == "LEDGER_DAMAGED"
        assert f"event {second['sequence']} is damaged" in error["message"]
        with pytest.raises(grpc.RpcError) as caught:
            list(audit_stub.ExportEvents(A.ExportEventsRequest(), metadata=account.metadata, timeout=30))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS and error_reason(caught.value) == "LEDGER_DAMAGED"
    replies = list(audit_stub.ExportEvents(A.ExportEventsRequest(), metadata=account.metadata, timeout=30))
    assert [r.event.event_id for r in replies[:2]] == [first["eventId"], second["eventId"]]
    assert {r.event.action for r in replies[2:]} <= {"audit.events.export"}  # reading the trail is audited too


def test_bad_input_gets_precise_errors(
    mesh_http: httpx.Client, mesh_admin: Account, audit_direct: audit_pb2_grpc.AuditServiceStub
) -> None:
    headers = mesh_admin.headers

    def append(**event) -> grpc.RpcError:
        base = {"eventId": str(uuid.uuid4()), "action": "test.bad.input", "outcome": "OUTCOME_SUCCESS"}
        request = A.AppendEventRequest(event=json_format.ParseDict({**base, **event}, A.Event()))
        with pytest.raises(grpc.RpcError) as caught:
            audit_direct.AppendEvent(request, metadata=mesh_admin.metadata, timeout=10)
        return caught.value

    cases = [
        (append(metadata={f"k{i}": "v" for i in range(33)}), "event.metadata", "TOO_MANY_ENTRIES"),
        (append(metadata={"note": "x" * 1025}), "event.metadata", "VALUE_TOO_LONG"),
        (append(metadata={"patient_name": "x"}), "event.metadata", "FORBIDDEN_KEY"),
        (append(eventId="not-a-uuid"), "event.event_id", ""),
        (append(action="Not An Action"), "event.action", ""),
        (append(outcome="OUTCOME_UNSPECIFIED"), "event.outcome", ""),
        (append(requestId="r" * 129), "event.request_id", ""),
    ]
    for error, field, reason in cases:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "VALIDATION_ERROR"
        [violation] = error_detail(error, error_details_pb2.BadRequest).field_violations
        assert violation.field == field and violation.reason == reason

    size = int(mesh_http.get("/v1/audit/checkpoint", headers=headers).json()["checkpoint"]["treeSize"])
    beyond = [
        mesh_http.get("/v1/audit/proofs/inclusion", params={"sequence": 1, "treeSize": size + 1000}, headers=headers),
        mesh_http.get(
            "/v1/audit/proofs/inclusion", params={"sequence": size + 1000, "treeSize": size}, headers=headers
        ),
        mesh_http.get("/v1/audit/proofs/consistency", params={"oldSize": size + 1, "newSize": size}, headers=headers),
        mesh_http.post("/v1/audit:verify", json={"endSequence": size + 1000}, headers=headers),
    ]
    for reply in beyond:
        assert reply.status_code == 400 and json_reason(reply.json()) == "OUT_OF_RANGE", reply.text
    backwards = {"filter.startTime": "2030-01-02T00:00:00Z", "filter.endTime": "2030-01-01T00:00:00Z"}
    invalid = [
        mesh_http.get("/v1/audit/proofs/inclusion", params={"sequence": 0}, headers=headers),
        mesh_http.get("/v1/audit/events/not-a-uuid", headers=headers),
        mesh_http.get("/v1/audit/events", params=backwards, headers=headers),
        # Refused before the first event: a real HTTP error, not a 200 stream.
        mesh_http.get("/v1/audit/events:export", params=backwards, headers=headers),
        mesh_http.get("/v1/audit/events:export", params={"afterSequence": "-1"}, headers=headers),
    ]
    for reply in invalid:
        assert reply.status_code == 400 and json_reason(reply.json()) == "VALIDATION_ERROR", reply.text
    unknown = mesh_http.get("/v1/audit/events", params={"filter.colour": "blue"}, headers=headers)
    assert unknown.status_code == 400
    assert mesh_http.get("/v1/audit/events").status_code == 401


def test_append_event_is_not_routed_by_envoy(mesh_http: httpx.Client, mesh_admin: Account,
                                            audit_stub: audit_pb2_grpc.AuditServiceStub) -> None:  # fmt: skip
    event = A.Event(event_id=str(uuid.uuid4()), action="client.note.saved", outcome=A.OUTCOME_SUCCESS)
    with pytest.raises(grpc.RpcError) as caught:
        audit_stub.AppendEvent(A.AppendEventRequest(event=event), metadata=mesh_admin.metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    body = {"eventId": event.event_id, "action": event.action, "outcome": "OUTCOME_SUCCESS"}
    assert mesh_http.post("/v1/audit/events", json=body, headers=mesh_admin.headers).status_code in (404, 405)


def test_append_event_in_plaintext_lets_admins_attest_anything_and_users_only_their_own_actions(
    mesh_http: httpx.Client, mesh_admin: Account, audit_direct: audit_pb2_grpc.AuditServiceStub
) -> None:
    """Without mutual TLS callers are known by their tokens only (with it, services alone may append:
    test_transport_security.py)."""
    audit_stub = audit_direct
    user = _register_json(mesh_http)
    other = _register_json(mesh_http)
    forged = A.Event(event_id=str(uuid.uuid4()), action="auth.login.success", outcome=A.OUTCOME_SUCCESS,
                     actor=A.Actor(id=other.user_id, role="admin"))  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        audit_stub.AppendEvent(A.AppendEventRequest(event=forged), metadata=user.metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    own = A.Event(
        event_id=str(uuid.uuid4()),
        action="client.note.saved",
        outcome=A.OUTCOME_SUCCESS,
        actor=A.Actor(role="admin", email="boss@example.org"),
        request_id=f"own-{uuid.uuid4().hex}",
    )
    audit_stub.AppendEvent(A.AppendEventRequest(event=own), metadata=user.metadata, timeout=10)
    audit_stub.AppendEvent(A.AppendEventRequest(event=own), metadata=user.metadata, timeout=10)  # idempotent
    [stored] = audit_stub.ListEvents(A.ListEventsRequest(filter=A.EventFilter(request_id=own.request_id)),
                                     metadata=user.metadata, timeout=10).events  # fmt: skip
    assert stored.actor == A.Actor(id=user.user_id, email="", role="user") and stored.appended_by == user.user_id

    forged.request_id = f"imported-{uuid.uuid4().hex}"
    audit_stub.AppendEvent(A.AppendEventRequest(event=forged), metadata=mesh_admin.metadata, timeout=10)
    [imported] = audit_stub.ListEvents(A.ListEventsRequest(filter=A.EventFilter(request_id=forged.request_id)),
                                       metadata=mesh_admin.metadata, timeout=10).events  # fmt: skip
    assert imported.actor.id == other.user_id and imported.appended_by == mesh_admin.user_id


def test_checkpoints_and_proofs_verify_without_trusting_the_server(
    mesh_http: httpx.Client, audit_stub: audit_pb2_grpc.AuditServiceStub
) -> None:
    account = _register_json(mesh_http)
    [login] = _poll(
        lambda: (
            audit_stub.ListEvents(
                A.ListEventsRequest(filter=A.EventFilter(action_prefix="auth.login")), metadata=account.metadata
            ).events
        ),
        "the login event",
    )
    old = audit_stub.GetCheckpoint(A.GetCheckpointRequest(), metadata=account.metadata, timeout=10)
    assert lp.verify_checkpoint_message(old.checkpoint, old.public_key, expected_origin="voiceassist-audit")
    assert old.checkpoint.key_id == lp.key_id(old.public_key)
    proof = audit_stub.GetInclusionProof(
        A.GetInclusionProofRequest(sequence=login.sequence, tree_size=old.checkpoint.tree_size),
        metadata=account.metadata,
    )
    leaf = lp.event_leaf_hash(login)  # recomputed from the event's fields, not taken from the server
    assert lp.verify_inclusion(leaf, proof.leaf_index, proof.tree_size, list(proof.hashes), old.checkpoint.root_hash)

    _register_json(mesh_http)  # the tree grows; the next checkpoint must extend the old one

    def larger() -> A.GetCheckpointResponse | None:
        found = audit_stub.GetCheckpoint(A.GetCheckpointRequest(), metadata=account.metadata)
        return found if found.checkpoint.tree_size > old.checkpoint.tree_size else None

    new = _poll(larger, "a larger checkpoint")
    assert lp.verify_checkpoint_message(new.checkpoint, new.public_key)
    consistency = audit_stub.GetConsistencyProof(
        A.GetConsistencyProofRequest(old_size=old.checkpoint.tree_size, new_size=new.checkpoint.tree_size),
        metadata=account.metadata,
    )
    assert lp.verify_consistency(old.checkpoint.tree_size, new.checkpoint.tree_size, old.checkpoint.root_hash,
                                 new.checkpoint.root_hash, list(consistency.hashes))  # fmt: skip
    # Someone else's event: its proof is as hidden as the event.
    other = _register_json(mesh_http)
    [theirs] = _poll(lambda: audit_stub.ListEvents(A.ListEventsRequest(), metadata=other.metadata).events[:1], "x")
    with pytest.raises(grpc.RpcError) as caught:
        audit_stub.GetInclusionProof(A.GetInclusionProofRequest(sequence=theirs.sequence), metadata=account.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- embedded mode: the in-process queue, consumed by the same code


def test_embedded_login_reaches_the_ledger_through_the_in_process_queue(edge_http: httpx.Client) -> None:
    account = _register_json(edge_http)
    events = _poll(lambda: len(found := _json_events(edge_http, account)) >= 2 and found, "embedded events")
    assert [e["action"] for e in events] == ["auth.register", "auth.login.success"]
    assert [int(e["sequence"]) for e in events] == sorted(int(e["sequence"]) for e in events)


def test_without_redis_a_separate_audit_process_gets_events_through_append_event(workdir: Path) -> None:
    # No Redis and the audit service in another process: the audit client falls back to AppendEvent, with the
    # credentials of the call that recorded the event.
    cluster = Cluster.create(workdir, mesh=False)
    audit_port = free_port()
    cluster.env["AUDIT_ADDR"] = f"127.0.0.1:{audit_port}"
    try:
        auth = cluster.start("auth")
        cluster.point_at("auth", auth)
        audit = cluster.start("audit", port=audit_port)
        with grpc.insecure_channel(auth.address) as channel:
            admin = create_admin(cluster, channel)
            user = register_and_login(channel)
            auth_pb2_grpc.AuthServiceStub(channel).UpdateUser(
                auth_pb2.UpdateUserRequest(user=auth_pb2.User(id=user.user_id, role=auth_pb2.ROLE_VIEWER),
                                           update_mask=field_mask_pb2.FieldMask(paths=["role"])),
                metadata=admin.metadata, timeout=30,
            )  # fmt: skip
        with grpc.insecure_channel(audit.address) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            request = A.ListEventsRequest(filter=A.EventFilter(action_prefix="auth.user.update"))
            [event] = _poll(lambda: stub.ListEvents(request, metadata=admin.metadata, timeout=10).events, "the update")
        assert event.actor.id == admin.user_id and event.resource.id == user.user_id
        assert event.appended_by == admin.user_id and event.metadata["role"] == "viewer"
        # A login carries no credentials to forward: AppendEvent refuses it, and the auth process says so.
        assert "audit event refused by the audit service" in auth.log_text()
    finally:
        cluster.stop()


# --- a ledger of our own: outages, crashes and tampering on PostgreSQL + Redis


@dataclass
class Ledger:
    """A cluster with auth and audit processes of its own, and direct access to its database and stream."""

    cluster: Cluster
    auth: Server
    admin: Account

    @property
    def schema(self) -> str:
        return self.cluster.env["DATABASE_SCHEMA_PREFIX"] + "audit"

    @property
    def stream(self) -> str:
        return self.cluster.env["REDIS_KEY_PREFIX"] + STREAM

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.cluster.env["REDIS_URL"])

    async def connect(self) -> asyncpg.Connection:
        """A connection to the audit schema, as the database superuser."""
        return await _connect(self.schema)

    async def sql(self, query: str, *args):
        return await _fetch(self.schema, query, *args)

    def start_audit(self, **env: str) -> Server:
        return self.cluster.start("audit", **env)

    def stub(self, server: Server) -> tuple[grpc.Channel, audit_pb2_grpc.AuditServiceStub]:
        channel = grpc.insecure_channel(server.address)
        return channel, audit_pb2_grpc.AuditServiceStub(channel)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("ledger"), mesh=True, AUDIT_CLAIM_IDLE_SECONDS="1", AUDIT_RECLAIM_INTERVAL_SECONDS="0.5"
    )
    try:
        auth = cluster.start("auth")
        cluster.point_at("auth", auth)
        with grpc.insecure_channel(auth.address) as channel:
            admin = create_admin(cluster, channel)
        cluster.start("audit").stop()  # migrated: tests may lock its tables before their audit process starts
        yield Ledger(cluster, auth, admin)
    finally:
        cluster.stop()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"])
        with redis.Redis.from_url(cluster.env["REDIS_URL"]) as client:
            client.delete(*client.keys(cluster.env["REDIS_KEY_PREFIX"] + "*") or ["-"])


async def _produce(ledger: Ledger, count: int, service: str, **fields: str) -> list[str]:
    """`count` events recorded the way every service records them (the audit client and its Redis sink)."""
    connection = RedisConnection(ledger.cluster.env["REDIS_URL"], ledger.cluster.env["REDIS_KEY_PREFIX"], 0.5)
    sink = RedisStreamSink(connection, 100_000)
    client = AuditClient(service, sink)
    try:
        return [await client.record("test.ledger.event", metadata={"n": str(i)}, **fields) for i in range(count)]
    finally:
        await sink.close()
        await connection.close()


def _stop(server: Server, sig: int = signal.SIGTERM) -> None:
    server.process.send_signal(sig)
    server.process.wait(30)


async def test_ten_thousand_events_survive_an_audit_outage_exactly_once(ledger: Ledger) -> None:
    service = f"load{uuid.uuid4().hex[:8]}"
    audit = ledger.start_audit()
    ids = await _produce(ledger, 3000, service)
    _stop(audit)  # the audit service is down: producers carry on, the stream holds the events
    started = time.monotonic()
    ids += await _produce(ledger, 7000, service)
    assert time.monotonic() - started < 30  # producers never wait for the audit service
    assert ledger.redis().xlen(ledger.stream) > 0
    # Back with two consumers at once: they share the stream and take turns on the ledger head.
    consumers = [ledger.start_audit(AUDIT_BATCH_SIZE="200"), ledger.start_audit(AUDIT_BATCH_SIZE="200")]
    try:
        query = "SELECT count(*) AS n FROM ledger WHERE service = $1"
        await _async_poll(lambda: ledger.sql(query, service), lambda rows: rows[0]["n"] >= 10_000, "10,000 rows")
        [row] = await ledger.sql(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM ledger WHERE service = $1", service
        )
        [whole] = await ledger.sql("SELECT count(*) AS n, min(sequence) AS lo, max(sequence) AS hi FROM ledger")
        assert row["n"] == row["ids"] == 10_000
        assert whole["lo"] == 1 and whole["hi"] == whole["n"]  # gapless
        stored = {r["event_id"] for r in await ledger.sql("SELECT event_id FROM ledger WHERE service = $1", service)}
        assert stored == set(ids)
        assert ledger.redis().xlen(ledger.stream) == 0
        assert all("audit batch not committed" not in c.log_text() for c in consumers)
    finally:
        for consumer in consumers:
            _stop(consumer)


async def _async_poll(fetch, done, what: str, seconds: float = POLL_SECONDS):
    deadline = time.monotonic() + seconds
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value}")
        await asyncio.sleep(0.1)


async def test_a_consumer_killed_mid_batch_has_its_entries_reclaimed_and_committed_once(ledger: Ledger) -> None:
    service = f"crash{uuid.uuid4().hex[:8]}"
    client = ledger.redis()
    # Hold the ledger head: the victim reads a batch from the stream, then waits for the lock in its commit.
    blocker = await ledger.connect()
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT * FROM ledger_head FOR UPDATE")
    try:
        ids = await _produce(ledger, 300, service)
        victim = ledger.start_audit(AUDIT_CONSUMER_NAME="victim")

        def held_by_victim() -> bool:
            pending = client.xpending(ledger.stream, "ledger")
            return any(c["name"] == b"victim" and c["pending"] == 300 for c in pending["consumers"])

        _poll(held_by_victim, "the victim to hold the batch")
        _stop(victim, signal.SIGKILL)  # dies mid-batch: read, not committed, not acknowledged
    finally:
        await transaction.rollback()
        await blocker.close()
    assert (await ledger.sql("SELECT count(*) AS n FROM ledger WHERE service = $1", service))[0]["n"] == 0
    rescuer = ledger.start_audit(AUDIT_CONSUMER_NAME="rescuer")
    try:
        query = "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM ledger WHERE service = $1"
        [row] = await _async_poll(lambda: ledger.sql(query, service), lambda r: r[0]["n"] >= 300, "the reclaimed batch")
        assert row["n"] == row["ids"] == 300
        stored = {r["event_id"] for r in await ledger.sql("SELECT event_id FROM ledger WHERE service = $1", service)}
        assert stored == set(ids)
        _poll(lambda: client.xpending(ledger.stream, "ledger")["pending"] == 0, "nothing pending")
        assert "reclaimed audit entries from a stopped consumer" in rescuer.log_text()
        [whole] = await ledger.sql("SELECT count(*) AS n, max(sequence) AS hi FROM ledger")
        assert whole["hi"] == whole["n"]
    finally:
        _stop(rescuer)


async def test_entries_that_cannot_be_committed_are_set_aside_without_blocking_the_rest(ledger: Ledger) -> None:
    service = f"poison{uuid.uuid4().hex[:8]}"
    client = ledger.redis()
    client.xadd(ledger.stream, {"event": b"\xff\xfe not a protobuf"})
    oversized = A.Event(event_id=str(uuid.uuid4()), action="test.ledger.event", outcome=A.OUTCOME_SUCCESS,
                        service=service, metadata={f"k{i}": "v" for i in range(40)})  # fmt: skip
    client.xadd(ledger.stream, {"event": oversized.SerializeToString()})
    ids = await _produce(ledger, 5, service)
    [again] = client.xrange(ledger.stream, count=3)[2:]  # the first good event, sent twice (a producer's retry)
    client.xadd(ledger.stream, again[1])
    audit = ledger.start_audit()
    try:
        query = "SELECT event_id FROM ledger WHERE service = $1"
        rows = await _async_poll(lambda: ledger.sql(query, service), lambda r: len(r) == 5, "the good events")
        assert {r["event_id"] for r in rows} == set(ids)
        rejected = client.xrange(ledger.stream.replace("audit.events", "audit.events.rejected"))
        reasons = sorted(fields[b"reason"].decode() for _, fields in rejected[-2:])
        assert reasons == ["entry is not a serialized audit event", "metadata: at most 32 entries"]
        _poll(lambda: client.xlen(ledger.stream) == 0, "the stream to drain")
    finally:
        _stop(audit)


async def test_the_cli_exports_ndjson_and_monitors_checkpoints_like_a_witness(ledger: Ledger, tmp_path: Path) -> None:
    audit = ledger.start_audit()
    state, exported = tmp_path / "witness.json", tmp_path / "export.ndjson"
    env = {**os.environ, **ledger.cluster.env}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "services.cli", "audit", *args, "--address", audit.address,
                   "--token", ledger.admin.access_token]  # fmt: skip
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    try:
        first = run("monitor", "--state", str(state))
        assert first.returncode == 0, first.stderr
        pinned = json.loads(state.read_text())
        service = f"cli{uuid.uuid4().hex[:8]}"
        await _produce(ledger, 10, service)
        count = "SELECT count(*) AS n FROM ledger WHERE service = $1"
        await _async_poll(lambda: ledger.sql(count, service), lambda r: r[0]["n"] == 10, "the new events")
        second = run("monitor", "--state", str(state))  # proves the new checkpoint extends the pinned one
        assert second.returncode == 0, second.stderr
        seen = json.loads(state.read_text())
        assert seen["tree_size"] >= pinned["tree_size"] + 10 and seen["public_key"] == pinned["public_key"]
        state.write_text(json.dumps({**seen, "root_hash": "00" * 32}))  # what a rewritten ledger looks like
        forged = run("monitor", "--state", str(state))
        assert forged.returncode == 1 and "the ledger was rewritten" in forged.stderr

        export = run("export", "--output", str(exported))
        assert export.returncode == 0, export.stderr
        lines = [json.loads(line) for line in exported.read_text().splitlines()]
        assert [int(e["sequence"]) for e in lines] == list(range(1, len(lines) + 1))
        assert f"exported up to sequence {len(lines)}" in export.stderr
    finally:
        _stop(audit)


async def test_tampering_is_caught_by_verify_integrity_and_by_the_independent_verifier(ledger: Ledger) -> None:
    service = f"tamper{uuid.uuid4().hex[:8]}"
    audit = ledger.start_audit()
    channel, stub = ledger.stub(audit)
    admin = ledger.admin.metadata

    def checkpoint() -> A.GetCheckpointResponse:
        return stub.GetCheckpoint(A.GetCheckpointRequest(), metadata=admin, timeout=10)

    async def event_at(sequence: int) -> A.Event:
        [row] = await ledger.sql("SELECT event_id FROM ledger WHERE sequence = $1", sequence)
        return stub.GetEvent(A.GetEventRequest(event_id=row["event_id"]), metadata=admin, timeout=10).event

    try:
        await _produce(ledger, 300, service)
        count = "SELECT count(*) AS n FROM ledger WHERE service = $1"
        await _async_poll(lambda: ledger.sql(count, service), lambda r: r[0]["n"] == 300, "the first events")
        old = checkpoint()
        while old.checkpoint.tree_size % 256 == 0:  # keep the tampered leaf out of a stored 256-leaf subtree
            await _produce(ledger, 1, service)
            size = old.checkpoint.tree_size
            old = _poll(lambda: (c := checkpoint()).checkpoint.tree_size > size and c, "one more")  # noqa: B023
        target = old.checkpoint.tree_size  # the newest event of the old tree: the one to tamper with
        await _produce(ledger, 300, service)
        new = _poll(lambda: (c := checkpoint()).checkpoint.tree_size >= target + 300 and c, "the second events")
        for signed in (old, new):
            assert lp.verify_checkpoint_message(signed.checkpoint, signed.public_key)
        clean = stub.VerifyIntegrity(A.VerifyIntegrityRequest(), metadata=admin, timeout=60)
        assert clean.ok and clean.checked_count >= new.checkpoint.tree_size and clean.checkpoints_checked >= 2

        async def proofs_verify() -> tuple[bool, bool]:
            size = new.checkpoint.tree_size
            inclusion = stub.GetInclusionProof(A.GetInclusionProofRequest(sequence=target, tree_size=size),
                                               metadata=admin)  # fmt: skip
            consistency = stub.GetConsistencyProof(A.GetConsistencyProofRequest(old_size=target, new_size=size),
                                                   metadata=admin)  # fmt: skip
            leaf = lp.event_leaf_hash(await event_at(target))  # from the event as served, never the stored hash
            return (
                lp.verify_inclusion(leaf, target - 1, size, list(inclusion.hashes), new.checkpoint.root_hash),
                lp.verify_consistency(target, size, old.checkpoint.root_hash, new.checkpoint.root_hash,
                                      list(consistency.hashes)),
            )  # fmt: skip

        assert await proofs_verify() == (True, True)

        # The table refuses changes...
        for statement in ("UPDATE ledger SET action = 'x' WHERE sequence = 1", "DELETE FROM ledger WHERE sequence = 1",
                          "TRUNCATE ledger"):  # fmt: skip
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="append-only"):
                await ledger.sql(statement)
        # ...until a superuser turns the trigger off and edits an event.
        await _superuser_edit(
            ledger.schema, "UPDATE ledger SET action = $1 WHERE sequence = $2", "auth.login.failure", target
        )
        report = stub.VerifyIntegrity(A.VerifyIntegrityRequest(), metadata=admin, timeout=60)
        assert (report.ok, report.first_bad_sequence) == (False, target)
        assert report.problem == "leaf hash does not match the stored event"
        assert await proofs_verify() == (False, True)  # the served event no longer hashes to the signed leaf

        # A careful forger rewrites the leaf hash too: the chain and the signed old tree both give it away.
        forged = lp.event_leaf_hash(await event_at(target))
        await _superuser_edit(ledger.schema, "UPDATE ledger SET leaf_hash = $1 WHERE sequence = $2", forged, target)
        report = stub.VerifyIntegrity(A.VerifyIntegrityRequest(start_sequence=target), metadata=admin, timeout=60)
        assert (report.ok, report.first_bad_sequence) == (False, target)
        assert report.problem == "chain hash does not follow from the previous event and this leaf"
        assert await proofs_verify() == (False, False)

        # An event removed outright leaves a gap in the sequence.
        await _superuser_edit(ledger.schema, "DELETE FROM ledger WHERE sequence = $1", target + 5)
        report = stub.VerifyIntegrity(A.VerifyIntegrityRequest(start_sequence=target + 1), metadata=admin, timeout=60)
        assert (report.ok, report.first_bad_sequence, report.checked_count) == (False, target + 5, 4)
        assert report.problem == f"event {target + 5} is missing (the next stored event is {target + 6})"
    finally:
        channel.close()
        _stop(audit)


async def _connect(schema: str) -> asyncpg.Connection:
    """A connection to an audit schema, as the database superuser."""
    return await asyncpg.connect(TEST_DATABASE_URL.replace("+asyncpg", ""), server_settings={"search_path": schema})


async def _fetch(schema: str, query: str, *args) -> list:
    connection = await _connect(schema)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def _superuser_edit(schema: str, statement: str, *args) -> None:
    """Run `statement` on the ledger with its append-only trigger switched off, as only a superuser can."""
    connection = await _connect(schema)
    try:
        async with connection.transaction():
            await connection.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
            await connection.execute(statement, *args)
            await connection.execute("ALTER TABLE ledger ENABLE TRIGGER ledger_append_only")
    finally:
        await connection.close()
