"""CoreObjectDescriptor: what processes pass around to name a stored object.

Pure domain code.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CoreObjectDescriptor:
    """Identifies a stored object (docs/rules.md, Words); what processes pass around."""
    type: str        # "Certificate", "Card", ... (orchestrator.store.records names them)
    template: str    # the certificate or card template the object was made from
    id: str          # the store id

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "template": self.template, "id": self.id}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CoreObjectDescriptor:
        if not isinstance(data, Mapping) or set(data) != {"type", "template", "id"}:
            raise ValueError(f"a CoreObjectDescriptor is a dict with exactly type, template and id, not {data!r}")
        values = [v for v in (data["type"], data["template"], data["id"]) if isinstance(v, str) and v]
        if len(values) != 3:
            raise ValueError(f"type, template and id of a CoreObjectDescriptor must be non-empty strings: {data!r}")
        return cls(*values)



def describe_value(value: object) -> str:
    """What a process variable holds, for messages ("a Certificate descriptor", "a dict")."""
    if isinstance(value, CoreObjectDescriptor):
        return f"a {value.type} descriptor"
    return f"a {type(value).__name__}"
