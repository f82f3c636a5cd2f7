from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
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

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_LINEAR16: _ClassVar[AudioEncoding]

class SpeechEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEECH_EVENT_TYPE_UNSPECIFIED: _ClassVar[SpeechEventType]
    SPEECH_EVENT_TYPE_SPEECH_STARTED: _ClassVar[SpeechEventType]
    SPEECH_EVENT_TYPE_SPEECH_ENDED: _ClassVar[SpeechEventType]
    SPEECH_EVENT_TYPE_BARGE_IN: _ClassVar[SpeechEventType]

class ControlAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_ACTION_UNSPECIFIED: _ClassVar[ControlAction]
    CONTROL_ACTION_END_OF_UTTERANCE: _ClassVar[ControlAction]
    CONTROL_ACTION_CANCEL_RESPONSE: _ClassVar[ControlAction]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_LINEAR16: AudioEncoding
SPEECH_EVENT_TYPE_UNSPECIFIED: SpeechEventType
SPEECH_EVENT_TYPE_SPEECH_STARTED: SpeechEventType
SPEECH_EVENT_TYPE_SPEECH_ENDED: SpeechEventType
SPEECH_EVENT_TYPE_BARGE_IN: SpeechEventType
CONTROL_ACTION_UNSPECIFIED: ControlAction
CONTROL_ACTION_END_OF_UTTERANCE: ControlAction
CONTROL_ACTION_CANCEL_RESPONSE: ControlAction

class RecognitionConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hertz", "language_code", "interim_results", "phrase_hints")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    PHRASE_HINTS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hertz: int
    language_code: str
    interim_results: bool
    phrase_hints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., language_code: _Optional[str] = ..., interim_results: _Optional[bool] = ..., phrase_hints: _Optional[_Iterable[str]] = ...) -> None: ...

