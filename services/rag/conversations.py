"""Conversations: create, read, list, change and delete a caller's conversations and read their messages.

A conversation belongs to the account that created it; for anyone else it does not exist (NOT_FOUND, never
PERMISSION_DENIED, so ids cannot be probed). Titles are never derived from questions, which may hold PHI.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass

from services.core.audit_client import AuditClient
from services.core.context import Caller
from services.core.errors import Reason, ServiceError, invalid, not_found
from services.core.limits import RAG
from services.core.pagination import (
    decode_page_token,
    decode_time_cursor,
    encode_page_token,
    encode_time_cursor,
    page_size,
)
from services.rag.prompts import AnswerStyle
from services.rag.store import ConversationRow, MessageRow, RagStore

DEFAULT_TITLE = "New conversation"
UPDATABLE = frozenset(
    {"title", "archived", "settings", "settings.system_prompt", "settings.answer_style", "settings.specialty"}
)


@dataclass(frozen=True)
class ConversationSettings:
    """Answer settings of a conversation; `answer_style` None means the service default."""

    system_prompt: str = ""
    answer_style: AnswerStyle | None = None
    specialty: str = ""


def clean_text(value: str, field: str, limit: int, *, single_line: bool = False) -> str:
    """`value` without control characters (newlines kept unless `single_line`), trimmed, at most `limit`."""
    keep = "" if single_line else "\n\t"
    value = unicodedata.normalize("NFC", value)
    value = "".join(ch for ch in value if ch in keep or unicodedata.category(ch)[0] != "C").strip()
    if len(value) > limit:
        raise invalid(field, f"at most {limit} characters", "TOO_LONG")
    return value


def clean_specialty(value: str, field: str) -> str:
    """A specialty as the knowledge base stores it: lower case, one line."""
    return clean_text(value, field, RAG.specialty_chars, single_line=True).lower()


def settings_of(row: ConversationRow) -> ConversationSettings:
    """The settings stored on a conversation row."""
    style = AnswerStyle(row.answer_style) if row.answer_style else None
    return ConversationSettings(row.system_prompt, style, row.specialty)


def _settings_columns(settings: ConversationSettings, paths: set[str]) -> dict[str, object]:
    whole = "settings" in paths
    columns: dict[str, object] = {}
    if whole or "settings.system_prompt" in paths:
        columns["system_prompt"] = clean_text(settings.system_prompt, "settings.system_prompt", RAG.system_prompt_chars)
    if whole or "settings.answer_style" in paths:
        columns["answer_style"] = settings.answer_style.value if settings.answer_style else ""
    if whole or "settings.specialty" in paths:
        columns["specialty"] = clean_specialty(settings.specialty, "settings.specialty")
    return columns


def require_id(value: str, field: str) -> str:
    """A conversation id: required; anything that is not a UUID cannot exist (NOT_FOUND, like someone else's)."""
    if not value:
        raise invalid(field, "required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise not_found("conversation", value[:64]) from None


class Conversations:
    """The conversation use cases."""

    def __init__(self, store: RagStore, audit: AuditClient) -> None:
        self._store = store
        self._audit = audit

    async def create(self, caller: Caller, title: str, settings: ConversationSettings) -> ConversationRow:
        """Start a conversation for `caller`."""
        row = ConversationRow(
            owner_id=caller.user_id,
            title=clean_text(title, "title", RAG.title_chars, single_line=True) or DEFAULT_TITLE,
            archived=False,
            message_count=0,
            **_settings_columns(settings, {"settings"}),
        )
        await self._store.create_conversation(row)
        await self._audit.record("rag.conversation.create", resource_type="conversation", resource_id=row.id)
        return row

    async def get(self, caller: Caller, conversation_id: str, field: str = "conversation_id") -> ConversationRow:
        """The caller's conversation; NOT_FOUND when it does not exist or is someone else's."""
        conversation_id = require_id(conversation_id, field)
        row = await self._store.conversation(conversation_id, caller.user_id)
        if row is None:
            raise not_found("conversation", conversation_id)
        return row

    async def list_page(
        self, caller: Caller, size: int, token: str, include_archived: bool
    ) -> tuple[list[ConversationRow], str]:
        """One page of the caller's conversations, most recently updated first, and the next page token."""
        limit = page_size(size, RAG.list_conversations)
        query = {"owner": caller.user_id, "archived": include_archived}
        after = decode_time_cursor(token, query)
        page = await self._store.list_conversations(caller.user_id, limit, after, include_archived)
        last = page.rows[-1] if page.has_more and page.rows else None
        return page.rows, encode_time_cursor(last.updated_at, last.id, query) if last else ""

    async def update(
        self,
        caller: Caller,
        conversation_id: str,
        paths: set[str],
        *,
        title: str,
        archived: bool,
        settings: ConversationSettings,
    ) -> ConversationRow:
        """Change the fields named in `paths` (an update mask)."""
        conversation_id = require_id(conversation_id, "conversation.id")
        if not paths:
            raise invalid("update_mask", "name the fields to change: title, archived, settings")
        unknown = paths - UPDATABLE
        if unknown:
            raise invalid("update_mask", f"cannot change {', '.join(sorted(unknown))}")
        values: dict[str, object] = _settings_columns(settings, paths)
        if "title" in paths:
            title = clean_text(title, "conversation.title", RAG.title_chars, single_line=True)
            values["title"] = title or DEFAULT_TITLE
        if "archived" in paths:
            values["archived"] = archived
        row = await self._store.update_conversation(conversation_id, caller.user_id, **values)
        if row is None:
            raise not_found("conversation", conversation_id)
        await self._audit.record(
            "rag.conversation.update", resource_type="conversation", resource_id=row.id,
            metadata={"fields": ",".join(sorted(paths))},
        )  # fmt: skip
        return row

    async def delete(self, caller: Caller, conversation_id: str) -> None:
        """Delete a conversation and its messages."""
        conversation_id = require_id(conversation_id, "conversation_id")
        if not await self._store.delete_conversation(conversation_id, caller.user_id):
            raise not_found("conversation", conversation_id)
        await self._audit.record("rag.conversation.delete", resource_type="conversation", resource_id=conversation_id)

    async def messages(
        self, caller: Caller, conversation_id: str, size: int, token: str
    ) -> tuple[list[MessageRow], str]:
        """One page of a conversation's messages, most recent first, and the next page token."""
        row = await self.get(caller, conversation_id)
        limit = page_size(size, RAG.list_messages)
        query = {"conversation": row.id}
        cursor = decode_page_token(token, query)
        before = None
        if cursor is not None:
            if not cursor or not isinstance(cursor[0], int):
                raise ServiceError(Reason.INVALID_PAGE_TOKEN, "page_token is not a token this API issued")
            before = cursor[0]
        page = await self._store.list_messages(row.id, limit, before)
        last = page.rows[-1] if page.has_more and page.rows else None
        return page.rows, encode_page_token([last.seq], query) if last else ""
