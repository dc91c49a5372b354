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
      - name: local                       # the embedded CA itself, its key on a PKCS#11 token
        kind: local                       # (directory optional: <data_dir>/ca)
        pkcs11:
          module: /usr/lib/softhsm/libsofthsm2.so
          token_label: cardline-ca
          pin_file: /run/secrets/ca-token-pin        # relative paths are taken from data_dir
          key_label: cardline-ca                     # optional
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

from orchestrator.ca.base import CaConnector
from orchestrator.ca.local import LocalCa, Pkcs11KeyRef
from orchestrator.ca.openssl import OpenSslCa
from shared.errors import ConfigurationError

LOCAL_CA_NAME = "local"

_KEYS = {
    "openssl": {"name", "kind", "directory", "passphrase_file", "openssl", "subject", "tag_requests",
                "hold_instruction", "timeout_s"},
    "local": {"name", "kind", "directory", "passphrase_file", "pkcs11"},
}
_PKCS11_REQUIRED = ("module", "token_label", "pin_file")
_PKCS11_KEYS = {*_PKCS11_REQUIRED, "key_label"}


def _check_pkcs11(where: str, entry: dict[str, Any], problems: list[str],
                  keys: dict[str, str]) -> None:
    """Problems of a LocalCa entry's pkcs11 mapping; keys: module/token/key label -> first CA using it."""
    options = entry["pkcs11"]
    if not isinstance(options, dict):
        problems.append(f"{where}: pkcs11 must be a mapping with {', '.join(_PKCS11_REQUIRED)} "
                        f"(and optionally key_label), got {options!r}")
        return
    missing = [k for k in _PKCS11_REQUIRED
               if not isinstance(options.get(k), (str, os.PathLike)) or not str(options[k]).strip()]
    if missing:
        problems.append(f"{where}: pkcs11 needs {', '.join(missing)}")
    unknown = sorted(set(options) - _PKCS11_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown} in pkcs11; allowed: {', '.join(sorted(_PKCS11_KEYS))}")
    if "key_label" in options and (not isinstance(options["key_label"], str) or not options["key_label"].strip()):
        problems.append(f"{where}: pkcs11 key_label must be a non-empty string")
    if "passphrase_file" in entry:
        problems.append(f"{where}: passphrase_file and pkcs11 exclude each other (a key on a token has "
                        "no passphrase)")
    # CAs may share a module and a token (one owner per module in the process), not a key.
    key = (options.get("module"), options.get("token_label"), options.get("key_label", "cardline-ca"))
    if all(isinstance(part, str) and part.strip() for part in key):
        name = "/".join(str(part) for part in key)
        if name in keys:
            problems.append(f"{where}: the key {key[2]!r} on PKCS#11 token {key[1]!r} is used by two CAs "
                            f"({keys[name]} too); give each CA a key_label of its own")
        else:
            keys[name] = where


def build_cas(settings_cas: list[dict[str, Any]] | None,
              data_dir: str | os.PathLike[str]) -> dict[str, CaConnector]:
    """Opens (creating on first use) every configured CA plus the local CA "local".

    Every mistake in settings_cas is reported at once in one ConfigurationError, before any
    CA directory is touched. CaUnavailable from a connector (openssl missing, a directory
    that cannot be read) is passed on unchanged.
    """
    data_dir = pathlib.Path(data_dir)
    local_entry, planned = plan_cas(settings_cas)
    cas: dict[str, CaConnector] = {}
    try:
        cas[LOCAL_CA_NAME] = _local_ca(LOCAL_CA_NAME, {"directory": "ca", **local_entry}, data_dir)
        for name, kind, entry in planned:
            if kind == "local":
                cas[name] = _local_ca(name, entry, data_dir)
                continue
            directory = data_dir / pathlib.Path(entry["directory"])     # absolute paths stay absolute
            options = {k: entry[k] for k in ("openssl", "subject", "tag_requests", "hold_instruction", "timeout_s")
                       if k in entry}
            cas[name] = OpenSslCa(directory, name, passphrase_file=entry.get("passphrase_file"), **options)
    except BaseException:
        # A CA with its key on a token holds the module: release it when a later CA fails.
        for ca in cas.values():
            close = getattr(ca, "close", None)
            if callable(close):
                close()
        raise
    return cas


def ca_names(settings_cas: list[dict[str, Any]] | None) -> tuple[str, ...]:
    """The names of the configured CAs, "local" first: checked, nothing opened or created."""
    _, planned = plan_cas(settings_cas)
    return (LOCAL_CA_NAME, *(name for name, _, _ in planned))


def plan_cas(settings_cas: list[dict[str, Any]] | None
             ) -> tuple[dict[str, Any], list[tuple[str, str, dict[str, Any]]]]:
    """Checks settings_cas without touching anything: (the local CA's entry, the other CAs
    as (name, kind, entry)); ConfigurationError listing every mistake."""
    problems: list[str] = []
    planned: list[tuple[str, str, dict[str, Any]]] = []
    local_entry: dict[str, Any] = {}
    seen: set[str] = set()
    keys: dict[str, str] = {}
    for number, entry in enumerate(settings_cas or [], 1):
        where = f"cas[{number}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with name, kind and directory, got {entry!r}")
            continue
        name, kind = entry.get("name"), entry.get("kind")
        # The embedded CA "local" may be configured (kind local only, e.g. its key on a token).
        embedded = name == LOCAL_CA_NAME and kind == "local" and LOCAL_CA_NAME not in seen
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: 'name' is missing or empty")
        elif name in seen or (name == LOCAL_CA_NAME and not embedded):
            problems.append(f"{where}: CA name {name!r} is used twice"
                            + (" (the local CA is always called 'local'; an entry with that name "
                               "configures it and must be of kind local)" if name == LOCAL_CA_NAME else ""))
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
        if embedded and "directory" not in entry:
            pass                                # <data_dir>/ca
        elif not isinstance(entry.get("directory"), (str, os.PathLike)) or not str(entry["directory"]).strip():
            problems.append(f"{where}: 'directory' is missing")
        if "tag_requests" in entry and not isinstance(entry["tag_requests"], bool):
            problems.append(f"{where}: tag_requests must be true or false")
        if kind == "local" and "pkcs11" in entry:
            _check_pkcs11(where, entry, problems, keys)
        if embedded:
            local_entry = entry
        elif isinstance(name, str):
            planned.append((name, kind, entry))
    if problems:
        raise ConfigurationError("CA configuration is invalid:\n  " + "\n  ".join(problems),
                                 violations=str(len(problems)))
    return local_entry, planned


def _local_ca(name: str, entry: dict[str, Any], data_dir: pathlib.Path) -> LocalCa:
    directory = data_dir / pathlib.Path(entry["directory"])             # absolute paths stay absolute
    options = entry.get("pkcs11")
    if options is None:
        return LocalCa(directory, name, passphrase_file=entry.get("passphrase_file"))
    ref = Pkcs11KeyRef(module_path=str(options["module"]), token_label=str(options["token_label"]),
                       pin_file=data_dir / pathlib.Path(options["pin_file"]),
                       **({"key_label": options["key_label"]} if "key_label" in options else {}))
    return LocalCa(directory, name, pkcs11=ref)
