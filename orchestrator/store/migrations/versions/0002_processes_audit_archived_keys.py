"""process instances, tasks in processes, audit events, archived keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Like 0001, plain SQLAlchemy types only.

SQLite cannot ALTER constraints, and batch mode (copy the table, drop, rename) would fail
here: the store's connections run with foreign_keys=ON, so dropping `tasks` while
certificates refer to it is refused. SQLite can, however, ADD a nullable COLUMN with an
inline, named REFERENCES clause; that is what the new tasks.process_instance_id gets there.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.String(36)
NAME = sa.String(200)
TASK_FK = "fk_tasks_process_instance_id_process_instances"


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "process_instances",
        sa.Column("id", ID, nullable=False),
        sa.Column("definition", NAME, nullable=False),
        sa.Column("state", NAME, nullable=False),
        sa.Column("process_map", sa.Text(), nullable=False),
        sa.Column("error_reason", NAME, nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_process_instances"),
    )
    op.create_index("ix_process_instances_definition", "process_instances", ["definition"])
    op.create_index("ix_process_instances_state_created_at", "process_instances", ["state", "created_at"])

    if op.get_context().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE tasks ADD COLUMN process_instance_id VARCHAR(36) "
                   f"CONSTRAINT {TASK_FK} REFERENCES process_instances (id)")
    else:
        op.add_column("tasks", sa.Column("process_instance_id", ID, nullable=True))
        op.create_foreign_key(TASK_FK, "tasks", "process_instances", ["process_instance_id"], ["id"])
    op.add_column("tasks", sa.Column("task_index", sa.Integer(), nullable=True))
    op.create_index("ix_tasks_process_instance_id", "tasks", ["process_instance_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _ts("at"),
        sa.Column("actor", NAME, nullable=False),
        sa.Column("action", NAME, nullable=False),
        sa.Column("object_type", NAME, nullable=False),
        sa.Column("object_id", NAME, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_object_id_id", "audit_events", ["object_id", "id"])

    op.create_table(
        "archived_keys",
        sa.Column("certificate_id", ID, nullable=False),
        sa.Column("kek_id", NAME, nullable=False),
        sa.Column("algorithm", NAME, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"],
                                name="fk_archived_keys_certificate_id_certificates"),
        sa.PrimaryKeyConstraint("certificate_id", name="pk_archived_keys"),
    )


def downgrade() -> None:
    op.drop_table("archived_keys")
    op.drop_table("audit_events")
    op.drop_index("ix_tasks_process_instance_id", table_name="tasks")
    if op.get_context().dialect.name == "sqlite":
        # SQLite refuses to DROP a column that is part of a foreign key: rebuild the table.
        # Dropping the old `tasks` orphans the rows that refer to it (certificates, steps,
        # relations) until the copy is renamed, which SQLite refuses with foreign_keys=ON -
        # even deferred. So downgrade a SQLite store that holds tasks from the alembic
        # command line (env.py's own engine leaves foreign keys off), not via Store.migrate.
        with op.batch_alter_table("tasks", recreate="always") as batch:
            batch.drop_column("task_index")
            batch.drop_column("process_instance_id")
    else:
        op.drop_constraint(TASK_FK, "tasks", type_="foreignkey")
        op.drop_column("tasks", "task_index")
        op.drop_column("tasks", "process_instance_id")
    op.drop_table("process_instances")
