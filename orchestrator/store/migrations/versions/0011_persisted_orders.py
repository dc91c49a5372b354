"""Production orders in the store

Revision ID: 0011_persisted_orders
Revises: 0010_replica_pool
Create Date: 2026-11-29

orders: a production order, its reader selector, its state (RUNNING, DONE, CANCELLED), the
orchestrator replica that runs it (owner) and how often it was claimed (generation: a
replica adopts the RUNNING order of a replica whose heartbeat lapsed with one conditional
UPDATE), and the card each reader gave it (had: an order never puts two people on one card).

order_cards: each card of an order: state, queue position, gateway and reader, its process
instance and attempt, its error, its non-secret inputs (JSON) and its secret inputs sealed
under the key-encryption key (never stored plain). Empty after the upgrade: orders from
before it lived in memory only.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_persisted_orders"
down_revision = "0010_replica_pool"
branch_labels = None
depends_on = None

ID = sa.String(36)
NAME = sa.String(200)


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", ID, nullable=False),
        sa.Column("process", NAME, nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("owner", NAME, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("had", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
    )
    op.create_index("ix_orders_state_owner", "orders", ["state", "owner"])
    op.create_index(op.f("ix_orders_created_at"), "orders", ["created_at"])
    op.create_table(
        "order_cards",
        sa.Column("order_id", ID, nullable=False),
        sa.Column("card_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("queue_position", sa.Integer(), nullable=False),
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        sa.Column("process_instance_id", ID, nullable=False),
        sa.Column("error_reason", NAME, nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("kek_id", NAME, nullable=True),
        sa.Column("sealed_secrets", sa.LargeBinary(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("fk_order_cards_order_id_orders"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("order_id", "card_index", name=op.f("pk_order_cards")),
    )
    op.create_index("ix_order_cards_state", "order_cards", ["state"])


def downgrade() -> None:
    op.drop_index("ix_order_cards_state", table_name="order_cards")
    op.drop_table("order_cards")
    op.drop_index(op.f("ix_orders_created_at"), table_name="orders")
    op.drop_index("ix_orders_state_owner", table_name="orders")
    op.drop_table("orders")
