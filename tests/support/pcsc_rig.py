"""Start and stop a private pcscd with the vsmartcard vpcd driver (plain functions).

Used by the pytest plugin tests/support/pcsc.py and by benchmarks. Nothing here touches the
system pcscd: ours runs in its own mount namespace with a folder of ours bind-mounted on
/run/pcscd (pcscd 1.9.9 ignores PCSCLITE_CSOCK_NAME and always listens on
/run/pcscd/pcscd.comm; only the client library honours the variable).

vpcd port scheme: the reader.conf entry gives a base port P (DEVICENAME /dev/null:P,
CHANNELID P); the driver exposes VPCD_SLOTS slots, slot i listening on TCP port P + i, on
all interfaces. Card emulators must only ever connect to 127.0.0.1. Reader names are
"<FRIENDLYNAME> 00 00", "<FRIENDLYNAME> 00 01" (pcscd appends reader and slot numbers).

Only processes started here are stopped, by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VPCD_SLOTS = 2                     # Debian's vpcd build exposes two slots
FRIENDLY_NAME = "Cardline VPCD"


@dataclass
class PcscdHandle:
    pid: int
    workdir: Path
    base_port: int                 # slot i listens on base_port + i
    socket_path: Path              # what PCSCLITE_CSOCK_NAME must point at
    log_path: Path
    process: subprocess.Popen | None = None

    def reader_name(self, slot: int = 0) -> str:
        return f"{FRIENDLY_NAME} 00 {slot:02X}"

    def slot_port(self, slot: int = 0) -> int:
        return self.base_port + slot

    @property
    def env(self) -> dict[str, str]:
        return {"PCSCLITE_CSOCK_NAME": str(self.socket_path)}


def unavailable_reason() -> str | None:
    """Why a private pcscd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private pcscd needs root (unshare -m and mount --bind)"
    for tool in ("unshare", "pcscd", "mount"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed"
    if not Path(VPCD_DRIVER).exists():
        return f"vpcd driver missing ({VPCD_DRIVER}); apt-get install vsmartcard-vpcd"
    return None


def _port_free(port: int) -> bool:
    # vpcd binds on all interfaces, so test the wildcard address.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_base_port(slots: int = VPCD_SLOTS, start: int = 41000, stop: int = 60000) -> int:
    """A base port P such that P .. P+slots-1 are all free (randomised to avoid races)."""
    import random
    candidates = list(range(start, stop, slots))
    random.shuffle(candidates)
    for port in candidates[:500]:
        if all(_port_free(port + i) for i in range(slots)):
            return port
    raise RuntimeError("no free port range for vpcd")


def start_pcscd(workdir: str | os.PathLike, base_port: int, *, debug: bool = False,
                timeout_s: float = 10.0) -> PcscdHandle:
    """Start pcscd -f in a private mount namespace; return when its socket accepts clients."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    w = Path(workdir).resolve()
    run, conf = w / "run", w / "reader.conf.d"
    run.mkdir(parents=True, exist_ok=True)
    conf.mkdir(parents=True, exist_ok=True)
    for stale in run.iterdir():       # a socket left by a killed pcscd would fool the wait
        stale.unlink()
    (conf / "vpcd").write_text(
        f'FRIENDLYNAME "{FRIENDLY_NAME}"\n'
        f"DEVICENAME   /dev/null:{base_port}\n"
        f"LIBPATH      {VPCD_DRIVER}\n"
        f"CHANNELID    {base_port}\n")
    log = w / "pcscd.log"
    flags = "-f -d -a" if debug else "-f"
    # /run/pcscd may not exist on the host: create it inside the namespace only if needed.
    script = (f"mkdir -p /run/pcscd && mount --bind '{run}' /run/pcscd && "
              f"exec pcscd {flags} -c '{conf}'")
    with open(log, "ab") as logf:
        # unshare and sh both exec, so the PID we get is pcscd's own.
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    handle = PcscdHandle(pid=proc.pid, workdir=w, base_port=base_port,
                         socket_path=run / "pcscd.comm", log_path=log, process=proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pcscd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if handle.socket_path.exists() and _socket_accepts(handle.socket_path):
            return handle
        time.sleep(0.02)
    stop_pcscd(handle)
    raise RuntimeError(f"pcscd socket did not appear: {log.read_text()[-2000:]}")


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def wait_vpcd_listening(handle: PcscdHandle, slot: int = 0, timeout_s: float = 5.0) -> None:
    """vpcd opens its TCP port when pcscd loads the driver, just after the socket appears."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _port_free(handle.slot_port(slot)):
            return
        time.sleep(0.02)
    raise RuntimeError(f"vpcd is not listening on port {handle.slot_port(slot)}")


def stop_pcscd(handle: PcscdHandle, timeout_s: float = 5.0) -> None:
    """Stop our pcscd by PID (SIGTERM, then SIGKILL)."""
    proc = handle.process
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        return
    try:
        os.kill(handle.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(handle.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(handle.pid, signal.SIGKILL)


def restart_pcscd(handle: PcscdHandle, *, debug: bool = False) -> PcscdHandle:
    """Stop pcscd and start a new process on the same directory and ports."""
    stop_pcscd(handle)
    return start_pcscd(handle.workdir, handle.base_port, debug=debug)
