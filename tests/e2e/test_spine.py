"""The spine: discovery, health, JSON transcoding, errors, request ids, limits and graceful shutdown."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import registry
from tests.support.clients import STRONG_PASSWORD, error_reason, json_reason, unique_email
from tests.support.draining import sigterm_while_handling
from tests.support.mesh import Cluster, free_port
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def test_grpcurl_lists_every_service_through_envoy(embedded: Cluster) -> None:
    assert embedded.envoy is not None
    out = subprocess.run(
        [GRPCURL, "-plaintext", embedded.envoy.address, "list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    expected = {s.grpc_service for s in registry.SERVICES} | {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert expected <= set(out)


@pytest.mark.parametrize("through_envoy", [False, True], ids=["direct", "envoy"])
def test_every_service_is_serving(embedded: Cluster, through_envoy: bool) -> None:
    assert embedded.envoy is not None
    target = embedded.envoy.address if through_envoy else embedded.servers[0].address
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for spec in registry.SERVICES:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=spec.grpc_service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, spec.name


def test_mesh_health_through_envoy_answers_for_each_owner(mesh: Cluster) -> None:
    # Envoy sends every health check to one upstream, which asks each service's own process.
    assert mesh.envoy is not None
    with grpc.insecure_channel(mesh.envoy.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for spec in registry.SERVICES:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=spec.grpc_service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, spec.name


def test_grpcurl_health_check_through_envoy(embedded: Cluster) -> None:
    assert embedded.envoy is not None
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"service": "voiceassist.rag.v1.RagService"}', embedded.envoy.address,
         "grpc.health.v1.Health/Check"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out) == {"status": "SERVING"}


def test_json_call_returns_json(edge_http: httpx.Client) -> None:
    reply = edge_http.post("/v1/auth:checkPasswordStrength", json={"password": "correct horse battery staple"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["acceptable"] is True and 50 <= body["score"] <= 100


def test_service_error_is_json_status_with_matching_http_code(edge_http: httpx.Client) -> None:
    reply = edge_http.post("/v1/auth:register", json={"email": unique_email(), "password": "password123"})
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert json_reason(body) == "WEAK_PASSWORD"
    violations = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))["fieldViolations"]
    assert {v["reason"] for v in violations} >= {"TOO_SHORT", "COMMON_PASSWORD"}


def test_missing_token_is_401_json(edge_http: httpx.Client) -> None:
    reply = edge_http.get("/v1/users/me")
    assert reply.status_code == 401
    assert reply.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert json_reason(reply.json()) == "UNAUTHENTICATED"


def test_grpc_web_call_through_envoy(edge_http: httpx.Client) -> None:
    message = auth_pb2.CheckPasswordStrengthRequest(password="correct horse battery staple").SerializeToString()
    reply = edge_http.post(
        "/voiceassist.auth.v1.AuthService/CheckPasswordStrength",
        content=b"\x00" + len(message).to_bytes(4, "big") + message,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/grpc-web")
    body = reply.content
    length = int.from_bytes(body[1:5], "big")
    assert body[0] == 0  # a data frame, then the trailers frame
    answer = auth_pb2.CheckPasswordStrengthResponse.FromString(body[5 : 5 + length])
    assert answer.acceptable
    assert body[5 + length] == 0x80 and b"grpc-status:0" in body[5 + length :].replace(b" ", b"")


def test_cors_preflight_allows_configured_origin_only(edge_http: httpx.Client) -> None:
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    allowed = edge_http.options("/v1/auth:login", headers={"origin": "http://localhost:3000", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert "authorization" in allowed.headers.get("access-control-allow-headers", "")
    refused = edge_http.options("/v1/auth:login", headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers
    actual = edge_http.post(
        "/v1/auth:checkPasswordStrength", json={"password": "x"}, headers={"origin": "http://localhost:3000"}
    )
    assert actual.status_code == 200
    assert actual.headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert "x-request-id" in actual.headers.get("access-control-expose-headers", "")


def test_unknown_path_is_404_json(edge_http: httpx.Client) -> None:
    reply = edge_http.get("/v1/no/such/thing")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert json_reason(reply.json()) == "NOT_FOUND"


def test_unknown_query_parameter_is_400_json(edge_http: httpx.Client) -> None:
    reply = edge_http.get("/v1/auth/jwks", params={"bogus": "1"})
    assert reply.status_code == 400
    assert json_reason(reply.json()) == "VALIDATION_ERROR"


def test_malformed_json_is_400_json(edge_http: httpx.Client) -> None:
    reply = edge_http.post("/v1/auth:login", content=b'{"email": ', headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert json_reason(reply.json()) == "VALIDATION_ERROR"


def test_oversized_message_is_resource_exhausted(embedded_channel: grpc.Channel) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(embedded_channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CheckPasswordStrength(auth_pb2.CheckPasswordStrengthRequest(password="x" * (9 * 1024 * 1024)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("path", "field"), [("/v1/auth:checkPasswordStrength", "password"), ("/v1/search", "query")])
def test_an_oversized_json_body_is_413_naming_the_limit(edge_http: httpx.Client, path: str, field: str) -> None:
    # It was 429 "rate limited": the service's gRPC limit refused the transcoded message as RESOURCE_EXHAUSTED.
    email = unique_email()
    edge_http.post("/v1/auth:register", json={"email": email, "password": STRONG_PASSWORD})
    token = edge_http.post("/v1/auth:login", json={"email": email, "password": STRONG_PASSWORD}).json()["accessToken"]
    reply = edge_http.post(path, json={field: "x" * (10 * 1024 * 1024)}, headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 413, reply.text[:300]
    body = reply.json()
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert body["details"][0]["reason"] == "PAYLOAD_TOO_LARGE"
    assert body["details"][0]["metadata"]["limit"] == f"{8 * 1024 * 1024} bytes of body"


def test_oversized_headers_are_431_without_internals(edge_http: httpx.Client) -> None:
    # A 10 KB path reached the service, whose metadata limit answered 429 with a dump of header names and sizes.
    reply = edge_http.get("/v1/documents/" + "a" * 10_000)
    assert reply.status_code == 431, reply.text[:300]
    body = reply.json()
    assert body["details"][0]["reason"] == "HEADERS_TOO_LARGE"
    assert body["details"][0]["metadata"]["limit"] == "8 KiB of headers"
    assert "x-forwarded" not in reply.text and "x-envoy" not in reply.text


def test_request_id_is_echoed_and_failed_calls_are_logged(embedded: Cluster, embedded_channel: grpc.Channel) -> None:
    request_id = f"test-{uuid.uuid4().hex}"
    stub = auth_pb2_grpc.AuthServiceStub(embedded_channel)
    _, call = stub.CheckPasswordStrength.with_call(
        auth_pb2.CheckPasswordStrengthRequest(password="abc"), metadata=(("x-request-id", request_id),), timeout=10
    )
    assert ("x-request-id", request_id) in tuple(call.trailing_metadata())
    # A call that succeeds quickly costs no service log line (Envoy's access log has every call); a failed one does.
    assert request_id not in embedded.servers[0].log_text()
    failed_id = f"test-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=(("x-request-id", failed_id),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("x-request-id", failed_id) in tuple(caught.value.trailing_metadata())
    deadline = time.monotonic() + 10  # the line is written once the status is out, so it may trail the reply
    while failed_id not in embedded.servers[0].log_text():
        assert time.monotonic() < deadline, "the failed call is not in the service's log"
        time.sleep(0.1)
    line = next(json.loads(x) for x in embedded.servers[0].log_text().splitlines() if failed_id in x)
    assert (line["message"], line["code"], line["method"]) == (
        "rpc", "UNAUTHENTICATED", "/voiceassist.auth.v1.AuthService/GetCurrentUser"
    )


def test_request_id_through_envoy_json(embedded: Cluster, edge_http: httpx.Client) -> None:
    request_id = f"test-{uuid.uuid4().hex}"
    reply = edge_http.post(
        "/v1/auth:checkPasswordStrength", json={"password": "abc"}, headers={"x-request-id": request_id}
    )
    assert reply.headers["x-request-id"] == request_id
    access = embedded.workdir / "envoy-access.log"
    deadline = time.monotonic() + 10  # Envoy flushes its access log every second
    while request_id not in (access.read_text() if access.exists() else ""):
        assert time.monotonic() < deadline, "the call is not in Envoy's access log"
        time.sleep(0.2)
    line = next(json.loads(x) for x in access.read_text().splitlines() if request_id in x)
    assert (line["path"], line["status"], line["upstream"]) == ("/v1/auth:checkPasswordStrength", 200, "auth")


def test_error_details_never_carry_internals(edge_http: httpx.Client) -> None:
    # A wrong password and an unknown email answer alike.
    email = unique_email()
    edge_http.post("/v1/auth:register", json={"email": email, "password": STRONG_PASSWORD})
    wrong = edge_http.post("/v1/auth:login", json={"email": email, "password": STRONG_PASSWORD + "x"})
    unknown = edge_http.post("/v1/auth:login", json={"email": unique_email(), "password": STRONG_PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["message"] == unknown.json()["message"]
    assert json_reason(wrong.json()) == json_reason(unknown.json()) == "INVALID_CREDENTIALS"


async def test_sigterm_drains_fifty_in_flight_calls(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=False)
    try:
        metrics_port = free_port()
        # Slow logins: argon2id with t=8 behind the hashing semaphore makes 50 of them take seconds.
        server = cluster.start(
            "auth", metrics_port=metrics_port, AUTH_LOGIN_PER_MINUTE="1000", AUTH_ARGON2_TIME_COST="8",
            SHUTDOWN_GRACE_SECONDS="120",  # the default 20 s is not the point: a busy machine takes longer
        )
        email = unique_email()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.Register(auth_pb2.RegisterRequest(email=email, password=STRONG_PASSWORD), timeout=30)
            request = auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD)
            calls = [stub.Login(request, timeout=120) for _ in range(50)]
            results = await sigterm_while_handling(
                server, metrics_port, registry.spec("auth").grpc_service, "Login", calls
            )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert all(r.access_token for r in results)  # type: ignore[union-attr]
        assert server.process.wait(timeout=30) == 0
        assert "shutting down" in server.log_text() and "stopped" in server.log_text()
    finally:
        cluster.stop()


def test_data_files_are_the_owners_alone(embedded: Cluster) -> None:
    # Password hashes, signing keys, the index: nobody else on the host may read them (0700 folders, 0600 files).
    data = Path(embedded.env["DATA_DIR"])
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    paths = [data / "auth.db", *data.rglob("*")]
    assert data / "auth.db" in paths[1:]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(data)} is {oct(mode)}"


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x02\xff\xfe", b"\x0a\x7f\x61", b"\xff\xff\xff"],
    ids=["string-not-utf8", "truncated", "bad-tag"],
)
def test_a_request_that_does_not_parse_is_invalid_argument(
    embedded: Cluster, embedded_channel: grpc.Channel, payload: bytes
) -> None:
    # grpc answered UNKNOWN with the protobuf error text and logged a traceback: a client mistake is no server fault.
    call = embedded_channel.unary_unary("/voiceassist.auth.v1.AuthService/CheckPasswordStrength")
    with pytest.raises(grpc.RpcError) as caught:
        call(payload, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "VALIDATION_ERROR"
    assert "voiceassist.auth.v1.CheckPasswordStrengthRequest" in caught.value.details()
    assert "Decode" not in caught.value.details() and "DecodeError" not in embedded.servers[0].log_text()


def test_a_path_that_is_not_utf8_is_400_through_envoy(edge_http: httpx.Client) -> None:
    email = unique_email()
    edge_http.post("/v1/auth:register", json={"email": email, "password": STRONG_PASSWORD})
    token = edge_http.post("/v1/auth:login", json={"email": email, "password": STRONG_PASSWORD}).json()["accessToken"]
    reply = edge_http.get("/v1/documents/%ff%fe", headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 400, reply.text
    assert json_reason(reply.json()) == "VALIDATION_ERROR" and "Decode" not in reply.text
