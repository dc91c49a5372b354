"""Alembic environment of the cardline store.

Store.migrate() hands over its own connection in config.attributes["connection"], so the
SQLite settings of the store's engine (foreign keys, WAL, BEGIN handling) apply to
migrations too. Run from the alembic command line, sqlalchemy.url of the Config is used.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from orchestrator.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _configure_and_run(conn)
else:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("the alembic configuration gives no sqlalchemy.url and no connection")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
            conn.commit()
    finally:
        engine.dispose()
