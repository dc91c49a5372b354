"""Card holders and card secrets

Revision ID: 0006
Revises: 0005 (client request ids)
Create Date: 2026-11-29

cards.holder: who the card was produced for (the card_production task's `holder`), so cards
can be searched by holder (`cardline cards list --holder`).

card_secrets: each card's own PUK (SO PIN), sealed under the key-encryption key and keyed by
the card's token serial; `unblock-pin` authenticates with it. Never stored plain.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NAME = sa.String(200)


def upgrade() -> None:
    op.add_column("cards", sa.Column("holder", NAME, nullable=True))
    op.create_index("ix_cards_holder", "cards", ["holder"])
    op.create_table(
        "card_secrets",
        sa.Column("token_serial", NAME, nullable=False),
        sa.Column("kek_id", NAME, nullable=False),
        sa.Column("algorithm", NAME, nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_serial", name="pk_card_secrets"),
    )


def downgrade() -> None:
    op.drop_table("card_secrets")
    op.drop_index("ix_cards_holder", table_name="cards")
    op.drop_column("cards", "holder")
