"""The ledger, its head, stored Merkle nodes, checkpoints and signing keys; append-only triggers.

Revision ID: 0001
Revises:
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from services.audit.ledger_proofs import ZERO_CHAIN
from services.audit.store import ACTION_TYPE
from services.core.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = ("ledger", "merkle_nodes", "checkpoints", "signing_keys")


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.Column("commit_time_us", sa.BigInteger, nullable=False),
        sa.Column("actor_id", sa.String(128), nullable=False),
        sa.Column("actor_email", sa.String(254), nullable=False),
        sa.Column("actor_role", sa.String(16), nullable=False),
        sa.Column("action", ACTION_TYPE, nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(256), nullable=False),
        sa.Column("outcome", sa.SmallInteger, nullable=False),
        sa.Column("failure_reason", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(512), nullable=False),
        sa.Column("service", sa.String(32), nullable=False),
        sa.Column("method", sa.String(256), nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("appended_by", sa.String(128), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary, nullable=False),
        sa.Column("chain_hash", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_ledger_actor", "ledger", ["actor_id", "sequence"])
    op.create_index("ix_ledger_action", "ledger", ["action", "sequence"])
    op.create_index("ix_ledger_resource", "ledger", ["resource_type", "resource_id", "sequence"])
    op.create_index("ix_ledger_outcome", "ledger", ["outcome", "sequence"])
    op.create_index("ix_ledger_event_time", "ledger", ["event_time_us", "sequence"])
    op.create_index("ix_ledger_request", "ledger", ["request_id"])
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("chain_hash", sa.LargeBinary, nullable=False),
        sa.Column("frontier", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_ledger_head_single_row"),
    )
    op.bulk_insert(
        head, [{"id": 1, "tree_size": 0, "chain_hash": ZERO_CHAIN, "frontier": b"", "updated_at": datetime.now(UTC)}]
    )
    op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("tree_size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.LargeBinary, nullable=False),
        sa.Column("timestamp_us", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(200), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False, unique=True),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              RAISE EXCEPTION 'audit table % is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
            END $$
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_audit_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change()"
            )
    else:
        for table in APPEND_ONLY:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'audit table {table} is append-only: {verb} refused'); END"
                )


def downgrade() -> None:
    for table in ("signing_keys", "checkpoints", "merkle_nodes", "ledger_head", "ledger"):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION refuse_audit_change()")
