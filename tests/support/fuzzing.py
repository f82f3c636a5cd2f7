"""Fuzz cases for every RPC of the five public services, built from their descriptors, and the three ways to send
them (gRPC straight to a server, JSON and gRPC-Web through Envoy), each judged against the invariants: no INTERNAL,
UNKNOWN or DATA_LOSS, no HTTP 5xx. Shared by tests/e2e/test_fuzz.py (a seeded, bounded run) and bench/fuzz_bench.py
(the large one).

Values are typed from the descriptors, with the sizes that matter taken from services/core/limits.py (at and one
past every bound), PHI-like canaries planted in free text, unknown enum numbers, invalid UTF-8 spliced into string
fields on the wire, truncated and mutated wire bytes, and random or mutated JSON bodies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
from google.api import annotations_pb2
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.core import limits, registry
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login
from voiceassist.audit.v1 import audit_pb2  # noqa: F401  (registers the descriptors in the default pool)
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc
from voiceassist.rag.v1 import rag_pb2  # noqa: F401
from voiceassist.search.v1 import search_pb2  # noqa: F401
from voiceassist.voice.v1 import voice_pb2  # noqa: F401

# Planted in free text of the inputs; none may ever reach a log file. One name per process, so a hit is ours.
CANARY_NAME = f"Canary Patient-{uuid.uuid4()}"
CANARY_SSN = "219-09-9999"
CANARIES = (CANARY_NAME, CANARY_SSN)

# A server answering one of these to a client's request has a defect: a client mistake is INVALID_ARGUMENT & co.
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
_BAD_NUMBERS = frozenset(c.value[0] for c in BAD_CODES)
TIMEOUT_SECONDS = 20.0  # a call still running then is a hang: recorded as a violation
STREAM_READ_LIMIT = 8  # responses read from a server stream before the call is cancelled (WatchDocument may not end)


def public_methods() -> list[MethodDescriptor]:
    """Every method of the five public services, in registry order."""
    pool = descriptor_pool.Default()
    return [m for spec in registry.SERVICES for m in pool.FindServiceByName(spec.grpc_service).methods]


def _bounds() -> list[int]:
    """Every number in limits.py that bounds a size (up to 1 MiB: past that only gRPC's message limit answers)."""
    found: set[int] = set()

    def walk(value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, int) and not isinstance(value, bool):
            found.add(value)

    for group in (limits.AUTH, limits.AUDIT, limits.SEARCH, limits.RAG, limits.VOICE):
        walk(group)
    return sorted(n for n in found if n <= limits.MIB)


BOUNDS = _bounds()
SIZES = sorted({0, 1, *BOUNDS, *(n + 1 for n in BOUNDS)})
_LIST_SIZES = [n for n in SIZES if 0 < n <= 1001]
_INT_EDGES = sorted({0, 1, -1, 2**31 - 1, -(2**31), *BOUNDS, *(n + 1 for n in BOUNDS)})

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_TIMESTAMP_SECONDS = (-62135596800, 253402300799)  # 0001-01-01 .. 9999-12-31, what JSON can say


def _sized_text(n: int) -> str:
    return (CANARY_NAME + " ")[: min(n, len(CANARY_NAME) + 1)] + "x" * max(0, n - len(CANARY_NAME) - 1)


_TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(SIZES).map(_sized_text),
    st.sampled_from([CANARY_NAME, f"{CANARY_NAME} SSN {CANARY_SSN}", f"patient {CANARY_SSN}"]),
    st.integers(0, 2**32).map(lambda n: f"fuzz-{n}@example.org"),
    st.uuids().map(str),
)
# what the Update methods' masks name (and names they do not), besides random text
_MASK_PATHS = ["title", "role", "active", "full_name", "email", "password", "id", "tags", "specialty", "user.role"]
_BYTES = st.one_of(st.binary(max_size=64), st.sampled_from(SIZES).map(lambda n: b"\x00\x7f" * (n // 2)))


def _integers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field.type]
    return st.one_of(st.integers(low, high), st.sampled_from([n for n in _INT_EDGES if low <= n <= high]))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return _BYTES
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: numbers the contract does not name must be refused, not crash a handler
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 1000))
    if kind in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return messages(field.message_type, depth + 1)
    return _integers(field)


