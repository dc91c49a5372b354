"""One reader pool across orchestrator replicas (PostgreSQL)

Revision ID: 0010_replica_pool
Revises: 0009_deployment_keys
Create Date: 2026-11-29

orchestrator_instances.address: where the other replicas reach this one (ReplicaService).
pool_gateways / pool_readers: every gateway linked to a replica and its readers, written by
the replica holding the link (replica_id, link_id: which of its links). pool_holds: who holds
which reader, exclusive across replicas (keyed by gateway + reader). pool_waiters: the one
FIFO queue of requests for a reader (seq: its order; position: as last served), with what
the serve needs of each (selectors, the cards it takes). pool_leases: the leases of other
services, so that any replica answers for them. Used on PostgreSQL only; SQLite keeps the
single-process pool in memory and leaves these tables empty.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_replica_pool"
down_revision = "0009_deployment_keys"
branch_labels = None
depends_on = None

NAME = sa.String(200)
ID = sa.String(36)
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("orchestrator_instances", sa.Column("address", NAME, nullable=True))
    op.create_table(
        "pool_gateways",
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("replica_id", NAME, nullable=False),
        sa.Column("link_id", ID, nullable=False),
        sa.Column("site", NAME, nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("connected_since", WHEN, nullable=False),
        sa.Column("last_seen", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", name=op.f("pk_pool_gateways")),
    )
    op.create_table(
        "pool_readers",
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        sa.Column("reader", sa.JSON(), nullable=False),
        sa.Column("last_used", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", "reader_id", name=op.f("pk_pool_readers")),
    )
    op.create_table(
        "pool_holds",
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        sa.Column("hold_id", ID, nullable=False),
        sa.Column("replica_id", NAME, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("holder", NAME, nullable=False),
        sa.Column("since", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", "reader_id", name=op.f("pk_pool_holds")),
        sa.UniqueConstraint("hold_id", name=op.f("uq_pool_holds_hold_id")),
    )
    op.create_table(
        "pool_waiters",
        sa.Column("waiter_id", ID, nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("replica_id", NAME, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("holder", NAME, nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("takes", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("gateway_id", NAME, nullable=True),
        sa.Column("reader_id", NAME, nullable=True),
        sa.Column("since", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("waiter_id", name=op.f("pk_pool_waiters")),
    )
    op.create_index(op.f("ix_pool_waiters_seq"), "pool_waiters", ["seq"])
    op.create_table(
        "pool_leases",
        sa.Column("lease_id", NAME, nullable=False),
        sa.Column("hold_id", ID, nullable=False),
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        sa.Column("reader", sa.JSON(), nullable=False),
        sa.Column("owner", NAME, nullable=False),
        sa.Column("holder", NAME, nullable=False),
        sa.Column("ttl_s", sa.Float(), nullable=False),
        sa.Column("expires_at", WHEN, nullable=False),
        sa.Column("acquired_at", WHEN, nullable=False),
        sa.Column("auto_steps", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("lease_id", name=op.f("pk_pool_leases")),
    )


def downgrade() -> None:
    op.drop_table("pool_leases")
    op.drop_index(op.f("ix_pool_waiters_seq"), table_name="pool_waiters")
    op.drop_table("pool_waiters")
    op.drop_table("pool_holds")
    op.drop_table("pool_readers")
    op.drop_table("pool_gateways")
    op.drop_column("orchestrator_instances", "address")
