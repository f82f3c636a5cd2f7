from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Citation(_message.Message):
    __slots__ = ("index", "document_id", "title", "chunk_id", "snippet", "page", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    document_id: str
    title: str
    chunk_id: str
    snippet: str
    page: int
    score: float
    def __init__(self, index: _Optional[int] = ..., document_id: _Optional[str] = ..., title: _Optional[str] = ..., chunk_id: _Optional[str] = ..., snippet: _Optional[str] = ..., page: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...
