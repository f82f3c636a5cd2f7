from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndpointState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDPOINT_STATE_UNSPECIFIED: _ClassVar[EndpointState]
    ENDPOINT_STATE_SERVING: _ClassVar[EndpointState]
    ENDPOINT_STATE_NOT_SERVING: _ClassVar[EndpointState]
    ENDPOINT_STATE_WITHDRAWN: _ClassVar[EndpointState]
ENDPOINT_STATE_UNSPECIFIED: EndpointState
ENDPOINT_STATE_SERVING: EndpointState
ENDPOINT_STATE_NOT_SERVING: EndpointState
ENDPOINT_STATE_WITHDRAWN: EndpointState

class Endpoint(_message.Message):
    __slots__ = ("service", "host", "port", "instance")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    service: str
    host: str
    port: int
    instance: str
    def __init__(self, service: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class AnnounceEndpointRequest(_message.Message):
    __slots__ = ("endpoint", "state")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    state: EndpointState
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., state: _Optional[_Union[EndpointState, str]] = ...) -> None: ...

class AnnounceEndpointResponse(_message.Message):
    __slots__ = ("state", "acknowledged", "pending")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    state: EndpointState
    acknowledged: int
    pending: int
    def __init__(self, state: _Optional[_Union[EndpointState, str]] = ..., acknowledged: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...
