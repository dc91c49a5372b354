"""SoftHSM2's file object store, looked at from outside the module: tokens it cannot read.

SoftHSM2 rewrites `<tokendir>/<uuid>/token.object` in place; a process killed mid-write can
leave it empty, and SoftHSM2 then leaves the token out of its slot list without a word - its
reader would silently drop out of the pool. So the PKCS#11 driver asks this module for token
directories whose object store is missing, empty or unreadable, and reports each as a reader
in error with the reason. (A token directory with a non-empty token.object that the module
does not list is left alone: SoftHSM2 lists tokens created by another process only after it
is initialised again.)
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_CONF = "/etc/softhsm/softhsm2.conf"


@dataclass(frozen=True)
class UnreadableToken:
    serial: str                 # as SoftHSM2 derives it: the last 16 hex digits of the directory's UUID
    directory: pathlib.Path
    reason: str


def is_softhsm2(module_path: str) -> bool:
    return "softhsm2" in pathlib.Path(module_path).name


def _setting(conf: pathlib.Path, key: str) -> str | None:
    for line in conf.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key and not line.lstrip().startswith("#"):
            return value.strip()
    return None


def unreadable_tokens(module_path: str, environ: Mapping[str, str] = os.environ) -> list[UnreadableToken]:
    """Token directories of a SoftHSM2 file store whose token.object cannot be read (empty
    list for other modules, a database store or an unreadable configuration)."""
    if not is_softhsm2(module_path):
        return []
    try:
        conf = pathlib.Path(environ.get("SOFTHSM2_CONF", DEFAULT_CONF))
        tokendir = _setting(conf, "directories.tokendir")
        if tokendir is None or (_setting(conf, "objectstore.backend") or "file") != "file":
            return []
        directories = sorted(p for p in pathlib.Path(tokendir).iterdir() if p.is_dir())
    except OSError:
        return []                 # the module itself reports a store it cannot open
    found = []
    for directory in directories:
        serial = directory.name.replace("-", "")[-16:]
        store = directory / "token.object"
        try:
            size = store.stat().st_size
            with store.open("rb") as f:
                f.read(1)
        except FileNotFoundError:
            reason = f"{store} is missing"
        except OSError as exc:
            reason = f"{store} cannot be read: {exc.strerror}"
        else:
            if size:
                continue
            reason = f"{store} is empty (0 bytes): the token's object store was cut short, e.g. by a " \
                     f"process killed while SoftHSM2 rewrote it; restore it from a backup"
        found.append(UnreadableToken(serial, directory, reason))
    return found
