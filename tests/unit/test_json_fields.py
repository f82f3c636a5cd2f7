"""The edge's JSON body scanner (services/control_plane/json_fields.py) run in LuaJIT, on a contract with the
shapes ours do not have yet (repeated messages, maps, Struct); tests/e2e/test_edge.py runs it inside Envoy."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, struct_pb2, timestamp_pb2
from lupa import luajit21

from services.control_plane import json_fields

F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, json_name: str, **kind: object) -> F:
    """A field: a string unless `kind` says otherwise (label, type, type_name)."""
    field = F(name=name, number=number, json_name=json_name, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    for key, value in kind.items():
        setattr(field, key, value)
    return field


def _descriptor() -> bytes:
    item = descriptor_pb2.DescriptorProto(
        name="Item",
        field=[
            _field("name", 1, "name"),
            _field("child", 2, "child", label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".t.v1.Item"),
        ],
    )
    labels = descriptor_pb2.DescriptorProto(
        name="LabelsEntry",
        field=[
            _field("key", 1, "key"),
            _field("value", 2, "value", label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".t.v1.Item"),
        ],
        options=descriptor_pb2.MessageOptions(map_entry=True),
    )
    request = descriptor_pb2.DescriptorProto(
        name="CreateThingRequest",
        field=[
            _field("display_name", 1, "displayName"),
            _field("items", 2, "items", label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".t.v1.Item"),
            _field(
                "labels",
                3,
                "labels",
                label=F.LABEL_REPEATED,
                type=F.TYPE_MESSAGE,
                type_name=".t.v1.CreateThingRequest.LabelsEntry",
            ),
            _field(
                "extra", 4, "extra", label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Struct"
            ),
            _field(
                "when", 5, "when", label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp"
            ),
            _field("thing_id", 6, "thingId"),
        ],
        nested_type=[labels],
    )
    create, rename = (
        descriptor_pb2.MethodDescriptorProto(name=n, input_type=".t.v1.CreateThingRequest", output_type=".t.v1.Item")
        for n in ("CreateThing", "RenameThing")
    )
    create.options.Extensions[annotations_pb2.http].post = "/v1/things"
    create.options.Extensions[annotations_pb2.http].body = "*"
    rename.options.Extensions[annotations_pb2.http].post = "/v1/things/{thing_id}:rename"
    rename.options.Extensions[annotations_pb2.http].body = "*"
    get = descriptor_pb2.MethodDescriptorProto(
        name="GetThing", input_type=".t.v1.CreateThingRequest", output_type=".t.v1.Item"
    )
    get.options.Extensions[annotations_pb2.http].get = "/v1/things/{thing_id}"
    file = descriptor_pb2.FileDescriptorProto(
        name="t/v1/t.proto",
        package="t.v1",
        message_type=[item, request],
        service=[descriptor_pb2.ServiceDescriptorProto(name="ThingService", method=[create, rename, get])],
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(m.DESCRIPTOR.serialized_pb) for m in (struct_pb2, timestamp_pb2)
    ]
    return descriptor_pb2.FileDescriptorSet(file=[*files, file]).SerializeToString()


Scan = Callable[[str, str, str], str | None]


@pytest.fixture(scope="module")
def scan() -> Scan:
    """(method, path, JSON body) -> the first unknown field's path, as the edge computes it."""
    lua = luajit21.LuaRuntime(encoding=None)
    source = json_fields.lua_tables(_descriptor(), ["t.v1.ThingService"]) + json_fields.SCANNER
    first_unknown_field, body_message = lua.execute((source + "return first_unknown_field, body_message").encode())

    def run(method: str, path: str, body: str) -> str | None:
        message = body_message(method.encode(), path.encode())
        assert message is not None, f"no body route for {method} {path}"
        found = first_unknown_field(body.encode(), message)
        return None if found is None else found.decode()

    return run


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"displayName": "a", "thing_id": "b", "display_name": "c", "thingId": "d"}, None),
        ({"items": [{"name": "a"}, {"name": "b", "colour": "red"}]}, "items[1].colour"),
        ({"items": [{"child": {"child": {"name": "a", "age": 3}}}]}, "items[0].child.child.age"),
        ({"labels": {"any key": {"name": "a"}, "x": {}}, "extra": {"anything": [{"at": {"all": 1}}]}}, None),
        ({"when": "2026-01-01T00:00:00Z", "extra": None, "items": []}, None),
        ({"displayName": 'a "quoted" [{ string \\', "userId": "bob"}, "userId"),
        ({"items": [], "labels": {}, "extra": {}, "zz": [1, 2.5e3, True, None]}, "zz"),
    ],
)
def test_the_first_unknown_field_is_named_by_its_path(scan: Scan, body: dict, field: str | None) -> None:
    assert scan("POST", "/v1/things", json.dumps(body)) == field


def test_an_escaped_key_is_compared_as_its_text(scan: Scan) -> None:
    assert scan("POST", "/v1/things", '{"display\\u004eame": "a", "d\\u00e9": 1}') == "d?"
    assert scan("POST", "/v1/things", '{"displayN\\u0061me": "a"}') is None


@pytest.mark.parametrize(
    "body", ['{"displayName": ', '{"items": [{"name": "a"}', '{"displayName" 1}', "", "[1, 2", '"str']
)
def test_malformed_json_is_left_to_the_transcoder(scan: Scan, body: str) -> None:
    assert scan("POST", "/v1/things", body) is None


def test_a_route_with_a_custom_verb_is_told_from_a_path_variable(scan: Scan) -> None:
    assert scan("POST", "/v1/things/abc:rename?x=1", '{"bogus": 1}') == "bogus"
    routes, _ = json_fields.body_fields(_descriptor(), ["t.v1.ThingService"])
    assert [(m, p) for m, p, _ in routes] == [("POST", "^/v1/things/[^/]+%:rename$"), ("POST", "^/v1/things$")]


def test_nesting_deeper_than_protobuf_allows_is_not_walked() -> None:
    lua = luajit21.LuaRuntime(encoding=None)
    source = json_fields.lua_tables(_descriptor(), ["t.v1.ThingService"]) + json_fields.SCANNER
    first_unknown_field = lua.execute((source + "return first_unknown_field").encode())
    deep = '{"items": [' + '{"child": ' * 150 + "{}" + "}" * 150 + "]}"
    assert first_unknown_field(deep.encode(), b".t.v1.CreateThingRequest") is None
