"""A card object is bound to its physical card

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

cards.identity: the physical card the card object was produced on (`pkcs11:<token serial>`,
docs/lifecycle.md "One card, one live card object"); NULL where the card gives no identifier
and for rows of earlier revisions.
cards.live_identity: the same value while the card object is live (not in a final state of
its card state graph), NULL once it is final or a re-issue took the card over. Unique: two
live card objects of one physical card are refused by the database itself, also when two
orchestrator replicas race.

Plain nullable columns (SQLite adds them with ALTER TABLE ... ADD COLUMN) and a unique
index (NULLs never collide, on SQLite and PostgreSQL alike).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NAME = sa.String(200)


def upgrade() -> None:
    op.add_column("cards", sa.Column("identity", NAME, nullable=True))
    op.add_column("cards", sa.Column("live_identity", NAME, nullable=True))
    op.create_index("ix_cards_identity", "cards", ["identity"])
    op.create_index("ix_cards_live_identity", "cards", ["live_identity"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_cards_live_identity", table_name="cards")
    op.drop_index("ix_cards_identity", table_name="cards")
    op.drop_column("cards", "live_identity")
    op.drop_column("cards", "identity")
