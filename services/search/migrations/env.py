"""Alembic environment of the search schema (run through services.core.db.Database.migrate)."""

from services.core.db import run_alembic_env
from services.search.store import Base

run_alembic_env(Base.metadata)
