"""The authorization matrix (proto/authorization.yaml), every cell run for real: directly against the server over
gRPC, through Envoy over gRPC, and through Envoy as JSON for methods with an HTTP rule.

The accounts are shared (rows that end sessions run as accounts of their own); each transport gets its own
conversation and documents to change and delete. Callers run in the order of CALLERS, the owner last, so others
try a deletion while its target still exists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from services.core import certificates, registry
from services.core.settings import ROOT
from tests.support.admin import create_admin
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login, unique_email
from tests.support.fuzzing import http_rule, query_pairs
from tests.support.mesh import Cluster
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2, search_pb2_grpc
from voiceassist.voice.v1 import voice_pb2  # noqa: F401  (registers VoiceService in the descriptor pool)

MATRIX = yaml.safe_load((ROOT / "proto" / "authorization.yaml").read_text())
# The owner last: a row that deletes its target is tried by everyone else first.
CALLERS = ("anonymous", "service", "other_user", "viewer", "admin", "user")
ROLES = {"user": auth_pb2.ROLE_USER, "other_user": auth_pb2.ROLE_USER, "viewer": auth_pb2.ROLE_VIEWER,
         "admin": auth_pb2.ROLE_ADMIN}  # fmt: skip
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# What Envoy answers when it refuses a call itself (jwt_authn) and the body is no google.rpc.Status.
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip
CALL_SECONDS = 30
PLACEHOLDER = re.compile(r"\{([a-z0-9_.]+)\}")


def public_methods() -> dict[str, MethodDescriptor]:
    """Every RPC of the services Envoy routes, by "package.Service/Method", from the descriptor set."""
    files = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "voiceassist.binpb").read_bytes())
    names = {
        f"{file.package}.{service.name}/{method.name}"
        for file in files.file
        for service in file.service
        for method in service.method
        if f"{file.package}.{service.name}" in registry.BY_GRPC_SERVICE
    }
    pool = descriptor_pool.Default()
    return {name: pool.FindMethodByName(name.replace("/", ".")) for name in names}


METHODS = public_methods()


def rows() -> Iterator[tuple[str, dict[str, Any]]]:
    for service, methods in MATRIX.items():
        for method, row in methods.items():
            yield f"{service}/{method}", row


def test_matrix_covers_exactly_the_public_rpcs() -> None:
    assert {name for name, _ in rows()} == set(METHODS)
    for name, row in rows():
        assert set(row["expect"]) == set(CALLERS), name
        assert set(row.get("edge", {})) in (set(), set(CALLERS) - {"service"}), name
        for outcome in [*row["expect"].values(), *row.get("edge", {}).values()]:
            assert outcome in grpc.StatusCode.__members__, (name, outcome)
        assert row.get("session") in (None, "fresh", "disposable"), name


@dataclass
class Caller:
    """Who makes a call: an account, or nobody (anonymous)."""

    account: Account | None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.account.metadata if self.account else ()

    def headers(self) -> dict[str, str]:
        return self.account.headers if self.account else {}


@dataclass
class World:
    """The matrix's accounts and resources, set up directly over gRPC."""

    channel: grpc.Channel
    admin: Account
    accounts: dict[str, Account]
    values: dict[str, str]

    def account(self, role_of: str) -> Account:
        """A new signed-in account with the role of caller `role_of`."""
        account = register_and_login(self.channel)
        role = ROLES[role_of]
        if role != auth_pb2.ROLE_USER:
            auth_pb2_grpc.AuthServiceStub(self.channel).UpdateUser(
                auth_pb2.UpdateUserRequest(
                    user=auth_pb2.User(id=account.user_id, role=role), update_mask=FieldMask(paths=["role"])
                ),
                metadata=self.admin.metadata, timeout=CALL_SECONDS,
            )  # fmt: skip
            account = self.login(account)  # a role change revokes the account's tokens
        return account

    def login(self, account: Account) -> Account:
        """A new session of `account`."""
        reply = auth_pb2_grpc.AuthServiceStub(self.channel).Login(
            auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD), timeout=CALL_SECONDS
        )
        return replace(account, access_token=reply.access_token, refresh_token=reply.refresh_token)

    def caller(self, who: str, session: str | None) -> tuple[Caller, dict[str, str]]:
        """The caller `who` for a row with `session`, and the values its request may name."""
        fresh = str(uuid.uuid4())  # documents are refused when their content was uploaded before
        values = dict(
            self.values,
            new_email=unique_email("matrix"),
            uuid=fresh,
            text_base64=base64.b64encode(f"Asthma ({fresh}): inhaled corticosteroids.".encode()).decode(),
        )
        if session == "fresh":
            values["refresh_token"] = self.login(self.accounts["user"]).refresh_token
        if who in ("anonymous", "service"):  # no token (a service is known by its certificate)
            return Caller(None), values
        account = self.account(who) if session == "disposable" else self.accounts[who]
        # A call that may end its session runs on a session of its own, never the account's shared one.
        return Caller(self.login(account) if session == "fresh" else account), values

    def targets(self) -> dict[str, str]:
        """Resources one transport's rows change or delete: a conversation of the user's, two indexed documents."""
        made = rag_pb2_grpc.RagServiceStub(self.channel).CreateConversation(
            rag_pb2.CreateConversationRequest(title="Matrix"), metadata=self.accounts["user"].metadata,
            timeout=CALL_SECONDS,
        )  # fmt: skip
        search = search_pb2_grpc.SearchServiceStub(self.channel)
        documents = []
        for _ in range(2):
            request = search_pb2.CreateDocumentRequest(
                metadata=search_pb2.DocumentMetadata(title="Matrix guideline", source_type="guideline",
                                                     media_type="text/plain"),
                text=f"Hypertension ({uuid.uuid4()}): lifestyle change first, then a thiazide or an ACE inhibitor.",
            )  # fmt: skip
            documents.append(search.CreateDocument(request, metadata=self.admin.metadata, timeout=CALL_SECONDS))
        # Indexed before the rows run: a reindex of a document still being indexed answers something else.
        for document in documents:
            watch = search_pb2.WatchDocumentRequest(document_id=document.document.id)
            *_, last = search.WatchDocument(watch, metadata=self.admin.metadata, timeout=120)
            assert last.document.status == search_pb2.DOCUMENT_STATUS_INDEXED, last.document.error
        return {
            "doomed_conversation": made.conversation.id,
            "document": documents[0].document.id,
            "doomed_document": documents[1].document.id,
        }


