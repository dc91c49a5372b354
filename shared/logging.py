"""Logging of both servers: structlog for our own lines, and every stdlib logger (Alembic,
grpc, SQLAlchemy, ...) routed through the same processors by structlog's ProcessorFormatter,
so under --json-logs every line on standard error is one JSON object."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

# Keys whose values are secrets: never printed, whatever code passes them by mistake.
SECRET_KEYS = frozenset({"pin", "user_pin", "puk", "so_pin", "password", "passphrase", "private_key"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if key.lower() in SECRET_KEYS:
            event_dict[key] = "***"
    return event_dict


def configure(json: bool = False, level: str = "INFO") -> None:
    """Both servers call this once at start-up (and again once their settings are read);
    LEVEL applies to our loggers and to the libraries' alike."""
    level = level.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LOG_LEVELS)}")
    if json:
        # gRPC's C core writes to stderr itself, past Python's logging: keep it quiet unless
        # the operator asked for its lines (GRPC_VERBOSITY set explicitly).
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,          # lines of stdlib loggers (Alembic, grpc, ...)
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that bring handlers of their own would print a second, unformatted copy.
    for name in ("alembic", "sqlalchemy", "grpc"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
