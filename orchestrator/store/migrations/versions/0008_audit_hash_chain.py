"""The audit trail says where an action applies and is hash-chained

Revision ID: 0008_audit_hash_chain
Revises: 0007
Create Date: 2026-11-29

audit_events gets what an action touched and where (card_id, task_id, gateway_id, reader_id,
step, certificates: a JSON list of {"id", "ca", "serial_hex"}) and the hash chain
(prev_hash, hash; docs/audit.md). Rows of earlier revisions are chained here, in the order
of their ids, with the same canonical content the orchestrator hashes
(orchestrator/domain/audit_chain.py); their new columns stay NULL.

Plain nullable columns (SQLite adds them with ALTER TABLE ... ADD COLUMN).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.domain.audit_chain import CHAINED_FIELDS, GENESIS, canonical, link_hash
from orchestrator.store.models import UtcDateTime

revision = "0008_audit_hash_chain"
down_revision = "0007"
branch_labels = None
depends_on = None

NAME = sa.String(200)
HASH = sa.String(64)
NEW_COLUMNS = (("card_id", NAME), ("task_id", NAME), ("gateway_id", NAME), ("reader_id", NAME),
               ("step", sa.Integer()), ("certificates", sa.Text()), ("prev_hash", HASH), ("hash", HASH))


def upgrade() -> None:
    for name, type_ in NEW_COLUMNS:
        op.add_column("audit_events", sa.Column(name, type_, nullable=True))
    op.create_index("ix_audit_events_card_id", "audit_events", ["card_id"])
    op.create_index("ix_audit_events_task_id", "audit_events", ["task_id"])
    _chain_existing_rows()


def _chain_existing_rows() -> None:
    import json

    events = sa.table("audit_events", sa.column("id", sa.Integer()), sa.column("at", UtcDateTime()),
                      *(sa.column(name, sa.Text()) for name in CHAINED_FIELDS if name not in ("at", "step")),
                      sa.column("step", sa.Integer()), sa.column("prev_hash", HASH), sa.column("hash", HASH))
    conn = op.get_bind()
    prev = GENESIS
    for row in conn.execute(sa.select(events).order_by(events.c.id)).mappings().all():
        values = {name: row[name] for name in CHAINED_FIELDS}
        values["detail"] = json.loads(row["detail"]) if row["detail"] else {}
        values["certificates"] = json.loads(row["certificates"]) if row["certificates"] else []
        digest = link_hash(prev, canonical(values))
        conn.execute(sa.update(events).where(events.c.id == row["id"]).values(prev_hash=prev, hash=digest))
        prev = digest


def downgrade() -> None:
    op.drop_index("ix_audit_events_task_id", table_name="audit_events")
    op.drop_index("ix_audit_events_card_id", table_name="audit_events")
    for name, _ in reversed(NEW_COLUMNS):
        op.drop_column("audit_events", name)
