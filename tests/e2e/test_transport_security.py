"""Transport security (issue 18): mutual TLS between the mesh's processes with certificates from the control plane's
authority, service identities for internal calls, and HTTPS at the edge.

One cluster for the module: a control plane (the authority), auth and audit as separate processes on SQLite without
Redis, so audit events travel by AppendEvent (the path where a service's identity is what vouches for an event),
and Envoy driven by the control plane over xDS, its certificates served over SDS.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from services import launcher
from services.control_plane.authority import Authority
from services.core import certificates, identity, registry
from services.core.settings import CoreSettings
from tests.support.admin import create_admin
from tests.support.clients import Account, error_reason, register_and_login, unique_email
from tests.support.mesh import Cluster, Server, free_port
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.control.v1 import certificates_pb2, certificates_pb2_grpc

HEALTH_PORTS: dict[str, int] = {}  # the plaintext health-only port of each server that has one


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("mtls"), mesh=False, tls=True,
        # Short-lived certificates, so that renewals happen within the test.
        CONTROL_PLANE_CERTIFICATE_TTL_SECONDS="60",
    )  # fmt: skip
    try:
        ports = {name: free_port() for name in ("audit", "auth")}
        for name, port in ports.items():
            cluster.env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        cluster.env["ENVOY_REDIRECT_PORT"] = str(free_port())
        cluster.start_control_plane()
        HEALTH_PORTS["auth"] = free_port()
        for name, port in ports.items():
            cluster.start(name, port=port, GRPC_HEALTH_PORT=str(HEALTH_PORTS.get(name, 0)))
        cluster.start_xds_envoy(wait_for=[registry.spec(name).grpc_service for name in ports])
        yield cluster
    finally:
        cluster.stop()


def _server(cluster: Cluster, service: str) -> Server:
    return next(s for s in cluster.servers if s.services == service)


def _admin(cluster: Cluster) -> Account:
    with cluster.channel(_server(cluster, "auth")) as channel:
        return create_admin(cluster, channel)


def _jwks_refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as refused:
        auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
    return refused.value.code()


def test_every_server_refuses_plaintext_and_certificates_of_another_authority(secure: Cluster, tmp_path: Path) -> None:
    stranger = Authority.open(tmp_path / "other-ca", b"", datetime.timedelta(hours=1)).issue(["auth"])
    roots = secure.operator().trust_pem
    assert len(secure.servers) == 2
    for server in [*secure.servers, secure.control_plane]:
        assert server is not None
        if server is secure.control_plane:  # it serves TLS without client certificates (callers bring the token)
            assert _jwks_refused(grpc.insecure_channel(server.address)) == grpc.StatusCode.UNAVAILABLE
            continue
        name = [("grpc.ssl_target_name_override", server.services)]
        assert _jwks_refused(grpc.insecure_channel(server.address)) == grpc.StatusCode.UNAVAILABLE
        # A certificate naming a service of ours, from another authority: refused in the handshake.
        forged = grpc.ssl_channel_credentials(roots, stranger.key_pem, stranger.chain_pem)
        assert _jwks_refused(grpc.secure_channel(server.address, forged, options=name)) == grpc.StatusCode.UNAVAILABLE
        # No client certificate at all (the server authenticated, the client not).
        anonymous = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(roots), options=name)
        assert _jwks_refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    # With a certificate of ours, the same call works.
    with secure.channel(_server(secure, "auth")) as channel:
        assert auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=5).keys


async def _ask_authority(
    settings: CoreSettings, workloads: list[str], token: str
) -> grpc.aio.AioRpcError | certificates_pb2.IssueCertificateResponse:
    request = certificates_pb2.IssueCertificateRequest(
        signing_request_pem=identity.signing_request(identity.new_key(), workloads).decode()
    )
    async with certificates.control_plane_channel(settings) as channel:
        stub = certificates_pb2_grpc.CertificateAuthorityServiceStub(channel)
        try:
            return await stub.IssueCertificate(request, metadata=[(identity.JOIN_TOKEN_HEADER, token)], timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc


def test_the_authority_issues_only_with_the_join_token_and_only_service_identities(secure: Cluster) -> None:
    settings = secure.settings()
    token = settings.mesh_join_token.get_secret_value()
    wrong = asyncio.run(_ask_authority(settings, ["audit"], "not-the-token"))
    assert isinstance(wrong, grpc.aio.AioRpcError) and wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    for workload in (identity.EDGE, identity.CONTROL_PLANE, "nobody"):
        refused = asyncio.run(_ask_authority(settings, [workload], token))
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    issued = asyncio.run(_ask_authority(settings, ["audit"], token))
    assert isinstance(issued, certificates_pb2.IssueCertificateResponse)
    leaf = x509.load_pem_x509_certificate(issued.certificate_chain_pem.encode())
    assert identity.workloads_in(leaf) == ["audit"]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= datetime.timedelta(seconds=60 + 300)  # the TTL, plus the backdating


def test_append_event_needs_a_service_identity(secure: Cluster) -> None:
    """A user's token over an operator's certificate is not a service: PERMISSION_DENIED. A service's certificate
    may append without any token, and the event is attributed to that service, whatever it claims."""
    audit = _server(secure, "audit")
    with secure.channel(_server(secure, "auth")) as auth_channel:
        user = register_and_login(auth_channel)
    event = audit_pb2.Event(event_id=str(uuid.uuid4()), action="matrix.note.saved",
                            outcome=audit_pb2.OUTCOME_SUCCESS, actor=audit_pb2.Actor(id=user.user_id),
                            service="auth")  # fmt: skip
    with secure.channel(audit) as channel, pytest.raises(grpc.RpcError) as refused:
        audit_pb2_grpc.AuditServiceStub(channel).AppendEvent(
            audit_pb2.AppendEventRequest(event=event), metadata=user.metadata, timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(refused.value) == "PERMISSION_DENIED"

    as_search = asyncio.run(certificates.issue(secure.settings(), ["search"]))
    with secure.channel(audit, as_search) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        reply = stub.AppendEvent(audit_pb2.AppendEventRequest(event=event), timeout=10)
    assert reply.event_id == event.event_id
    admin = _admin(secure)
    with secure.channel(audit) as channel:
        stored = audit_pb2_grpc.AuditServiceStub(channel).GetEvent(
            audit_pb2.GetEventRequest(event_id=event.event_id), metadata=admin.metadata, timeout=10
        )
    assert stored.event.service == "search"  # what its certificate proves, not the "auth" it claimed


def test_a_login_reaches_the_ledger_attributed_to_auth(secure: Cluster) -> None:
    """Login and a refused login carry no access token: their events reach the ledger on auth's identity."""
    admin = _admin(secure)
    email = unique_email("login.seen")
    with secure.channel(_server(secure, "auth")) as channel:
        account = register_and_login(channel, email)
        with pytest.raises(grpc.RpcError):
            wrong = auth_pb2.LoginRequest(email=email, password="wrong-one")
            auth_pb2_grpc.AuthServiceStub(channel).Login(wrong, timeout=10)
    wanted = {"auth.login.success", "auth.login.failure"}
    found: dict[str, audit_pb2.Event] = {}
    deadline = time.monotonic() + 30
    with secure.channel(_server(secure, "audit")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while set(found) != wanted and time.monotonic() < deadline:
            request = audit_pb2.ListEventsRequest(filter=audit_pb2.EventFilter(action_prefix="auth.login."))
            for event in stub.ListEvents(request, metadata=admin.metadata, timeout=10).events:
                if event.action in wanted and (event.actor.id == account.user_id or event.actor.email == email):
                    found[event.action] = event
            time.sleep(0.2)
    assert set(found) == wanted, f"events seen: {sorted(found)}"
    assert all(e.service == "auth" for e in found.values())


def _sds_updates(cluster: Cluster) -> int:
    """How many times Envoy's TLS contexts took a new certificate or root from SDS (listeners and clusters)."""
    assert cluster.envoy is not None
    lines = cluster.envoy.admin("/stats?filter=ssl_context_update_by_sds").splitlines()
    return sum(int(line.rpartition(": ")[2]) for line in lines if line.rpartition(": ")[2].isdigit())


def test_certificates_renew_under_load_with_no_failed_call(secure: Cluster) -> None:
    """Certificates live 60 s here and are renewed at two thirds of it: auth's (by auth itself) and Envoy's (pushed
    over SDS). Calls straight to auth and through Envoy open a new connection each, so every call is a handshake
    with whatever certificate is current; none fails across the renewals."""
    auth = _server(secure, "auth")
    log_before, sds_before = auth.log_text().count("workload certificate in force"), _sds_updates(secure)
    failures: list[str] = []
    calls = {"direct": 0, "edge": 0}
    stop = threading.Event()

    def load(route: str) -> None:
        while not stop.is_set():
            with secure.channel(auth) if route == "direct" else secure.edge_channel() as channel:
                try:
                    auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
                except grpc.RpcError as exc:
                    failures.append(f"{route}: {exc.code().name}: {exc.details()}")
            calls[route] += 1

    workers = [threading.Thread(target=load, args=(route,)) for route in ("direct", "direct", "edge", "edge")]
    for worker in workers:
        worker.start()

    def renewed() -> bool:
        return (auth.log_text().count("workload certificate in force") > log_before
                and _sds_updates(secure) > sds_before)  # fmt: skip

    try:
        deadline = time.monotonic() + 90
        while not renewed() and time.monotonic() < deadline:
            time.sleep(1)
        assert renewed(), "auth's or Envoy's certificate was not renewed"
        time.sleep(3)  # calls after the renewals, on the new certificates
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert calls["direct"] > 50 and calls["edge"] > 50 and failures == [], (calls, failures[:5])


def _openssl(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *options],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_the_edge_serves_https_with_modern_tls_only(secure: Cluster) -> None:
    assert secure.envoy is not None and secure.envoy.tls
    port = secure.envoy.port
    jwks = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(secure.trust_bundle), f"https://127.0.0.1:{port}/v1/auth/jwks",
         "-D", "-"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert jwks.returncode == 0, jwks.stderr
    assert '"keys"' in jwks.stdout
    assert "strict-transport-security: max-age=31536000; includesubdomains" in jwks.stdout.lower()
    # Verified against our root, and only against it: the system's roots do not know it.
    untrusted = subprocess.run(["curl", "-sS", f"https://127.0.0.1:{port}/v1/auth/jwks"], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
    assert untrusted.returncode != 0
    # Protocols: TLS 1.0 and 1.1 refused (the client allows them: SECLEVEL=0), 1.2 and 1.3 accepted.
    for old in ("-tls1", "-tls1_1"):
        refused = _openssl(port, old, "-cipher", "DEFAULT@SECLEVEL=0")
        assert "Cipher is (NONE)" in refused.stdout, refused.stdout[-2000:]
    for modern in ("-tls1_2", "-tls1_3"):
        accepted = _openssl(port, modern, "-CAfile", str(secure.trust_bundle))
        assert accepted.returncode == 0 and "Verify return code: 0 (ok)" in accepted.stdout, accepted.stdout[-2000:]
    # TLS 1.2 without forward secrecy (RSA key exchange) or with CBC: refused.
    for weak in ("AES128-GCM-SHA256", "AES256-SHA", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
        refused = _openssl(port, "-tls1_2", "-cipher", f"{weak}@SECLEVEL=0")
        assert "Cipher is (NONE)" in refused.stdout, (weak, refused.stdout[-2000:])
    strong = _openssl(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert strong.returncode == 0 and "ECDHE-ECDSA-AES128-GCM-SHA256" in strong.stdout


def test_plain_http_only_redirects(secure: Cluster) -> None:
    assert secure.envoy is not None
    redirect = int(secure.env["ENVOY_REDIRECT_PORT"])
    reply = httpx.get(f"http://127.0.0.1:{redirect}/v1/auth/jwks", timeout=10)
    assert reply.status_code in (301, 308)
    assert reply.headers["location"] == f"https://127.0.0.1:{secure.envoy.port}/v1/auth/jwks"
    # The HTTPS port speaks no plaintext.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{secure.envoy.port}/v1/auth/jwks", timeout=10)


def test_internal_methods_are_not_routed_by_envoy(secure: Cluster) -> None:
    admin = _admin(secure)
    event = audit_pb2.Event(event_id=str(uuid.uuid4()), action="client.note.saved", outcome=audit_pb2.OUTCOME_SUCCESS)
    with secure.edge_channel() as channel, pytest.raises(grpc.RpcError) as caught:
        audit_pb2_grpc.AuditServiceStub(channel).AppendEvent(
            audit_pb2.AppendEventRequest(event=event), metadata=admin.metadata, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with secure.http_client() as http:
        body = {"eventId": event.event_id, "action": event.action, "outcome": "OUTCOME_SUCCESS"}
        assert http.post("/v1/audit/events", json=body, headers=admin.headers).status_code in (404, 405)
        # A signed-in read through the edge works end to end over TLS (Envoy -> audit with mutual TLS).
        assert http.get("/v1/audit/checkpoint", headers=admin.headers).status_code == 200


def test_the_plaintext_health_port_answers_health_checks_only(secure: Cluster) -> None:
    """For probes that cannot present a certificate (Kubernetes' gRPC probes)."""
    auth = _server(secure, "auth")
    port = HEALTH_PORTS["auth"]
    assert auth.process.poll() is None
    assert launcher.is_serving(f"127.0.0.1:{port}", [registry.spec("auth").grpc_service])
    assert _jwks_refused(grpc.insecure_channel(f"127.0.0.1:{port}")) == grpc.StatusCode.UNAUTHENTICATED
