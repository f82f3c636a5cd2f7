from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ClinicalContext(_message.Message):
    __slots__ = ("specialty", "age", "sex", "medications", "conditions", "allergies", "notes")
    SPECIALTY_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    MEDICATIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    ALLERGIES_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    specialty: str
    age: int
    sex: str
    medications: _containers.RepeatedScalarFieldContainer[str]
    conditions: _containers.RepeatedScalarFieldContainer[str]
    allergies: _containers.RepeatedScalarFieldContainer[str]
    notes: str
    def __init__(self, specialty: _Optional[str] = ..., age: _Optional[int] = ..., sex: _Optional[str] = ..., medications: _Optional[_Iterable[str]] = ..., conditions: _Optional[_Iterable[str]] = ..., allergies: _Optional[_Iterable[str]] = ..., notes: _Optional[str] = ...) -> None: ...