class ConverseConfig(_message.Message):
    __slots__ = ("recognition", "conversation_id", "voice", "synthesize_speech", "barge_in", "output_sample_rate_hertz", "clinical_context")
    RECOGNITION_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SYNTHESIZE_SPEECH_FIELD_NUMBER: _ClassVar[int]
    BARGE_IN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    CLINICAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    recognition: RecognitionConfig
    conversation_id: str
    voice: str
    synthesize_speech: bool
    barge_in: bool
    output_sample_rate_hertz: int
    clinical_context: _clinical_pb2.ClinicalContext
    def __init__(self, recognition: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., conversation_id: _Optional[str] = ..., voice: _Optional[str] = ..., synthesize_speech: _Optional[bool] = ..., barge_in: _Optional[bool] = ..., output_sample_rate_hertz: _Optional[int] = ..., clinical_context: _Optional[_Union[_clinical_pb2.ClinicalContext, _Mapping]] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("config", "audio_content", "control", "text")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    config: ConverseConfig
    audio_content: bytes
    control: ControlAction
    text: str
    def __init__(self, config: _Optional[_Union[ConverseConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ..., control: _Optional[_Union[ControlAction, str]] = ..., text: _Optional[str] = ...) -> None: ...

class SpeechEvent(_message.Message):
    __slots__ = ("type", "audio_offset_ms")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    type: SpeechEventType
    audio_offset_ms: int
    def __init__(self, type: _Optional[_Union[SpeechEventType, str]] = ..., audio_offset_ms: _Optional[int] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "is_final", "stability", "confidence")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    is_final: bool
    stability: float
    confidence: float
    def __init__(self, text: _Optional[str] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("audio_content", "sequence", "encoding", "sample_rate_hertz", "text")
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    audio_content: bytes
    sequence: int
    encoding: AudioEncoding
    sample_rate_hertz: int
    text: str
    def __init__(self, audio_content: _Optional[bytes] = ..., sequence: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class AnswerText(_message.Message):
    __slots__ = ("delta",)
    DELTA_FIELD_NUMBER: _ClassVar[int]
    delta: str
    def __init__(self, delta: _Optional[str] = ...) -> None: ...

class AnswerCitations(_message.Message):
    __slots__ = ("citations",)
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[_citation_pb2.Citation]
    def __init__(self, citations: _Optional[_Iterable[_Union[_citation_pb2.Citation, _Mapping]]] = ...) -> None: ...

class TurnTimings(_message.Message):
    __slots__ = ("final_transcript_ms", "first_answer_text_ms", "first_audio_ms", "total_ms", "utterance_ms")
    FINAL_TRANSCRIPT_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ANSWER_TEXT_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    final_transcript_ms: float
    first_answer_text_ms: float
    first_audio_ms: float
    total_ms: float
    utterance_ms: float
    def __init__(self, final_transcript_ms: _Optional[float] = ..., first_answer_text_ms: _Optional[float] = ..., first_audio_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., utterance_ms: _Optional[float] = ...) -> None: ...

class TurnCompleted(_message.Message):
    __slots__ = ("transcript", "message_id", "model_used", "phi_detected", "cancelled", "timings")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_USED_FIELD_NUMBER: _ClassVar[int]
    PHI_DETECTED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    message_id: str
    model_used: str
    phi_detected: bool
    cancelled: bool
    timings: TurnTimings
    def __init__(self, transcript: _Optional[str] = ..., message_id: _Optional[str] = ..., model_used: _Optional[str] = ..., phi_detected: _Optional[bool] = ..., cancelled: _Optional[bool] = ..., timings: _Optional[_Union[TurnTimings, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("conversation_id", "session_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    session_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("turn", "session_started", "speech_event", "transcript", "answer_text", "citations", "audio", "turn_completed", "error")
    TURN_FIELD_NUMBER: _ClassVar[int]
    SESSION_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TURN_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    turn: int
    session_started: SessionStarted
    speech_event: SpeechEvent
    transcript: Transcript
    answer_text: AnswerText
    citations: AnswerCitations
    audio: AudioChunk
    turn_completed: TurnCompleted
    error: _status_pb2.Status
    def __init__(self, turn: _Optional[int] = ..., session_started: _Optional[_Union[SessionStarted, _Mapping]] = ..., speech_event: _Optional[_Union[SpeechEvent, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., answer_text: _Optional[_Union[AnswerText, _Mapping]] = ..., citations: _Optional[_Union[AnswerCitations, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., turn_completed: _Optional[_Union[TurnCompleted, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("config", "audio_content", "control")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio_content: bytes
    control: ControlAction
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ..., control: _Optional[_Union[ControlAction, str]] = ...) -> None: ...

class TranscribeResponse(_message.Message):
    __slots__ = ("utterance", "speech_event", "transcript", "error")
    UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    utterance: int
    speech_event: SpeechEvent
    transcript: Transcript
    error: _status_pb2.Status
    def __init__(self, utterance: _Optional[int] = ..., speech_event: _Optional[_Union[SpeechEvent, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("text", "voice", "sample_rate_hertz", "encoding")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    text: str
    voice: str
    sample_rate_hertz: int
    encoding: AudioEncoding
    def __init__(self, text: _Optional[str] = ..., voice: _Optional[str] = ..., sample_rate_hertz: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("audio", "error")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    audio: AudioChunk
    error: _status_pb2.Status
    def __init__(self, audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ("language_code", "page_size", "page_token")
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    language_code: str
    page_size: int
    page_token: str
    def __init__(self, language_code: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("name", "language_codes", "natural_sample_rate_hertz", "engine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODES_FIELD_NUMBER: _ClassVar[int]
    NATURAL_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    language_codes: _containers.RepeatedScalarFieldContainer[str]
    natural_sample_rate_hertz: int
    engine: str
    def __init__(self, name: _Optional[str] = ..., language_codes: _Optional[_Iterable[str]] = ..., natural_sample_rate_hertz: _Optional[int] = ..., engine: _Optional[str] = ...) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices", "next_page_token")
    VOICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    next_page_token: str
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
