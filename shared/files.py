"""Files written so that readers see the old content or the new, never a torn one."""
from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path: pathlib.Path, data: bytes, mode: int = 0o644) -> None:
    """Writes a temporary file with its final mode from the start (no window in which a key
    is readable), fsyncs it, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
