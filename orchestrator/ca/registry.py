"""The CAs an orchestrator knows, by the name certificate templates use (docs/ca-connectors.md).

The built-in local CA "local" is always there (directory <data_dir>/ca). Further CAs come
from the orchestrator settings as a list of mappings, e.g. in YAML:

    cas:
      - name: departmental
        kind: openssl                     # OpenSslCa: a real `openssl ca` directory
        directory: /srv/ca/departmental   # relative paths are taken from data_dir
        passphrase_file: /run/secrets/departmental-ca   # optional
        openssl: /usr/bin/openssl         # optional
        subject: "CN=Departmental CA,O=Example"          # optional, used when the CA is created
        tag_requests: true                # optional, see OpenSslCa
        hold_instruction: holdInstructionReject          # optional
      - name: second-local
        kind: local                       # another LocalCa in its own directory
        directory: ca-second
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

from orchestrator.ca.base import CaConnector
from orchestrator.ca.local import LocalCa
from orchestrator.ca.openssl import OpenSslCa
from shared.errors import ConfigurationError

LOCAL_CA_NAME = "local"

_KEYS = {
    "openssl": {"name", "kind", "directory", "passphrase_file", "openssl", "subject", "tag_requests",
                "hold_instruction", "timeout_s"},
    "local": {"name", "kind", "directory", "passphrase_file"},
}


def build_cas(settings_cas: list[dict[str, Any]] | None,
              data_dir: str | os.PathLike[str]) -> dict[str, CaConnector]:
    """Opens (creating on first use) every configured CA plus the local CA "local".

    Every mistake in settings_cas is reported at once in one ConfigurationError, before any
    CA directory is touched. CaUnavailable from a connector (openssl missing, a directory
    that cannot be read) is passed on unchanged.
    """
    data_dir = pathlib.Path(data_dir)
    problems: list[str] = []
    planned: list[tuple[str, str, dict[str, Any]]] = []
    seen = {LOCAL_CA_NAME}
    for number, entry in enumerate(settings_cas or [], 1):
        where = f"cas[{number}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with name, kind and directory, got {entry!r}")
            continue
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: 'name' is missing or empty")
        elif name in seen:
            problems.append(f"{where}: CA name {name!r} is used twice"
                            + (" (the local CA is always called 'local')" if name == LOCAL_CA_NAME else ""))
        else:
            seen.add(name)
            where = f"cas[{number}] ({name})"
        if kind not in _KEYS:
            problems.append(f"{where}: kind {kind!r} is unknown; known kinds: {', '.join(sorted(_KEYS))}")
            continue
        unknown = sorted(set(entry) - _KEYS[kind])
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown} for kind {kind}; "
                            f"allowed: {', '.join(sorted(_KEYS[kind]))}")
        if not isinstance(entry.get("directory"), (str, os.PathLike)) or not str(entry["directory"]).strip():
            problems.append(f"{where}: 'directory' is missing")
        if "tag_requests" in entry and not isinstance(entry["tag_requests"], bool):
            problems.append(f"{where}: tag_requests must be true or false")
        if isinstance(name, str):
            planned.append((name, kind, entry))
    if problems:
        raise ConfigurationError("CA configuration is invalid:\n  " + "\n  ".join(problems),
                                 violations=str(len(problems)))

    local = LocalCa(data_dir / "ca", LOCAL_CA_NAME)
    cas: dict[str, CaConnector] = {local.name: local}
    for name, kind, entry in planned:
        directory = data_dir / pathlib.Path(entry["directory"])     # absolute paths stay absolute
        passphrase_file = entry.get("passphrase_file")
        if kind == "local":
            cas[name] = LocalCa(directory, name, passphrase_file=passphrase_file)
            continue
        options = {k: entry[k] for k in ("openssl", "subject", "tag_requests", "hold_instruction", "timeout_s")
                   if k in entry}
        cas[name] = OpenSslCa(directory, name, passphrase_file=passphrase_file, **options)
    return cas
