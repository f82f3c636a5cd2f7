"""The protos state each contract's bounds in prose; the numbers must be the ones in services/core/limits.py, which
the services enforce. Comments are read from the descriptor set (it keeps source info, and a test elsewhere keeps it
fresh), found by message and field name, or service and method name, wherever the proto file lives."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import fields
from functools import cache

import pytest
from google.protobuf import descriptor_pb2

from services.core import limits
from services.core.limits import Page
from services.core.settings import ROOT

N = r"([\d,]+)"  # a number as the protos write it: 1,000
SERVICES = ("AUTH", "AUDIT", "SEARCH", "RAG", "VOICE")

# element ("Message.field", "Message" or "Service.Method"), the prose with a group per number, and the limits it
# states, by name ("SEARCH.create_bytes/MB": in megabytes).
STATED: list[tuple[str, str, tuple[str, ...]]] = [
    ("RegisterRequest.email", rf"at most {N} characters", ("AUTH.email_chars",)),
    ("RegisterRequest.password", rf"{N} to {N} characters", ("AUTH.password_min_chars", "AUTH.password_max_chars")),
    ("RegisterRequest.full_name", rf"at most {N} characters", ("AUTH.full_name_chars",)),
    ("CheckPasswordStrengthRequest.password", rf"at most {N} characters are examined",
     ("AUTH.strength_examined_chars",)),
    ("Event.metadata", rf"at most {N} entries of {N} characters, keys at most {N} characters",
     ("AUDIT.metadata_entries", "AUDIT.metadata_value_chars", "AUDIT.metadata_key_chars")),
    ("EventFilter", rf"Text fields hold at most {N} characters", ("AUDIT.filter_chars",)),
    ("SearchService.UploadDocument", rf"at most {N} MiB each; {N} MB in all by default",
     ("SEARCH.upload_piece_bytes/MIB", "SEARCH.upload_bytes/MB")),
    ("UploadDocumentRequest.chunk", rf"at most {N} MiB", ("SEARCH.upload_piece_bytes/MIB",)),
    ("SearchService.CreateDocument", rf"at most {N} MB", ("SEARCH.create_bytes/MB",)),
    ("DocumentMetadata.title", rf"At most {N} characters", ("SEARCH.title_chars",)),
    ("DocumentMetadata.file_name", rf"at most {N} characters", ("SEARCH.file_name_chars",)),
    ("DocumentMetadata.specialty", rf"at most {N} characters", ("SEARCH.label_chars",)),
    ("DocumentMetadata.tags", rf"at most {N}, each at most {N} characters", ("SEARCH.tags", "SEARCH.label_chars")),
    ("SearchFilters.document_ids", rf"at most {N}", ("SEARCH.filter_documents",)),
    ("SearchFilters.tags", rf"at most {N}", ("SEARCH.filter_tags",)),
    ("SearchRequest.query", rf"1 to {N} characters", ("SEARCH.query_chars",)),
    ("SearchRequest.page_token", rf"at most {N} results deep", ("SEARCH.paging_depth",)),
    ("ClinicalContext.specialty", rf"at most {N} characters", ("RAG.specialty_chars",)),
    ("ClinicalContext.age", rf"0 to {N}", ("RAG.context_max_age",)),
    ("ClinicalContext.sex", rf"at most {N} characters", ("RAG.context_sex_chars",)),
    ("ClinicalContext.medications", rf"at most {N}, each at most {N} characters",
     ("RAG.context_items", "RAG.context_item_chars")),
    ("ClinicalContext.conditions", rf"at most {N}, each at most {N} characters",
     ("RAG.context_items", "RAG.context_item_chars")),
    ("ClinicalContext.allergies", rf"at most {N}, each at most {N} characters",
     ("RAG.context_items", "RAG.context_item_chars")),
    ("ClinicalContext.notes", rf"at most {N} characters", ("RAG.context_notes_chars",)),
    ("ConversationSettings.system_prompt", rf"at most {N} characters", ("RAG.system_prompt_chars",)),
    ("ConversationSettings.specialty", rf"at most {N} characters", ("RAG.specialty_chars",)),
    ("Conversation.title", rf"at most {N} characters", ("RAG.title_chars",)),
    ("CreateConversationRequest.title", rf"at most {N} characters", ("RAG.title_chars",)),
    ("AskRequest.query", rf"1 to {N} characters", ("RAG.question_chars",)),
    ("AskRequest.client_message_id", rf"at most {N} printable characters", ("RAG.client_message_id_chars",)),
    ("StreamAskRequest.query", rf"1 to {N} characters", ("RAG.question_chars",)),
    ("StreamAskRequest.client_message_id", rf"at most {N} printable characters", ("RAG.client_message_id_chars",)),
    ("DetectPhiRequest.text", rf"at most {N} characters", ("RAG.phi_text_chars",)),
    ("ConverseRequest.text", rf"Its bounds are rag's \(1 to {N} characters\)", ("RAG.question_chars",)),
    ("RecognitionConfig.phrase_hints", rf"at most {N}, each at most {N} characters",
     ("VOICE.phrase_hints", "VOICE.phrase_hint_chars")),
    ("ConverseRequest.audio_content", rf"at most {N} KB", ("VOICE.audio_chunk_bytes/KB",)),
    ("TranscribeRequest.audio_content", rf"at most {N} KB", ("VOICE.audio_chunk_bytes/KB",)),
    ("SynthesizeRequest.text", rf"1 to {N} characters", ("VOICE.synthesis_text_chars",)),
    ("ListVoicesRequest.language_code", rf"at most {N} characters", ("VOICE.language_tag_chars",)),
]  # fmt: skip

# Every list method's page size, stated as "default D, at most M".
PAGES: list[tuple[str, str]] = [
    ("ListUsersRequest.page_size", "AUTH.list_users"),
    ("ListEventsRequest.page_size", "AUDIT.list_events"),
    ("ListDocumentsRequest.page_size", "SEARCH.list_documents"),
    ("SearchRequest.page_size", "SEARCH.results"),
    ("ListConversationsRequest.page_size", "RAG.list_conversations"),
    ("ListMessagesRequest.page_size", "RAG.list_messages"),
    ("ListVoicesRequest.page_size", "VOICE.list_voices"),
]

# Bounds the protos do not spell out, and why.
UNSTATED = {
    "AUDIT.event_text_chars",  # a table over twelve Event fields that only services (producers) fill in
}


def limit(name: str) -> float | Page:
    """The limit called `name`, e.g. "RAG.question_chars", or "SEARCH.create_bytes/MB" in megabytes."""
    path, _, unit = name.partition("/")
    service, attribute = path.split(".")
    value = getattr(getattr(limits, service), attribute)
    return value / getattr(limits, unit) if unit else value


def _elements(
    message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], text: dict[tuple[int, ...], str]
) -> Iterator[tuple[str, str]]:
    yield message.name, text.get(path, "")
    for i, field in enumerate(message.field):  # descriptor paths: 2 = field, 3 = nested message
        yield f"{message.name}.{field.name}", text.get((*path, 2, i), "")
    for i, nested in enumerate(message.nested_type):
        yield from _elements(nested, (*path, 3, i), text)


@cache
def comments() -> dict[str, list[str]]:
    """The leading comments of every message, message field and service method of our protos, by "Message",
    "Message.field" (nested messages by their own name) and "Service.Method"; more than one when names repeat
    across packages."""
    files = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "voiceassist.binpb").read_bytes())
    found: dict[str, list[str]] = {}
    for file in files.file:
        if not file.package.startswith("voiceassist."):
            continue
        text = {tuple(loc.path): " ".join(loc.leading_comments.split()) for loc in file.source_code_info.location}
        for i, message in enumerate(file.message_type):  # 4 = message, 6 = service
            for name, comment in _elements(message, (4, i), text):
                found.setdefault(name, []).append(comment)
        for s, service in enumerate(file.service):
            for m, method in enumerate(service.method):
                found.setdefault(f"{service.name}.{method.name}", []).append(text.get((6, s, 2, m), ""))
    return found


def stated_numbers(element: str, pattern: str) -> tuple[float, ...]:
    """The numbers the comment of `element` states in `pattern`."""
    found = comments().get(element, [])
    assert len(found) == 1, f"{element} is in the protos {len(found)} times, not once"
    comment = found[0]
    match = re.search(pattern, comment)
    assert match, f"{element}: {comment!r} does not say {pattern!r}"
    return tuple(float(number.replace(",", "")) for number in match.groups())


@pytest.mark.parametrize(("element", "pattern", "names"), STATED, ids=[s[0] for s in STATED])
def test_the_protos_state_the_bounds_the_services_enforce(element: str, pattern: str, names: tuple[str, ...]) -> None:
    assert stated_numbers(element, pattern) == tuple(limit(name) for name in names)


@pytest.mark.parametrize(("element", "name"), PAGES, ids=[p[0] for p in PAGES])
def test_the_protos_state_every_page_size(element: str, name: str) -> None:
    page = limit(name)
    assert isinstance(page, Page)
    assert stated_numbers(element, rf"default {N}, at most {N}") == (page.default, page.maximum)


def test_every_list_method_has_its_page_size_here() -> None:
    paged = {name for name in comments() if name.endswith(".page_size")}
    assert paged == {element for element, _ in PAGES}


def test_every_limit_is_stated_in_the_protos() -> None:
    every = {f"{service}.{f.name}" for service in SERVICES for f in fields(getattr(limits, service))}
    stated = {name.partition("/")[0] for _, _, names in STATED for name in names} | {name for _, name in PAGES}
    assert every - stated == UNSTATED
