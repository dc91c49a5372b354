"""Client request ids of the RPCs that create something

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

client_requests: (kind, request_id) -> the id of what the first call created, with a
fingerprint of that request. A retried StartProcess, ProduceCard, CreateOrder or
AcquireLease with the same request id finds the first result here instead of starting a
second production.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "client_requests",
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("resource_id", sa.String(200), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "request_id", name=op.f("pk_client_requests")),
    )
    op.create_index(op.f("ix_client_requests_created_at"), "client_requests", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_client_requests_created_at"), table_name="client_requests")
    op.drop_table("client_requests")
