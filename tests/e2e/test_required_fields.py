"""What the contracts mark REQUIRED (google.api.field_behavior) the servers require: a request that leaves every
field unset is refused with INVALID_ARGUMENT naming a required field, before anything else happens."""

from __future__ import annotations

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.rpc import error_details_pb2

from services.core import registry
from tests.support.admin import create_admin
from tests.support.clients import Account, error_detail
from tests.support.mesh import Cluster
from voiceassist.audit.v1 import audit_pb2  # noqa: F401  (registers the descriptors in the default pool)
from voiceassist.auth.v1 import auth_pb2  # noqa: F401
from voiceassist.rag.v1 import rag_pb2  # noqa: F401
from voiceassist.search.v1 import search_pb2  # noqa: F401
from voiceassist.voice.v1 import voice_pb2  # noqa: F401


def _required(field: FieldDescriptor) -> bool:
    return field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]


def _methods_with_required_fields() -> list[tuple[MethodDescriptor, list[str]]]:
    pool = descriptor_pool.Default()
    found = []
    for spec in registry.SERVICES:
        for method in pool.FindServiceByName(spec.grpc_service).methods:
            required = [f.name for f in method.input_type.fields if _required(f)]
            if required and not method.client_streaming:  # a request stream's first message is checked elsewhere
                found.append((method, required))
    return found


METHODS = _methods_with_required_fields()


@pytest.fixture(scope="module")
def admin(embedded: Cluster) -> Account:
    with grpc.insecure_channel(embedded.servers[0].address) as channel:
        return create_admin(embedded, channel)


def test_the_contracts_mark_required_fields() -> None:
    # The parametrized test below must not pass vacuously.
    assert len(METHODS) >= 20, [m.full_name for m, _ in METHODS]


@pytest.mark.parametrize(("method", "required"), METHODS, ids=[m.full_name for m, _ in METHODS])
def test_an_empty_request_is_refused_naming_a_required_field(
    embedded_channel: grpc.Channel, admin: Account, method: MethodDescriptor, required: list[str]
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = embedded_channel.unary_stream if method.server_streaming else embedded_channel.unary_unary
    call = kind(path, request_serializer=lambda _: b"", response_deserializer=lambda data: data)
    with pytest.raises(grpc.RpcError) as caught:
        reply = call(b"", metadata=admin.metadata, timeout=30)
        if method.server_streaming:
            next(iter(reply))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    bad = error_detail(caught.value, error_details_pb2.BadRequest)
    assert bad is not None, caught.value.details()
    named = {v.field.split(".")[0].split("[")[0] for v in bad.field_violations}
    assert named & set(required), (named, required)
