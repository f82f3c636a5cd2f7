"""The bounds of every service's contract, in one place: field lengths, list sizes and page sizes.

Each service enforces its own bounds, reading them from here; a caller that must fit its request inside another
service's bounds (rag cutting the question it sends to search) reads the owner's value from here too, and never
re-checks a request the owner will check itself: it passes the owner's error on. The protos state these numbers
in prose; tests/unit/test_limits.py checks that they agree. Bounds an operator may tune are settings whose
defaults come from here (voice's audio chunk, search's upload sizes, rag's PHI text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

KB = 1024
MIB = 1024 * 1024
MB = 1000 * 1000


@dataclass(frozen=True)
class Page:
    """AIP-158 page size of a list method: `default` when the client sends 0, larger values lowered to `maximum`."""

    default: int
    maximum: int


@dataclass(frozen=True)
class AuthLimits:
    """auth.v1: accounts and passwords."""

    email_chars: int = 254  # RFC 5321's longest forward path
    full_name_chars: int = 200
    password_min_chars: int = 12  # NIST SP 800-63B-4
    password_max_chars: int = 128
    strength_examined_chars: int = 1024  # CheckPasswordStrength scores this much of a longer candidate
    list_users: Page = Page(50, 1000)


@dataclass(frozen=True)
class AuditLimits:
    """audit.v1: events (their metadata checked by every producer and again by the ledger) and queries."""

    event_text_chars: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({
            "actor.id": 128, "actor.email": 254, "actor.role": 16, "action": 128, "resource.type": 64,
            "resource.id": 256, "failure_reason": 64, "request_id": 128, "client_ip": 64, "user_agent": 512,
            "service": 32, "method": 256,
        })
    )  # fmt: skip
    metadata_entries: int = 32
    metadata_key_chars: int = 64
    metadata_value_chars: int = 1024
    filter_chars: int = 256  # each text filter of ListEvents
    list_events: Page = Page(50, 1000)


@dataclass(frozen=True)
class SearchLimits:
    """search.v1: documents, their metadata and queries."""

    query_chars: int = 2000
    results: Page = Page(10, 50)  # results per Search page
    paging_depth: int = 250  # Search pages stop this many results deep
    filter_documents: int = 100
    filter_tags: int = 32
    title_chars: int = 500
    file_name_chars: int = 255
    tags: int = 32
    label_chars: int = 64  # a specialty, source type or tag
    upload_piece_bytes: int = MIB  # one UploadDocument message
    upload_bytes: int = 50 * MB  # default of SEARCH_MAX_UPLOAD_BYTES
    create_bytes: int = 5 * MB  # default of SEARCH_MAX_CREATE_BYTES
    list_documents: Page = Page(50, 1000)


@dataclass(frozen=True)
class RagLimits:
    """rag.v1: questions, clinical context, conversations."""

    question_chars: int = 4000
    client_message_id_chars: int = 128
    context_items: int = 50  # medications, conditions and allergies, each
    context_item_chars: int = 200
    context_notes_chars: int = 2000
    context_sex_chars: int = 32
    context_max_age: int = 150
    title_chars: int = 200
    system_prompt_chars: int = 2000
    specialty_chars: int = 64
    phi_text_chars: int = 20_000  # default of RAG_PHI_MAX_CHARS (DetectPhi)
    list_conversations: Page = Page(20, 100)
    list_messages: Page = Page(50, 200)


@dataclass(frozen=True)
class VoiceLimits:
    """voice.v1: streams, synthesis and voices. Converse's text turns and clinical context are rag's to bound."""

    audio_chunk_bytes: int = 32 * KB  # default of VOICE_MAX_CHUNK_BYTES
    phrase_hints: int = 500
    phrase_hint_chars: int = 100
    synthesis_text_chars: int = 5000
    language_tag_chars: int = 35  # RFC 5646's longest useful tag
    list_voices: Page = Page(50, 500)


AUTH = AuthLimits()
AUDIT = AuditLimits()
SEARCH = SearchLimits()
RAG = RagLimits()
VOICE = VoiceLimits()