def _repeated(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
    few = st.lists(_scalar(field, depth), max_size=3)
    # a huge list: one small value repeated at and past a bound (cheap to draw, as costly to check as any)
    if field.message_type is not None:
        small: st.SearchStrategy[Any] = st.builds(message_factory.GetMessageClass(field.message_type))
    elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        small = st.sampled_from(["", "x", CANARY_NAME]).map(
            lambda text: text.encode() if field.type == FieldDescriptor.TYPE_BYTES else text
        )
    else:
        small = _scalar(field, depth)
    huge = st.tuples(small, st.sampled_from(_LIST_SIZES)).map(lambda pair: [pair[0]] * pair[1])
    return st.one_of(few, few, huge) if depth == 0 else few


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """Messages of `descriptor` with typed random values, boundary sizes, canaries and unknown enum numbers."""
    message = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Timestamp":
        message.seconds = draw(st.integers(*_TIMESTAMP_SECONDS))
        message.nanos = draw(st.integers(0, 999_999_999))
        return message
    if descriptor.full_name == "google.protobuf.FieldMask":
        message.paths.extend(draw(st.lists(st.one_of(st.sampled_from(_MASK_PATHS), st.text(max_size=12)), max_size=3)))
        return message
    if depth > 3:
        return message
    chosen_oneofs = {o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_") and chosen_oneofs[oneof.name] is not field:
            continue
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=3))
            target = getattr(message, field.name)
            for k, v in entries.items():
                if value.message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(_repeated(field, depth)))
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(draw(_scalar(field, depth)))
        else:
            setattr(message, field.name, draw(_scalar(field, depth)))
    return message


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def wire_bytes(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """A serialized message of `descriptor`, often damaged: invalid UTF-8 in a string field, truncated, bytes
    flipped, or wholly random."""
    data = draw(messages(descriptor)).SerializeToString()
    strings = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    mutation = draw(st.sampled_from(["none", "none", "bad_utf8", "truncate", "flip", "random"]))
    if mutation == "bad_utf8" and strings:
        # a later occurrence of a field wins: this string is what the server decodes
        field = draw(st.sampled_from(strings))
        bad = CANARY_NAME.encode() + draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
        data += _varint(field.number << 3 | 2) + _varint(len(bad)) + bad
    elif mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif mutation == "random":
        data = draw(st.binary(max_size=64))
    return data


# ---- requests ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one call ended: a gRPC status name or an HTTP status, and whether it breaks an invariant."""

    transport: str
    method: str
    result: str
    violation: bool


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def grpc_call(channel: grpc.Channel, method: MethodDescriptor, frames: list[bytes], metadata: tuple) -> Outcome:
    """Send `frames` (one for a unary request, a short sequence for a request stream) straight over gRPC."""
    path = _path(method)
    ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming:
            if method.server_streaming:
                replies = channel.stream_stream(path, **ident)(iter(frames), metadata=metadata, timeout=TIMEOUT_SECONDS)
                _drain(replies)
            else:
                channel.stream_unary(path, **ident)(iter(frames), metadata=metadata, timeout=TIMEOUT_SECONDS)
        elif method.server_streaming:
            _drain(channel.unary_stream(path, **ident)(frames[0], metadata=metadata, timeout=TIMEOUT_SECONDS))
        else:
            channel.unary_unary(path, **ident)(frames[0], metadata=metadata, timeout=TIMEOUT_SECONDS)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.CANCELLED:  # we cancelled a stream after reading enough of it
            code = grpc.StatusCode.OK
        elif code in BAD_CODES or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome("grpc", method.full_name, f"{code.name}: {error.details()}", True)
    return Outcome("grpc", method.full_name, code.name, False)


def _drain(replies: Any) -> None:
    for count, _reply in enumerate(replies, 1):
        if count >= STREAM_READ_LIMIT:
            replies.cancel()
            return


def grpc_web_call(
    http: httpx.Client, method: MethodDescriptor, frames: list[bytes], headers: dict[str, str]
) -> Outcome:
    """Send `frames` through Envoy as gRPC-Web (application/grpc-web+proto over HTTP/1.1)."""
    body = b"".join(b"\x00" + len(f).to_bytes(4, "big") + f for f in frames)
    headers = {**headers, "content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    with http.stream("POST", _path(method), content=body, headers=headers, timeout=TIMEOUT_SECONDS) as reply:
        data, _complete = _read_some(reply)
        status = reply.headers.get("grpc-status")
        trailer = data.rfind(b"\x80")
        if status is None and trailer >= 0:
            found = re.search(rb"grpc-status:\s*(\d+)", data[trailer:])
            status = found.group(1).decode() if found else None
        bad = reply.status_code >= 500 or (status is not None and int(status) in _BAD_NUMBERS)
        message = reply.headers.get("grpc-message", "") if bad else ""
        return Outcome("grpc-web", method.full_name, f"HTTP {reply.status_code} grpc-status {status} {message}", bad)


def _read_some(reply: httpx.Response, limit: int = 256 * 1024) -> tuple[bytes, bool]:
    """Up to `limit` bytes of a reply (a watch may never end), and whether that was all of it."""
    data = b""
    for chunk in reply.iter_bytes():
        data += chunk
        if len(data) >= limit:
            return data, False
    return data, True


def http_rule(method: MethodDescriptor) -> tuple[str, str, str] | None:
    """(HTTP verb, path template, body) of a method's google.api.http route; None for gRPC-only methods."""
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return (verb.upper(), getattr(rule, verb), rule.body) if verb and verb != "custom" else None


def _pop(tree: dict[str, Any], dotted: str) -> Any:
    """Remove and return the value at a dotted JSON path ("user.id") from `tree` (None when absent)."""
    *parents, last = dotted.split(".")
    for name in parents:
        tree = tree.get(name)
        if not isinstance(tree, dict):
            return None
    return tree.pop(last, None)


def _json_name(dotted: str) -> str:
    return ".".join(re.sub(r"_([a-z])", lambda m: m.group(1).upper(), part) for part in dotted.split("."))


def query_pairs(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A JSON request's fields as the transcoder's query parameters (dotted names for nested messages)."""
    pairs: list[tuple[str, str]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += query_pairs(value, f"{name}.")
        elif isinstance(value, list):
            pairs += [(name, _plain(v)) for v in value if not isinstance(v, dict | list)]
        else:
            pairs.append((name, _plain(value)))
    return pairs


def _plain(value: Any) -> str:
    # httpx refuses URLs over 64 KiB; 16 KiB is still far past what Envoy takes in headers (431)
    return (json.dumps(value) if isinstance(value, bool) else str(value))[: 16 * 1024]


def _short(text: str, keep: int = 2000) -> str:
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def json_request(method: MethodDescriptor, message: Message) -> tuple[str, str, Any, list[tuple[str, str]]] | None:
    """(verb, path, JSON body or None, query) for `message` on `method`'s route, as the proto3 JSON mapping and the
    route template say; None for gRPC-only methods or a message JSON cannot say."""
    rule = http_rule(method)
    if rule is None:
        return None
    verb, template, body_field = rule
    try:
        tree = json_format.MessageToDict(message)
    except (ValueError, json_format.SerializeToJsonError):
        return None

    def substitute(found: re.Match[str]) -> str:
        value = _plain(_pop(tree, _json_name(found.group(1))) or "")
        # A path segment is a resource id, which the access log records by design; ids are opaque server-made
        # tokens, so a canary there stands for no real leak: the planted name goes in free text instead.
        if any(c in value for c in CANARIES):
            value = str(uuid.uuid5(uuid.NAMESPACE_URL, value))
        return quote(value, safe="")

    path = re.sub(r"\{([a-z_.]+)\}", substitute, template)
    if body_field == "*":
        return verb, path, tree, []
    if body_field:
        body = tree.pop(_json_name(body_field), {})
        return verb, path, body, query_pairs(tree)
    return verb, path, None, query_pairs(tree)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def json_bodies(draw: st.DrawFn, body: Any) -> bytes:
    """The body of a JSON request, often damaged: random JSON, an unknown or mistyped field, invalid UTF-8, cut."""
    mutation = draw(st.sampled_from(["none", "none", "random", "mistyped", "bad_utf8", "truncate"]))
    if mutation == "random":
        body = draw(_JSON_VALUES)
    elif mutation == "mistyped" and isinstance(body, dict):
        key = draw(st.sampled_from([*body, "unknownField"]) if body else st.just("unknownField"))
        body = {**body, key: draw(_JSON_VALUES)}
    data = json.dumps(body if body is not None else {}).encode()
    if mutation == "bad_utf8":
        data = data.replace(b"Canary", b"Canary\xff\xfe", 1) if b"Canary" in data else b'{"x": "\xff\xfe"}'
    elif mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


def json_call(
    http: httpx.Client, method: MethodDescriptor, verb: str, path: str, body: bytes | None,
    query: list[tuple[str, str]], headers: dict[str, str],
) -> Outcome:  # fmt: skip
    """Send one JSON request through Envoy; a 5xx breaks the invariant, and so does an error element with a bad
    code at the end of a streamed answer."""
    headers = {**headers, "content-type": "application/json"} if body is not None else headers
    with http.stream(verb, path, params=query, content=body, headers=headers, timeout=TIMEOUT_SECONDS) as reply:
        data, complete = _read_some(reply)
        bad = reply.status_code >= 500
        detail = ""
        if method.server_streaming and reply.status_code == 200 and complete:
            try:
                items = json.loads(data)
            except ValueError:
                items = []
            elements = items if isinstance(items, list) else []
            bad = bad or any(isinstance(e, dict) and e.get("code") in _BAD_NUMBERS for e in elements)
        if bad:
            detail = data[:300].decode(errors="replace")
        return Outcome("json", method.full_name, f"HTTP {reply.status_code} {detail}".strip(), bad)


def log_lines_with_canaries(texts: Iterator[tuple[str, str]]) -> list[str]:
    """Lines (with their file's name) of the given (name, text) pairs that contain a canary."""
    found = []
    for name, text in texts:
        found += [f"{name}: {line[:300]}" for line in text.splitlines() if any(c in line for c in CANARIES)]
    return found


# ---- one case, sent every way --------------------------------------------------------------------------------------

IDENTITIES = ("user", "admin", "anonymous")  # hypothesis favours the first: a caller who gets past Envoy
# After these, the signed-in accounts may be signed out (or their password changed): sign in again.
_SIGNING_OUT = frozenset({"RevokeAllSessions", "Logout", "ChangePassword", "UpdateUser"})


@dataclass(frozen=True)
class Case:
    """One fuzz case: a method, who calls it, its request frames on the wire, and a JSON body for its route."""

    method: str  # full name, e.g. "voiceassist.auth.v1.AuthService.Login"
    identity: str
    frames: tuple[bytes, ...]
    json: tuple[str, str, bytes | None, tuple[tuple[str, str], ...]] | None  # verb, path, body, query

    def __repr__(self) -> str:
        # a falsifying case may hold a megabyte: what it is, not all of it
        return _short(f"Case({self.method!r}, {self.identity!r}, frames={self.frames!r}, json={self.json!r})")


METHODS = {m.full_name: m for m in public_methods()}


@st.composite
def cases(draw: st.DrawFn, method: MethodDescriptor) -> Case:
    """A call of `method`: a caller, wire frames (a short sequence for a request stream) and JSON for its route."""
    count = draw(st.integers(1, 3)) if method.client_streaming else 1
    frames = tuple(draw(wire_bytes(method.input_type)) for _ in range(count))
    request = json_request(method, draw(messages(method.input_type)))
    routed = None
    if request is not None:
        verb, path, body, query = request
        data = draw(json_bodies(body)) if body is not None or verb in ("POST", "PATCH") else None
        routed = (verb, path, data, tuple(query))
    return Case(method.full_name, draw(st.sampled_from(IDENTITIES)), frames, routed)


def any_cases() -> st.SearchStrategy[Case]:
    """A call of any public method."""
    return st.sampled_from(list(METHODS.values())).flatmap(cases)


class Callers:
    """The accounts cases call as (a user and an admin), signed in again after a case that may have signed them
    out: a new sign-in with the same password, since a fuzzed request never knows it."""

    def __init__(self, channel: grpc.Channel, make_admin: Callable[[], Account]) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self.accounts = {"user": register_and_login(channel), "admin": make_admin()}

    def metadata(self, identity: str) -> tuple[tuple[str, str], ...]:
        """gRPC metadata of `identity` ("anonymous" carries none)."""
        account = self.accounts.get(identity)
        return account.metadata if account else ()

    def headers(self, identity: str) -> dict[str, str]:
        """HTTP headers of `identity`."""
        account = self.accounts.get(identity)
        return account.headers if account else {}

    def after(self, case: Case) -> None:
        """Sign in again when `case` may have signed its caller out."""
        account = self.accounts.get(case.identity)
        if account is not None and case.method.rsplit(".", 1)[1] in _SIGNING_OUT:
            request = auth_pb2.LoginRequest(email=account.email, password=STRONG_PASSWORD)
            reply = self._stub.Login(request, timeout=30)
            self.accounts[case.identity] = Account(
                account.email, reply.user.id, reply.access_token, reply.refresh_token
            )


def send(case: Case, channel: grpc.Channel, http: httpx.Client, callers: Callers) -> list[Outcome]:
    """Send `case` straight over gRPC, through Envoy as gRPC-Web and (for a routed method) as JSON."""
    method = METHODS[case.method]
    frames = list(case.frames)
    outcomes = [
        grpc_call(channel, method, frames, callers.metadata(case.identity)),
        grpc_web_call(http, method, frames, callers.headers(case.identity)),
    ]
    if case.json is not None:
        verb, path, body, query = case.json
        outcomes.append(json_call(http, method, verb, path, body, list(query), callers.headers(case.identity)))
    callers.after(case)
    return outcomes


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (a server's worker children count too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending += children.get(current, [])
        try:
            rss_pages = int(Path(f"/proc/{current}/statm").read_text().split()[1])
        except OSError:
            continue
        total += rss_pages * os.sysconf("SC_PAGE_SIZE")
    return total


def wait_access_log_flushed(http: httpx.Client, access_log: Path, timeout: float = 10) -> None:
    """Return once a marker call made now is in Envoy's access log (written every second), so that every call
    before it is there too."""
    marker = f"fuzz-flush-{uuid.uuid4().hex}"
    http.get("/v1/auth/jwks", headers={"x-request-id": marker})
    deadline = time.monotonic() + timeout
    while marker not in (access_log.read_text(errors="replace") if access_log.exists() else ""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy did not write its access log {access_log} within {timeout} s")
        time.sleep(0.2)


def log_files(workdir: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every log file under a cluster's folder: each server's and Envoy's, the access log too."""
    for path in sorted(workdir.rglob("*.log")):
        yield path.name, path.read_text(errors="replace")
