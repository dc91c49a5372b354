"""CA connectors: the interface (base.py) and the built-in local CA (local.py)."""
from orchestrator.ca.base import (
    EXTENDED_KEY_USAGES,
    KEY_USAGES,
    REVOCATION_REASONS,
    CaConnector,
    IssueProfile,
    revocation_reason,
)
from orchestrator.ca.local import LocalCa

__all__ = ["EXTENDED_KEY_USAGES", "KEY_USAGES", "REVOCATION_REASONS", "CaConnector", "IssueProfile",
           "LocalCa", "revocation_reason"]
