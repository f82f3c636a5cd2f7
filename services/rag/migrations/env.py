"""Alembic environment of the rag schema (run through services.core.db.Database.migrate)."""

from services.core.db import run_alembic_env
from services.rag.store import Base

run_alembic_env(Base.metadata)
