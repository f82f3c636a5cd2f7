"""AIP-158 pagination: page sizes with a default and a maximum, and opaque page tokens bound to their query.

A page token carries the keyset cursor (the sort key of the last item returned) plus a fingerprint of the
filters it was made for, so a token replayed with other filters is refused instead of silently skipping rows.
Keyset cursors stay stable while rows are inserted concurrently.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime
from typing import Any

from services.core.errors import Reason, ServiceError, invalid
from services.core.limits import Page


def page_size(requested: int, page: Page, field: str = "page_size") -> int:
    """`requested`, or the page's default when 0, lowered to its maximum; negative sizes are a client error."""
    if requested < 0:
        raise invalid(field, "must not be negative")
    return min(requested or page.default, page.maximum)


def _fingerprint(query: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_page_token(cursor: list[Any], query: dict[str, Any]) -> str:
    """An opaque token for the page after `cursor`, valid only with the same `query`."""
    payload = json.dumps({"c": cursor, "q": _fingerprint(query)}, separators=(",", ":"), default=str)
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, query: dict[str, Any], field: str = "page_token") -> list[Any] | None:
    """The cursor in `token` (None for the first page); INVALID_PAGE_TOKEN when it is corrupt or from another
    query."""
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor, fingerprint = payload["c"], payload["q"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ServiceError(Reason.INVALID_PAGE_TOKEN, f"{field} is not a token this API issued") from None
    if fingerprint != _fingerprint(query) or not isinstance(cursor, list):
        raise ServiceError(Reason.INVALID_PAGE_TOKEN, f"{field} was issued for a different query")
    return cursor


def encode_time_cursor(moment: datetime, ident: str, query: dict[str, Any]) -> str:
    """A page token after the row sorted by (`moment`, `ident`): the keyset of most list methods."""
    return encode_page_token([moment.isoformat(), ident], query)


def decode_time_cursor(token: str, query: dict[str, Any], field: str = "page_token") -> tuple[datetime, str] | None:
    """The (moment, id) keyset in a token from `encode_time_cursor`; None for the first page."""
    cursor = decode_page_token(token, query, field)
    if cursor is None:
        return None
    try:
        return datetime.fromisoformat(cursor[0]), str(cursor[1])
    except (ValueError, IndexError, TypeError):
        raise ServiceError(Reason.INVALID_PAGE_TOKEN, f"{field} is not a token this API issued") from None
