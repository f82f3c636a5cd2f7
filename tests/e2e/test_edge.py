"""The edge's checks of JSON bodies, through a real Envoy: a field the method does not have is refused, naming it."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from tests.support.clients import STRONG_PASSWORD, json_login, unique_email


def _account(http: httpx.Client) -> dict[str, Any]:
    email = unique_email("edge")
    assert http.post("/v1/auth:register", json={"email": email, "password": STRONG_PASSWORD}).status_code == 200
    login = json_login(http, email)
    assert login.status_code == 200, login.text
    return login.json()


def _auth(account: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {account['accessToken']}"}


def _refused_field(reply: httpx.Response) -> str:
    """The field a 400 names, after checking the reply is the edge's JSON google.rpc.Status."""
    assert reply.status_code == 400, reply.text[:300]
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, bad_request = body["details"]
    assert info["reason"] == "VALIDATION_ERROR" and info["domain"] == "envoy.voiceassist"
    assert bad_request["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    (violation,) = bad_request["fieldViolations"]
    assert violation["field"] in body["message"]
    return str(violation["field"])


@pytest.mark.parametrize("edge", ["edge_http", "mesh_http"])  # static Lua, and the same Lua over xDS
def test_revoke_all_sessions_with_a_user_id_is_refused_and_revokes_nothing(
    request: pytest.FixtureRequest, edge: str
) -> None:
    # It answered 200 and revoked alice's own sessions: the transcoder dropped "userId" silently.
    edge_http: httpx.Client = request.getfixturevalue(edge)
    alice, bob = _account(edge_http), _account(edge_http)
    reply = edge_http.post("/v1/auth:revokeAllSessions", json={"userId": bob["user"]["id"]}, headers=_auth(alice))
    assert _refused_field(reply) == "userId"
    assert edge_http.get("/v1/users/me", headers=_auth(alice)).status_code == 200
    refreshed = edge_http.post("/v1/auth:refresh", json={"refreshToken": alice["refreshToken"]})
    assert refreshed.status_code == 200, refreshed.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/search", {"query": "aspirin", "filters": {"specialty": "cardiology", "colour": "red"}}, "filters.colour"),
        ("/v1/search", {"query": "aspirin", "filters": {"tags": ["a", '[{"}']}, "pageSize": 3, "x": {}}, "x"),
        ("/v1/documents", {"metadata": {"title": "t", "tags": [], "owner": "bob"}, "text": "hello"}, "metadata.owner"),
        ("/v1/auth:login", {"email": "a@example.org", "pass\\word": "x"}, "pass?word"),
    ],
)
def test_an_unknown_field_is_named_at_any_depth(edge_http: httpx.Client, path: str, body: dict, field: str) -> None:
    # No token: the edge refuses the body before authentication.
    assert _refused_field(edge_http.post(path, json=body)) == field


def test_an_escaped_key_is_read_as_its_text(edge_http: httpx.Client) -> None:
    reply = edge_http.post("/v1/auth:login", content=b'{"em\\u0061il": "nobody@example.org", "password": "x"}')
    assert reply.status_code == 401, reply.text[:300]


@pytest.mark.parametrize(
    "body",
    [
        {"query": "aspirin", "page_size": 3, "filters": {"source_type": "guideline", "document_ids": []}},
        {"query": "aspirin", "pageSize": 3, "filters": {"sourceType": "guideline", "documentIds": []}},
    ],
)
def test_known_fields_pass_under_their_proto_and_json_names(edge_http: httpx.Client, body: dict) -> None:
    reply = edge_http.post("/v1/search", json=body, headers=_auth(_account(edge_http)))
    assert reply.status_code == 200, reply.text[:300]


def test_a_client_cannot_name_the_refused_field_itself(edge_http: httpx.Client) -> None:
    reply = edge_http.post("/v1/auth:login", content=b'{"email": ', headers={"x-voiceassist-unknown-field": "password"})
    assert reply.status_code == 400
    assert "fieldViolations" not in reply.text