def build_world(cluster: Cluster, channel: grpc.Channel, as_service: grpc.Channel) -> World:
    """The accounts every transport shares, the user's conversation and an audit event the user performed (recorded,
    as services do, by a service)."""
    admin = create_admin(cluster, channel)
    world = World(channel, admin, {"admin": admin}, {})
    for who in ("user", "other_user", "viewer"):
        world.accounts[who] = world.account(who)
    user, subject = world.accounts["user"], register_and_login(channel)
    made = rag_pb2_grpc.RagServiceStub(channel).CreateConversation(
        rag_pb2.CreateConversationRequest(title="Matrix"), metadata=user.metadata, timeout=CALL_SECONDS
    )
    event = audit_pb2.Event(event_id=str(uuid.uuid4()), action="matrix.setup", outcome=audit_pb2.OUTCOME_SUCCESS,
                            actor=audit_pb2.Actor(id=user.user_id, role="user"))  # fmt: skip
    audit_pb2_grpc.AuditServiceStub(as_service).AppendEvent(audit_pb2.AppendEventRequest(event=event),
                                                            timeout=CALL_SECONDS)  # fmt: skip
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    stored = audit.GetEvent(audit_pb2.GetEventRequest(event_id=event.event_id), metadata=user.metadata,
                            timeout=CALL_SECONDS).event  # fmt: skip
    world.values = {
        "user.id": user.user_id, "user.email": user.email, "subject.id": subject.user_id,
        "conversation": made.conversation.id,
        "event": event.event_id, "event.sequence": str(stored.sequence), "tree_size": str(stored.sequence),
        "password": STRONG_PASSWORD,
        "pcm_base64": base64.b64encode(bytes(16000)).decode(),  # 0.5 s of silence at 16 kHz, 16-bit
    }  # fmt: skip
    return world


def fill(template: Any, values: dict[str, str]) -> Any:
    """`template` with every {placeholder} replaced by its value."""
    if isinstance(template, str):
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    if isinstance(template, list):
        return [fill(item, values) for item in template]
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    return template


def messages(method: MethodDescriptor, request: Any) -> list[Message]:
    cls = message_factory.GetMessageClass(method.input_type)
    return [json_format.ParseDict(item, cls()) for item in (request if isinstance(request, list) else [request])]


def stream_error(first: Message | None) -> str:
    """The outcome a stream's first message carries: OK, or the status of an error sent as a message."""
    if first is not None and "error" in first.DESCRIPTOR.fields_by_name and first.HasField("error"):
        return CODE_NAMES[first.error.code]
    return "OK"


def grpc_outcome(channel: grpc.Channel, method: MethodDescriptor, requests: list[Message], caller: Caller) -> str:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
             (False, True): channel.unary_stream, (True, True): channel.stream_stream}  # fmt: skip
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    argument = iter(requests) if method.client_streaming else requests[0]
    try:
        if not method.server_streaming:
            stub(argument, metadata=caller.metadata(), timeout=CALL_SECONDS)
            return "OK"
        call = stub(argument, metadata=caller.metadata(), timeout=CALL_SECONDS)
        try:
            return stream_error(next(call, None))
        finally:
            call.cancel()
    except grpc.RpcError as error:
        return str(error.code().name)


