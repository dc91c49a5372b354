"""CA request journal (C16), orchestrator instances, owners of running tasks and processes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

ca_requests: one row per request sent to a CA, committed before the CA is called, keyed by
the idempotency key the CA sees ("task:step:application"); the reconciler settles every row
left `pending`.

orchestrator_instances + tasks.owner / process_instances.owner: which orchestrator runs a
task or a process instance, and when that orchestrator was last seen alive. The reconciler
ends a RUNNING task only when no live run owns it: its own tasks it knows in memory, those
of another replica (scale-out on one PostgreSQL) once that replica has stopped beating.

Plain nullable columns: SQLite adds them with ALTER TABLE ... ADD COLUMN, no batch mode.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.String(36)
NAME = sa.String(200)
REQUEST_ID = sa.String(500)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "ca_requests",
        sa.Column("request_id", REQUEST_ID, nullable=False),
        sa.Column("task_id", ID, nullable=False),
        sa.Column("ca_name", NAME, nullable=False),
        sa.Column("template", NAME, nullable=False),
        sa.Column("csr_der", sa.LargeBinary(), nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("serial_hex", sa.String(64), nullable=True),
        sa.Column("certificate_id", ID, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_ca_requests_task_id_tasks"),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"],
                                name="fk_ca_requests_certificate_id_certificates"),
        sa.PrimaryKeyConstraint("request_id", name="pk_ca_requests"),
    )
    op.create_index("ix_ca_requests_task_id", "ca_requests", ["task_id"])
    op.create_index("ix_ca_requests_state_created_at", "ca_requests", ["state", "created_at"])

    op.create_table(
        "orchestrator_instances",
        sa.Column("id", NAME, nullable=False),
        _ts("started_at"),
        _ts("heartbeat_at"),
        sa.PrimaryKeyConstraint("id", name="pk_orchestrator_instances"),
    )
    op.add_column("tasks", sa.Column("owner", NAME, nullable=True))
    op.add_column("process_instances", sa.Column("owner", NAME, nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 drops a plain column in place (no table rebuild, see 0002's downgrade).
    op.drop_column("process_instances", "owner")
    op.drop_column("tasks", "owner")
    op.drop_table("orchestrator_instances")
    op.drop_index("ix_ca_requests_state_created_at", table_name="ca_requests")
    op.drop_index("ix_ca_requests_task_id", table_name="ca_requests")
    op.drop_table("ca_requests")
