"""Sealed secret inputs of running process instances (C16, takeover)

Revision ID: 0012_process_secrets
Revises: 0011_persisted_orders
Create Date: 2026-11-29

process_secrets: process instance id -> its secret inputs (PINs), sealed under the
key-encryption key (AES-256-GCM, bound to the instance id), while the instance runs: a
replica that takes a dead replica's task over resends its card steps with them. Deleted when
the instance ends. Empty after the upgrade: instances from before it are ended, not resumed.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_process_secrets"
down_revision = "0011_persisted_orders"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "process_secrets",
        sa.Column("process_instance_id", sa.String(36), nullable=False),
        sa.Column("kek_id", sa.String(200), nullable=False),
        sa.Column("algorithm", sa.String(200), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["process_instance_id"], ["process_instances.id"],
                                name=op.f("fk_process_secrets_process_instance_id_process_instances")),
        sa.PrimaryKeyConstraint("process_instance_id", name=op.f("pk_process_secrets")),
    )


def downgrade() -> None:
    op.drop_table("process_secrets")
