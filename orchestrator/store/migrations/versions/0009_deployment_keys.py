"""The keys every replica on one database shares

Revision ID: 0009_deployment_keys
Revises: 0008_audit_hash_chain
Create Date: 2026-11-29

deployment_keys: (kind, name) -> the fingerprint the first orchestrator on this database
recorded for that key, when and by whom: kind "ca" for each CA by name (its signing
certificate), kind "kek" for the key-encryption key. An orchestrator whose CA or KEK has
another fingerprint is refused at start-up (docs/ca-connectors.md, "Replicas"). Empty after
the upgrade: the next orchestrator to start records its keys.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_deployment_keys"
down_revision = "0008_audit_hash_chain"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment_keys",
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("fingerprint", sa.String(200), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_seen_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name", name=op.f("pk_deployment_keys")),
    )


def downgrade() -> None:
    op.drop_table("deployment_keys")