def take(message: Message, path: str) -> str:
    """The value of the field at dotted `path` in `message`, cleared there (it travels in the URL instead)."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    value = str(getattr(message, name))
    message.ClearField(name)
    return value


def http_outcome(response: httpx.Response, body: bytes) -> str:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        code = None
    if isinstance(code, int):
        return CODE_NAMES[code]
    return HTTP_CODES.get(response.status_code, f"HTTP {response.status_code}")


def first_element(chunks: Iterator[bytes]) -> dict[str, Any] | None:
    """The first message of a JSON array or newline-delimited JSON stream, read no further than needed."""
    buffer = ""
    for chunk in chunks:
        buffer = (buffer + chunk.decode()).lstrip("[, \r\n")
        if buffer.startswith("]"):
            return None
        try:
            return dict(json.JSONDecoder().raw_decode(buffer)[0])
        except ValueError:
            continue
    return None


def json_outcome(http: httpx.Client, method: MethodDescriptor, request: Message, caller: Caller) -> str:
    rule = http_rule(method)
    assert rule is not None
    verb, template, body_field = rule
    path = re.sub(r"\{([^}=]+)\}", lambda m: quote(take(request, m.group(1)), safe=""), template)
    body: dict[str, Any] | None = None
    if body_field == "*":
        body = json_format.MessageToDict(request)
    elif body_field:
        body = json_format.MessageToDict(getattr(request, body_field))
        request.ClearField(body_field)
    params = query_pairs(json_format.MessageToDict(request)) if body_field != "*" else []
    with http.stream(verb, path, params=params, json=body, headers=caller.headers()) as response:
        if response.status_code != 200:
            return http_outcome(response, response.read())
        if not method.server_streaming:
            return "OK"
        first = first_element(response.iter_bytes())
        if first is not None and isinstance(first.get("error"), dict):
            return CODE_NAMES[first["error"].get("code", 0)]
        return "OK"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The matrix's own server (every service in one process) with mutual TLS, and Envoy over xDS with HTTPS: its
    rows delete documents and end sessions."""
    cluster = Cluster.create(tmp_path_factory.mktemp("matrix"), mesh=False, tls=True)
    try:
        cluster.start_control_plane()
        cluster.start("all")
        cluster.start_xds_envoy()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def direct(cluster: Cluster) -> Iterator[grpc.Channel]:
    """A gRPC channel straight to the matrix's server, with an operator's certificate (no service identity)."""
    with cluster.channel(cluster.servers[0]) as channel:
        yield channel


@pytest.fixture(scope="module")
def as_service(cluster: Cluster) -> Iterator[grpc.Channel]:
    """A gRPC channel straight to the matrix's server with a service's certificate (rag's)."""
    with cluster.channel(cluster.servers[0], asyncio.run(certificates.issue(cluster.settings(), ["rag"]))) as channel:
        yield channel


@pytest.fixture(scope="module")
def world(cluster: Cluster, direct: grpc.Channel, as_service: grpc.Channel) -> World:
    return build_world(cluster, direct, as_service)


@pytest.mark.parametrize("transport", ["grpc", "envoy-grpc", "envoy-json"])
def test_every_cell_of_the_matrix_holds(
    cluster: Cluster, direct: grpc.Channel, as_service: grpc.Channel, world: World, transport: str
) -> None:
    targets = world.targets()
    edge = cluster.edge_channel()
    http = cluster.http_client(timeout=CALL_SECONDS)
    wrong = []
    try:
        for name, row in rows():
            method = METHODS[name]
            if transport == "envoy-json" and http_rule(method) is None:
                continue  # client- and bidi-streaming methods are gRPC only, and internal ones not routed
            for who in CALLERS:
                if who == "service" and transport != "grpc":
                    continue  # through Envoy every caller is the edge
                expected = row.get("edge", row["expect"])[who] if transport != "grpc" else row["expect"][who]
                caller, values = world.caller(who, row.get("session"))
                requests = messages(method, fill(row["request"], values | targets))
                if transport == "envoy-json":
                    got = json_outcome(http, method, requests[0], caller)
                else:
                    channel = edge if transport != "grpc" else as_service if who == "service" else direct
                    got = grpc_outcome(channel, method, requests, caller)
                if got != expected:
                    wrong.append(f"{name} as {who}: {got}, expected {expected}")
    finally:
        http.close()
        edge.close()
    assert not wrong, "\n".join(wrong)
