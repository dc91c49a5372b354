"""The process map: the variables one running process instance carries and stores.

Pure domain code.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, MutableMapping

from orchestrator.domain.processes.descriptor import CoreObjectDescriptor, describe_value
from orchestrator.domain.processes.expressions import VARIABLE_NAME


class SecretInProcessMap(ValueError):
    """Someone tried to store the value of a secret input (a PIN) in the process map."""


def _check_value(name: str, value: object) -> object:
    """Process variables hold JSON scalars, descriptors and lists of those. Plain dicts are
    refused so that every dict in the serialised map is unambiguously a descriptor."""
    if value is None or isinstance(value, (str, bool, int, float, CoreObjectDescriptor)):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_value(name, item) for item in value]
    raise TypeError(f"process variable {name!r} cannot hold {describe_value(value)}: "
                    "use text, numbers, booleans, CoreObjectDescriptors or lists of those")


def _to_json(value: object) -> object:
    if isinstance(value, CoreObjectDescriptor):
        return value.to_dict()
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return value


def _from_json(value: object) -> object:
    if isinstance(value, Mapping):
        return CoreObjectDescriptor.from_dict(value)
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


class ProcessMap(MutableMapping[str, object]):
    """The process variables of one process instance.

    It is stored with the instance, so it refuses the names of the process's secret inputs:
    a PIN passes through a task, it never rests in the store or the logs.
    """

    def __init__(self, values: Mapping[str, object] | None = None, *, secret_names: Collection[str] = ()) -> None:
        self._secret_names = frozenset(secret_names)
        self._values: dict[str, object] = {}
        for name, value in (values or {}).items():
            self[name] = value

    @property
    def secret_names(self) -> frozenset[str]:
        return self._secret_names

    def __setitem__(self, name: str, value: object) -> None:
        if not isinstance(name, str) or not VARIABLE_NAME.match(name):
            raise KeyError(f"{name!r} is not a process variable name (letters, digits and _)")
        if name in self._secret_names:
            raise SecretInProcessMap(f"{name!r} is a secret input: it passes through tasks and is never "
                                     "stored in the process map")
        self._values[name] = _check_value(name, value)

    def __getitem__(self, name: str) -> object:
        return self._values[name]

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ProcessMap({self._values!r})"

    def to_dict(self) -> dict[str, object]:
        """JSON-compatible: descriptors become {"type", "template", "id"} dicts, tuples lists."""
        return {name: _to_json(value) for name, value in self._values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, secret_names: Collection[str] = ()) -> ProcessMap:
        return cls({name: _from_json(value) for name, value in data.items()}, secret_names=secret_names)

