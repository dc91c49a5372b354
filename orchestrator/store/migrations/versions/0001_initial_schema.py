"""initial schema: cards, tasks, step journal, certificates, object relations

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Migrations use plain SQLAlchemy types, never the models' classes: a revision must keep
meaning what it meant when it was written. Timestamps are DateTime(timezone=True); the
models' UtcDateTime stores UTC into it.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(36)
NAME = sa.String(200)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "cards",
        sa.Column("id", ID, nullable=False),
        sa.Column("serial", NAME, nullable=False),
        sa.Column("template", NAME, nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_cards"),
    )
    op.create_index("ix_cards_serial", "cards", ["serial"])

    op.create_table(
        "tasks",
        sa.Column("id", ID, nullable=False),
        sa.Column("type", NAME, nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("gateway_id", NAME, nullable=False),
        sa.Column("reader_id", NAME, nullable=False),
        sa.Column("card_id", ID, nullable=True),
        sa.Column("error_reason", NAME, nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("finished_at", nullable=True),
        sa.ForeignKeyConstraint(["card_id"], ["cards.id"], name="fk_tasks_card_id_cards"),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    op.create_index("ix_tasks_card_id", "tasks", ["card_id"])
    op.create_index("ix_tasks_gateway_id", "tasks", ["gateway_id"])
    op.create_index("ix_tasks_state", "tasks", ["state"])

    op.create_table(
        "task_steps",
        sa.Column("task_id", ID, nullable=False),
        sa.Column("step_number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_steps_task_id_tasks"),
        sa.PrimaryKeyConstraint("task_id", "step_number", name="pk_task_steps"),
    )

    op.create_table(
        "certificates",
        sa.Column("id", ID, nullable=False),
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(1000), nullable=False),
        sa.Column("subject", sa.String(1000), nullable=False),
        _ts("not_before"),
        _ts("not_after"),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("template", NAME, nullable=False),
        sa.Column("ca_name", NAME, nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("task_id", ID, nullable=True),
        sa.Column("task_error_reason", NAME, nullable=True),
        sa.Column("task_error_message", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_certificates_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_certificates"),
        sa.UniqueConstraint("issuer", "serial_hex", name="uq_certificates_issuer_serial"),
    )
    op.create_index("ix_certificates_state_created_at", "certificates", ["state", "created_at"])
    op.create_index("ix_certificates_created_at", "certificates", ["created_at"])
    op.create_index("ix_certificates_task_id", "certificates", ["task_id"])
    op.create_index("ix_certificates_template", "certificates", ["template"])

    op.create_table(
        "object_relations",
        sa.Column("id", ID, nullable=False),
        sa.Column("source_type", NAME, nullable=False),
        sa.Column("source_id", ID, nullable=False),
        sa.Column("target_type", NAME, nullable=False),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("relation_type", NAME, nullable=False),
        sa.Column("task_id", ID, nullable=True),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_object_relations_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_object_relations"),
        sa.UniqueConstraint("source_type", "source_id", "target_type", "target_id", "relation_type",
                            name="uq_object_relations_link"),
    )
    op.create_index("ix_object_relations_target", "object_relations", ["target_type", "target_id"])
    op.create_index("ix_object_relations_task_id", "object_relations", ["task_id"])


def downgrade() -> None:
    op.drop_table("object_relations")
    op.drop_table("certificates")
    op.drop_table("task_steps")
    op.drop_table("tasks")
    op.drop_table("cards")
