"""Alembic environment of the audit schema (run through services.core.db.Database.migrate)."""

from services.audit.store import Base
from services.core.db import run_alembic_env

run_alembic_env(Base.metadata)
