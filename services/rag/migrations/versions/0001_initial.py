"""Conversations and messages.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from services.core.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SEQUENCE = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("archived", sa.Boolean, nullable=False),
        sa.Column("system_prompt", sa.Text, nullable=False),
        sa.Column("answer_style", sa.String(16), nullable=False),
        sa.Column("specialty", sa.String(64), nullable=False),
        sa.Column("message_count", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner_id", "updated_at", "id"])
    op.create_table(
        "messages",
        sa.Column("seq", _SEQUENCE, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column(
            "conversation_id", sa.String(36), sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("citations", sa.JSON, nullable=False),
        sa.Column("model_used", sa.String(200), nullable=False),
        sa.Column("phi_detected", sa.Boolean, nullable=False),
        sa.Column("phi_types", sa.JSON, nullable=False),
        sa.Column("client_message_id", sa.String(128), nullable=True),
        sa.Column("routing_reason", sa.String(64), nullable=False),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("answer_lease_until", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_messages_conversation_seq", "messages", ["conversation_id", "seq"])
    op.create_index("uq_messages_client_id", "messages", ["conversation_id", "client_message_id", "role"], unique=True)


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversations")
