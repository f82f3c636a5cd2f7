"""Structured JSON logs: one JSON object per line on stderr, with the request id of the call in flight.

Never log a request body, a token, a password or PHI: log ids, sizes, counts and reasons.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from services.core.context import current_request


class _RequestFields(logging.Filter):
    """Adds request_id and method of the current call to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request()
        if info is not None:
            record.request_id = getattr(record, "request_id", info.request_id)
            if info.method and not hasattr(record, "method"):
                record.method = info.method
        return True


def configure_logging(level: str = "INFO", service: str = "") -> None:
    """Send JSON logs to stderr. Idempotent: replaces handlers installed before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service} if service else None,
        )
    )
    handler.addFilter(_RequestFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO.
    for name in ("httpx", "httpcore", "asyncio", "aiosqlite", "presidio-analyzer"):
        logging.getLogger(name).setLevel(logging.WARNING)
