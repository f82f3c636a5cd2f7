"""The auth service on the production path: PostgreSQL, Redis, one process per service, JSON through Envoy."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.rpc import error_details_pb2

from services.core.settings import ROOT
from tests.support.admin import users_cli
from tests.support.clients import (
    STRONG_PASSWORD,
    bearer,
    error_detail,
    error_reason,
    json_login,
    json_reason,
    register_and_login,
    unique_email,
)
from tests.support.mesh import Cluster, drop_schemas, free_port
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

pytestmark = pytest.mark.mesh


def _register(http: httpx.Client, email: str, password: str = STRONG_PASSWORD) -> httpx.Response:
    return http.post("/v1/auth:register", json={"email": email, "password": password, "fullName": "Pat Doe"})


def _me(http: httpx.Client, token: str) -> httpx.Response:
    return http.get("/v1/users/me", headers={"authorization": f"Bearer {token}"})


def test_lifecycle_register_login_refresh_reuse_logout(mesh_http: httpx.Client) -> None:
    email = unique_email("life")
    assert _register(mesh_http, email).status_code == 200
    login = json_login(mesh_http, email).json()
    assert login["expiresIn"] == 900 and login["tokenType"] == "Bearer"
    me = _me(mesh_http, login["accessToken"])
    assert me.status_code == 200 and me.json()["user"]["email"] == email

    refreshed = mesh_http.post("/v1/auth:refresh", json={"refreshToken": login["refreshToken"]})
    assert refreshed.status_code == 200
    new = refreshed.json()
    assert new["refreshToken"] != login["refreshToken"]
    assert _me(mesh_http, new["accessToken"]).status_code == 200

    # The retired refresh token comes back: someone copied it. The whole family dies.
    reused = mesh_http.post("/v1/auth:refresh", json={"refreshToken": login["refreshToken"]})
    assert reused.status_code == 401 and json_reason(reused.json()) == "TOKEN_REVOKED"
    for token in (login["accessToken"], new["accessToken"]):
        refused = _me(mesh_http, token)
        assert refused.status_code == 401 and json_reason(refused.json()) == "TOKEN_REVOKED"
    again = mesh_http.post("/v1/auth:refresh", json={"refreshToken": new["refreshToken"]})
    assert again.status_code == 401 and json_reason(again.json()) == "TOKEN_REVOKED"

    second = json_login(mesh_http, email).json()
    assert _me(mesh_http, second["accessToken"]).status_code == 200
    out = mesh_http.post(
        "/v1/auth:logout",
        json={"refreshToken": second["refreshToken"]},
        headers={"authorization": f"Bearer {second['accessToken']}"},
    )
    assert out.status_code == 200
    after = _me(mesh_http, second["accessToken"])
    assert after.status_code == 401 and json_reason(after.json()) == "TOKEN_REVOKED"
    dead = mesh_http.post("/v1/auth:refresh", json={"refreshToken": second["refreshToken"]})
    assert dead.status_code == 401 and json_reason(dead.json()) == "TOKEN_REVOKED"


def test_change_password_revokes_older_tokens_but_not_the_next_login(mesh_http: httpx.Client) -> None:
    email = unique_email("pw")
    _register(mesh_http, email)
    first = json_login(mesh_http, email).json()
    new_password = "violet-Harbor-77-quartz"
    changed = mesh_http.post(
        "/v1/users/me:changePassword",
        json={"currentPassword": STRONG_PASSWORD, "newPassword": new_password},
        headers={"authorization": f"Bearer {first['accessToken']}"},
    )
    assert changed.status_code == 200
    assert json_reason(_me(mesh_http, first["accessToken"]).json()) == "TOKEN_REVOKED"
    assert json_login(mesh_http, email).status_code == 401
    # A login in the same second as the cut-off still works (cut-offs and iat keep milliseconds).
    fresh = json_login(mesh_http, email, new_password).json()
    assert _me(mesh_http, fresh["accessToken"]).status_code == 200


def test_forged_token_is_refused_by_envoy_before_any_service(mesh: Cluster, mesh_http: httpx.Client) -> None:
    forger = Ed25519PrivateKey.generate()
    now = int(time.time())
    claims = {"iss": "voiceassist-auth", "aud": "voiceassist", "sub": str(uuid.uuid4()), "role": "admin",
              "jti": str(uuid.uuid4()), "iat": now, "exp": now + 600, "typ": "access"}  # fmt: skip
    forged = jwt.encode(claims, forger, algorithm="EdDSA", headers={"kid": "made-up"})
    request_id = f"forged-{uuid.uuid4().hex}"
    reply = mesh_http.get("/v1/users", headers={"authorization": f"Bearer {forged}", "x-request-id": request_id})
    assert reply.status_code == 401
    assert reply.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert json_reason(reply.json()) == "UNAUTHENTICATED"
    assert "x-envoy-upstream-service-time" not in reply.headers
    assert all(request_id not in server.log_text() for server in mesh.servers)


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda key, claims: _unsigned(claims), id="alg-none"),
        pytest.param(lambda key, claims: jwt.encode(claims, "s" * 32, algorithm="HS256"), id="hs256"),
        pytest.param(lambda key, claims: jwt.encode({**claims, "iss": "evil"}, key, algorithm="EdDSA"), id="issuer"),
    ],
)
def test_bad_tokens_are_unauthenticated_directly(mesh: Cluster, make_token) -> None:
    claims = {"iss": "voiceassist-auth", "aud": "voiceassist", "sub": "x", "jti": "y", "iat": int(time.time()),
              "exp": int(time.time()) + 60, "typ": "access", "role": "admin"}  # fmt: skip
    token = make_token(Ed25519PrivateKey.generate(), claims)
    auth = next(s for s in mesh.servers if s.services == "auth")
    with grpc.insecure_channel(auth.address) as channel, pytest.raises(grpc.RpcError) as caught:
        auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(token), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "TOKEN_INVALID"


def _unsigned(claims: dict) -> str:
    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def test_refresh_token_is_not_an_access_token(mesh: Cluster, mesh_http: httpx.Client) -> None:
    email = unique_email("rt")
    _register(mesh_http, email)
    login = json_login(mesh_http, email).json()
    at_edge = _me(mesh_http, login["refreshToken"])
    assert at_edge.status_code in (401, 403)  # Envoy: wrong audience
    auth = next(s for s in mesh.servers if s.services == "auth")
    with grpc.insecure_channel(auth.address) as channel, pytest.raises(grpc.RpcError) as caught:
        auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(login["refreshToken"]), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(caught.value) == "TOKEN_INVALID"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": "not-an-email", "password": STRONG_PASSWORD}, "email"),
        ({"email": "a@example.org", "password": ""}, "password"),
        ({"email": "a@example.org", "password": "x" * 5000}, "password"),
        ({"email": "", "password": STRONG_PASSWORD}, "email"),
    ],
)
def test_bad_registration_input_is_invalid_argument(mesh_http: httpx.Client, payload: dict, field: str) -> None:
    reply = mesh_http.post("/v1/auth:register", json=payload)
    assert reply.status_code == 400
    body = reply.json()
    assert json_reason(body) == "VALIDATION_ERROR"
    violations = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))["fieldViolations"]
    assert violations[0]["field"] == field


def test_user_cannot_call_admin_rpcs_and_deactivation_kills_tokens(mesh: Cluster, mesh_http: httpx.Client) -> None:
    admin_email = unique_email("admin")
    env = {**os.environ, **mesh.env, "VOICEASSIST_ADMIN_PASSWORD": STRONG_PASSWORD}
    created = subprocess.run(
        [sys.executable, "-m", "services.cli", "users", "create-admin", admin_email], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    admin = json_login(mesh_http, admin_email).json()
    user_email = unique_email("plain")
    _register(mesh_http, user_email)
    user = json_login(mesh_http, user_email).json()
    user_headers = {"authorization": f"Bearer {user['accessToken']}"}

    denied = mesh_http.get("/v1/users", headers=user_headers)
    assert denied.status_code == 403 and json_reason(denied.json()) == "PERMISSION_DENIED"
    denied = mesh_http.patch(f"/v1/users/{user['user']['id']}?updateMask=role", json={"role": "ROLE_ADMIN"},
                             headers=user_headers)  # fmt: skip
    assert denied.status_code == 403

    admin_headers = {"authorization": f"Bearer {admin['accessToken']}"}
    _register(mesh_http, unique_email("third"))  # at least three accounts, so two pages of two
    listed = mesh_http.get("/v1/users", params={"pageSize": 2}, headers=admin_headers).json()
    assert len(listed["users"]) == 2 and listed["nextPageToken"]
    following = mesh_http.get("/v1/users", params={"pageSize": 2, "pageToken": listed["nextPageToken"]},
                              headers=admin_headers)  # fmt: skip
    assert following.status_code == 200
    assert {u["id"] for u in following.json()["users"]}.isdisjoint({u["id"] for u in listed["users"]})
    mismatched = mesh_http.get("/v1/users", params={"pageToken": listed["nextPageToken"], "role": "ROLE_ADMIN"},
                               headers=admin_headers)  # fmt: skip
    assert mismatched.status_code == 400 and json_reason(mismatched.json()) == "INVALID_PAGE_TOKEN"

    off = mesh_http.patch(f"/v1/users/{user['user']['id']}?updateMask=active", json={"active": False},
                          headers=admin_headers)  # fmt: skip
    assert off.status_code == 200 and off.json()["user"]["active"] is False
    refused = _me(mesh_http, user["accessToken"])
    assert refused.status_code == 401 and json_reason(refused.json()) == "TOKEN_REVOKED"
    relogin = json_login(mesh_http, user_email)
    assert relogin.status_code == 403 and json_reason(relogin.json()) == "ACCOUNT_DISABLED"


def test_login_rate_limit_holds_across_two_auth_processes(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=True, AUTH_LOGIN_PER_MINUTE="10")  # the production default
    try:
        first, second = cluster.start("auth"), cluster.start("auth")
        email = unique_email("rl")
        with grpc.insecure_channel(first.address) as a, grpc.insecure_channel(second.address) as b:
            stubs = [auth_pb2_grpc.AuthServiceStub(a), auth_pb2_grpc.AuthServiceStub(b)]
            stubs[0].Register(auth_pb2.RegisterRequest(email=email, password=STRONG_PASSWORD), timeout=30)
            for i in range(10):
                stubs[i % 2].Login(auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                stubs[1].Login(auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(caught.value) == "RATE_LIMITED"
        retry = error_detail(caught.value, error_details_pb2.RetryInfo)
        assert 0 < retry.retry_delay.ToMilliseconds() <= 60_000
    finally:
        cluster.stop()


def _redis_server(port: int) -> subprocess.Popen:
    """A throw-away Redis (no persistence: a restart comes back empty, without the audit stream or its group)."""
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )


def test_login_fails_open_without_redis_and_closed_when_configured(workdir: Path) -> None:
    redis_port = free_port()
    redis = _redis_server(redis_port)
    cluster = Cluster.create(workdir, mesh=True, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    try:
        metrics_port = free_port()
        open_server = cluster.start("auth", metrics_port=metrics_port)
        closed_server = cluster.start("auth", AUTH_FAIL_CLOSED="true")
        cluster.point_at("auth", open_server)
        audit = cluster.start("audit")
        with grpc.insecure_channel(open_server.address) as channel:
            account = register_and_login(channel)
        redis.terminate()
        redis.wait(10)
        login_id, check_id = f"outage-login-{uuid.uuid4().hex}", f"outage-me-{uuid.uuid4().hex}"
        with grpc.insecure_channel(open_server.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            reply = stub.Login(auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD), timeout=30,
                               metadata=(("x-request-id", login_id),))  # fmt: skip
            assert reply.access_token
            # The token still verifies (revocation list unreachable: fail-open, audited).
            stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), timeout=10,
                                metadata=(*bearer(reply.access_token), ("x-request-id", check_id)))  # fmt: skip
        # The audit events cannot reach the stream: the auth process keeps them and says so, in its log and metrics.
        assert "audit transport unavailable; buffering events locally" in open_server.log_text()
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        buffered = re.search(r'^audit_client_events_buffered\{transport="redis"\} (\S+)$', metrics, re.M)
        assert buffered is not None and float(buffered.group(1)) >= 2  # the login and the revocation outage
        with grpc.insecure_channel(closed_server.address) as channel, pytest.raises(grpc.RpcError) as caught:
            auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(caught.value) == "BACKEND_UNAVAILABLE"

        # Redis is back, empty: the buffered events are flushed and committed to the ledger.
        redis = _redis_server(redis_port)
        actions = _poll_ledger(cluster, (login_id, check_id), want=2)
        assert actions == {login_id: ["auth.login.success"], check_id: ["auth.revocation.unavailable"]}
        with grpc.insecure_channel(audit.address) as channel:
            [event] = audit_pb2_grpc.AuditServiceStub(channel).ListEvents(
                audit_pb2.ListEventsRequest(filter=audit_pb2.EventFilter(request_id=login_id)),
                metadata=bearer(reply.access_token), timeout=10,
            ).events  # fmt: skip
        assert event.action == "auth.login.success" and event.actor.id == account.user_id
        assert "buffered audit events flushed" in open_server.log_text()
    finally:
        cluster.stop()
        if redis.poll() is None:
            redis.kill()
        drop_schemas(cluster.env["DATABASE_SCHEMA_PREFIX"])


def _poll_ledger(cluster: Cluster, request_ids: tuple[str, ...], want: int) -> dict[str, list[str]]:
    """The actions the audit ledger holds for these request ids, once it holds `want` of them."""
    schema = cluster.env["DATABASE_SCHEMA_PREFIX"] + "audit"
    ids = ",".join(f"'{r}'" for r in request_ids)
    query = f'SELECT request_id, action FROM "{schema}".ledger WHERE request_id IN ({ids}) ORDER BY sequence'  # noqa: S608
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-tA", "-F", " ", "-c", query],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        rows = [line.split(" ", 1) for line in out.splitlines() if line]
        if len(rows) >= want or time.monotonic() > deadline:
            found: dict[str, list[str]] = {}
            for request_id, action in rows:
                found.setdefault(request_id, []).append(action)
            return found
        time.sleep(0.2)


def test_expired_access_token_is_token_expired(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=False, AUTH_ACCESS_TOKEN_TTL_SECONDS="1", JWT_LEEWAY_SECONDS="0")
    try:
        server = cluster.start("auth")
        with grpc.insecure_channel(server.address) as channel:
            account = register_and_login(channel)
            time.sleep(2.1)  # waiting for the token to expire, not for readiness
            with pytest.raises(grpc.RpcError) as caught:
                auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
                )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(caught.value) == "TOKEN_EXPIRED"
    finally:
        cluster.stop()


def test_session_has_an_absolute_lifetime(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=False, AUTH_SESSION_MAX_SECONDS="2", JWT_LEEWAY_SECONDS="0")
    try:
        server = cluster.start("auth")
        with grpc.insecure_channel(server.address) as channel:
            account = register_and_login(channel)
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            rotated = stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=account.refresh_token), timeout=10)
            assert rotated.refresh_expires_in <= 2
            time.sleep(2.1)  # waiting for the session to end, not for readiness
            with pytest.raises(grpc.RpcError) as caught:
                stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=rotated.refresh_token), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(caught.value) == "TOKEN_EXPIRED"
    finally:
        cluster.stop()


def test_jwks_is_public_json(mesh_http: httpx.Client) -> None:
    keys = mesh_http.get("/v1/auth/jwks").json()["keys"]
    assert keys and all(k["kty"] == "OKP" and k["alg"] == "EdDSA" and "y" not in k for k in keys)


def test_the_bearer_scheme_is_case_insensitive(mesh: Cluster, mesh_http: httpx.Client) -> None:
    # RFC 9110 section 11.1: the authentication scheme is case-insensitive, at the edge and at every service.
    email = unique_email("scheme")
    _register(mesh_http, email)
    token = json_login(mesh_http, email).json()["accessToken"]
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        reply = mesh_http.get("/v1/users/me", headers={"authorization": f"{scheme} {token}"})
        assert reply.status_code == 200, (scheme, reply.text)
        with grpc.insecure_channel(mesh.servers[0].address) as channel:
            user = auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=(("authorization", f"{scheme} {token}"),), timeout=10
            )
        assert user.user.email == email


def test_wrong_passwords_throttle_the_guesser_not_the_owner(workdir: Path) -> None:
    # NIST SP 800-63B: throttling that an attacker cannot turn against the owner, at most 100 consecutive failures.
    # Envoy appends the client's address to x-forwarded-for; calls straight from a trusted proxy address do the same.
    cluster = Cluster.create(workdir, mesh=True)
    try:
        auth = cluster.start("auth")
        with grpc.insecure_channel(auth.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            email = unique_email("bob")
            stub.Register(auth_pb2.RegisterRequest(email=email, password=STRONG_PASSWORD), timeout=30)

            def login(password: str, source: str) -> str:
                try:
                    stub.Login(auth_pb2.LoginRequest(email=email, password=password), timeout=30,
                               metadata=(("x-forwarded-for", source),))  # fmt: skip
                except grpc.RpcError as error:
                    return error_reason(error)
                return "OK"

            attacker, owner = "203.0.113.66", "198.51.100.7"
            assert [login("wrong-Password-1", attacker) for _ in range(10)] == ["INVALID_CREDENTIALS"] * 10
            assert login(STRONG_PASSWORD, attacker) == "RATE_LIMITED"  # the guesser's address is stopped
            assert login(STRONG_PASSWORD, owner) == "OK"  # bob, elsewhere, is not

            # A success resets the count of its address: nine more mistakes are forgiven after it.
            assert [login("wrong-Password-1", owner) for _ in range(9)] == ["INVALID_CREDENTIALS"] * 9
            assert login(STRONG_PASSWORD, owner) == "OK"
            assert login("wrong-Password-1", owner) == "INVALID_CREDENTIALS"

            # A guesser spread over many addresses is stopped after 100 failures in all, wherever bob is.
            spread = [login("wrong-Password-1", f"192.0.2.{i // 10}") for i in range(99)]
            assert spread == ["INVALID_CREDENTIALS"] * 99  # with the one above: 100 in a row
            assert login(STRONG_PASSWORD, "198.51.100.99") == "RATE_LIMITED"
    finally:
        cluster.stop()


def test_create_admin_never_ignores_a_password_and_says_why_one_is_refused(mesh: Cluster, mesh_http: httpx.Client):
    email = unique_email("promo")
    _register(mesh_http, email)
    # An existing account: create-admin would have to ignore the new password, so it refuses and names the way.
    taken = users_cli(mesh, "create-admin", email, password="another-Strong-pass-93")
    assert taken.returncode != 0 and "EMAIL_TAKEN" in taken.stderr and "users promote" in taken.stderr
    promoted = users_cli(mesh, "promote", email)
    assert promoted.returncode == 0, promoted.stderr
    login = json_login(mesh_http, email)  # the account's own password still signs in
    assert login.status_code == 200 and login.json()["user"]["role"] == "ROLE_ADMIN"
    assert users_cli(mesh, "promote", unique_email("nobody")).returncode != 0

    # A refused password says what refused it, not a score that was high enough.
    fresh = unique_email("pat.example")
    refused = users_cli(mesh, "create-admin", fresh, password=f"{fresh}-Tonic-42")
    assert refused.returncode != 0 and "WEAK_PASSWORD" in refused.stderr
    assert "email address" in refused.stderr and "score" not in refused.stderr
