"""Alembic environment of the auth schema (run through services.core.db.Database.migrate)."""

from services.auth.store import Base
from services.core.db import run_alembic_env

run_alembic_env(Base.metadata)
