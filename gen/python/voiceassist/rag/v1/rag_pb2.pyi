import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from voiceassist.common.v1 import citation_pb2 as _citation_pb2
from voiceassist.common.v1 import clinical_pb2 as _clinical_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnswerStyle(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_STYLE_UNSPECIFIED: _ClassVar[AnswerStyle]
    ANSWER_STYLE_CONCISE: _ClassVar[AnswerStyle]
    ANSWER_STYLE_DETAILED: _ClassVar[AnswerStyle]

class MessageRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_ROLE_UNSPECIFIED: _ClassVar[MessageRole]
    MESSAGE_ROLE_USER: _ClassVar[MessageRole]
    MESSAGE_ROLE_ASSISTANT: _ClassVar[MessageRole]

class PhiType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHI_TYPE_UNSPECIFIED: _ClassVar[PhiType]
    PHI_TYPE_NAME: _ClassVar[PhiType]
    PHI_TYPE_DATE: _ClassVar[PhiType]
    PHI_TYPE_AGE: _ClassVar[PhiType]
    PHI_TYPE_PHONE_NUMBER: _ClassVar[PhiType]
    PHI_TYPE_EMAIL_ADDRESS: _ClassVar[PhiType]
    PHI_TYPE_SSN: _ClassVar[PhiType]
    PHI_TYPE_MEDICAL_RECORD_NUMBER: _ClassVar[PhiType]
    PHI_TYPE_HEALTH_PLAN_NUMBER: _ClassVar[PhiType]
    PHI_TYPE_ACCOUNT_NUMBER: _ClassVar[PhiType]
    PHI_TYPE_LICENSE_NUMBER: _ClassVar[PhiType]
    PHI_TYPE_VEHICLE_IDENTIFIER: _ClassVar[PhiType]
    PHI_TYPE_DEVICE_IDENTIFIER: _ClassVar[PhiType]
    PHI_TYPE_LOCATION: _ClassVar[PhiType]
    PHI_TYPE_ZIP_CODE: _ClassVar[PhiType]
    PHI_TYPE_URL: _ClassVar[PhiType]
    PHI_TYPE_IP_ADDRESS: _ClassVar[PhiType]
    PHI_TYPE_OTHER_IDENTIFIER: _ClassVar[PhiType]
ANSWER_STYLE_UNSPECIFIED: AnswerStyle
ANSWER_STYLE_CONCISE: AnswerStyle
ANSWER_STYLE_DETAILED: AnswerStyle
MESSAGE_ROLE_UNSPECIFIED: MessageRole
MESSAGE_ROLE_USER: MessageRole
MESSAGE_ROLE_ASSISTANT: MessageRole
PHI_TYPE_UNSPECIFIED: PhiType
PHI_TYPE_NAME: PhiType
PHI_TYPE_DATE: PhiType
PHI_TYPE_AGE: PhiType
PHI_TYPE_PHONE_NUMBER: PhiType
PHI_TYPE_EMAIL_ADDRESS: PhiType
PHI_TYPE_SSN: PhiType
PHI_TYPE_MEDICAL_RECORD_NUMBER: PhiType
PHI_TYPE_HEALTH_PLAN_NUMBER: PhiType
PHI_TYPE_ACCOUNT_NUMBER: PhiType
PHI_TYPE_LICENSE_NUMBER: PhiType
PHI_TYPE_VEHICLE_IDENTIFIER: PhiType
PHI_TYPE_DEVICE_IDENTIFIER: PhiType
PHI_TYPE_LOCATION: PhiType
PHI_TYPE_ZIP_CODE: PhiType
PHI_TYPE_URL: PhiType
PHI_TYPE_IP_ADDRESS: PhiType
PHI_TYPE_OTHER_IDENTIFIER: PhiType

class ConversationSettings(_message.Message):
    __slots__ = ("system_prompt", "answer_style", "specialty")
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_STYLE_FIELD_NUMBER: _ClassVar[int]
    SPECIALTY_FIELD_NUMBER: _ClassVar[int]
    system_prompt: str
    answer_style: AnswerStyle
    specialty: str
    def __init__(self, system_prompt: _Optional[str] = ..., answer_style: _Optional[_Union[AnswerStyle, str]] = ..., specialty: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("id", "title", "archived", "settings", "message_count", "create_time", "update_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    archived: bool
    settings: ConversationSettings
    message_count: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., archived: _Optional[bool] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ..., message_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "conversation_id", "role", "content", "citations", "model_used", "phi_detected", "phi_types", "client_message_id", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_USED_FIELD_NUMBER: _ClassVar[int]
    PHI_DETECTED_FIELD_NUMBER: _ClassVar[int]
    PHI_TYPES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    conversation_id: str
    role: MessageRole
    content: str
    citations: _containers.RepeatedCompositeFieldContainer[_citation_pb2.Citation]
    model_used: str
    phi_detected: bool
    phi_types: _containers.RepeatedScalarFieldContainer[PhiType]
    client_message_id: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., role: _Optional[_Union[MessageRole, str]] = ..., content: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[_citation_pb2.Citation, _Mapping]]] = ..., model_used: _Optional[str] = ..., phi_detected: _Optional[bool] = ..., phi_types: _Optional[_Iterable[_Union[PhiType, str]]] = ..., client_message_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("phi_ms", "retrieval_ms", "generation_ms", "total_ms", "first_token_ms")
    PHI_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    phi_ms: float
    retrieval_ms: float
    generation_ms: float
    total_ms: float
    first_token_ms: float
    def __init__(self, phi_ms: _Optional[float] = ..., retrieval_ms: _Optional[float] = ..., generation_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ...) -> None: ...

class CreateConversationRequest(_message.Message):
    __slots__ = ("title", "settings")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    title: str
    settings: ConversationSettings
    def __init__(self, title: _Optional[str] = ..., settings: _Optional[_Union[ConversationSettings, _Mapping]] = ...) -> None: ...

class CreateConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class GetConversationRequest(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class GetConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "include_archived")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    include_archived: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_archived: _Optional[bool] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateConversationRequest(_message.Message):
    __slots__ = ("conversation", "update_mask")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class DeleteConversationRequest(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class DeleteConversationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("conversation_id", "page_size", "page_token")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    page_size: int
    page_token: str
    def __init__(self, conversation_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("conversation_id", "query", "clinical_context", "client_message_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CLINICAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    query: str
    clinical_context: _clinical_pb2.ClinicalContext
    client_message_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., query: _Optional[str] = ..., clinical_context: _Optional[_Union[_clinical_pb2.ClinicalContext, _Mapping]] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("message_id", "content", "citations", "model_used", "phi_detected", "phi_types", "routing_reason", "timings", "question_message_id")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_USED_FIELD_NUMBER: _ClassVar[int]
    PHI_DETECTED_FIELD_NUMBER: _ClassVar[int]
    PHI_TYPES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    content: str
    citations: _containers.RepeatedCompositeFieldContainer[_citation_pb2.Citation]
    model_used: str
    phi_detected: bool
    phi_types: _containers.RepeatedScalarFieldContainer[PhiType]
    routing_reason: str
    timings: StageTimings
    question_message_id: str
    def __init__(self, message_id: _Optional[str] = ..., content: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[_citation_pb2.Citation, _Mapping]]] = ..., model_used: _Optional[str] = ..., phi_detected: _Optional[bool] = ..., phi_types: _Optional[_Iterable[_Union[PhiType, str]]] = ..., routing_reason: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., question_message_id: _Optional[str] = ...) -> None: ...

class StreamAskRequest(_message.Message):
    __slots__ = ("conversation_id", "query", "clinical_context", "client_message_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CLINICAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    query: str
    clinical_context: _clinical_pb2.ClinicalContext
    client_message_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., query: _Optional[str] = ..., clinical_context: _Optional[_Union[_clinical_pb2.ClinicalContext, _Mapping]] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class CitationList(_message.Message):
    __slots__ = ("citations",)
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[_citation_pb2.Citation]
    def __init__(self, citations: _Optional[_Iterable[_Union[_citation_pb2.Citation, _Mapping]]] = ...) -> None: ...

class StreamAskResponse(_message.Message):
    __slots__ = ("delta", "citations", "answer", "error")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    delta: str
    citations: CitationList
    answer: AskResponse
    error: _status_pb2.Status
    def __init__(self, delta: _Optional[str] = ..., citations: _Optional[_Union[CitationList, _Mapping]] = ..., answer: _Optional[_Union[AskResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class DetectPhiRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class PhiEntity(_message.Message):
    __slots__ = ("type", "start", "end", "score")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    type: PhiType
    start: int
    end: int
    score: float
    def __init__(self, type: _Optional[_Union[PhiType, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class DetectPhiResponse(_message.Message):
    __slots__ = ("phi_detected", "entities", "redacted_text")
    PHI_DETECTED_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    REDACTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    phi_detected: bool
    entities: _containers.RepeatedCompositeFieldContainer[PhiEntity]
    redacted_text: str
    def __init__(self, phi_detected: _Optional[bool] = ..., entities: _Optional[_Iterable[_Union[PhiEntity, _Mapping]]] = ..., redacted_text: _Optional[str] = ...) -> None: ...
