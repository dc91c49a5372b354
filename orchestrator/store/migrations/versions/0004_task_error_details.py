"""Typed details of a failed task's error

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

tasks.error_details: the error's CardlineError.to_details() as JSON, next to error_reason and
error_message, so that a failed task gives back the same error class with the same typed
attributes (e.g. PinIncorrect.attempts_remaining, UnexpectedStatusWord.responses). Rows of
earlier revisions keep NULL and are rebuilt from reason and message alone.

A plain nullable column: SQLite adds it with ALTER TABLE ... ADD COLUMN, no batch mode.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("error_details", sa.JSON(), nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 drops a plain column in place (see 0003's downgrade).
    op.drop_column("tasks", "error_details")
