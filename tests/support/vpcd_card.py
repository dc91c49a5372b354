"""A small ISO 7816-4 card emulator that plugs into the vsmartcard vpcd pcscd driver.

vpcd is the TCP server (one port per slot); the emulator connects to it on 127.0.0.1 and
then answers messages framed as a 2-byte big-endian length + payload. A 1-byte payload is
a control message (0x00 power off, 0x01 power on, 0x02 reset, 0x04 get ATR, which is
answered with the ATR); anything longer is a command APDU, answered with a response APDU.

The card (``IsoCard``):
  * ATR 3B 88 01 "CARDLINE" TCK (T=1 only).
  * SELECT by DF name (00 A4 04 xx) of APP_AID; any other AID -> 6A82. P2=0C: no FCI.
    Selecting the application makes its 4 KiB transparent EF current.
  * READ BINARY (B0) / UPDATE BINARY (D6), offset in P1-P2 (15 bits); short or extended
    Le. UPDATE needs the PIN verified (6982 otherwise). Reading past the end -> 6282.
  * VERIFY (20, P2=81): PIN "123456", 3 tries; wrong -> 63Cx, none left -> 6983;
    no data -> 63Cx (tries left) or 9000 (already verified).
  * GET DATA (CA) P1P2=005A: the 8-byte serial number; Le must be exactly 8, otherwise
    the card answers 6C08 (the T=0 "wrong Le, resend with Le=08" case).
  * GET DATA (CA) P1P2=7F21: a 700-byte certificate-like object, always served through
    61xx + GET RESPONSE (00 C0 00 00 xx), in chunks of at most 256 bytes.
  * unknown INS -> 6D00; CLA other than 00 -> 6E00; inconsistent lengths -> 6700.

``VpcdCard`` runs the TCP side in a background thread: ``insert()`` connects (pcscd sees
the card ~100 ms later), ``remove()`` disconnects (~300 ms later). ``apdu_count`` counts the
command APDUs received; ``drop_after(n)`` makes it close the connection, without answering,
when the (n+1)-th APDU from now arrives (the card pulled mid-script).

Latency: vpcd writes the length and the APDU in two segments with Nagle on, so a receiver
with delayed ACKs stalls ~40 ms per APDU. We set TCP_NODELAY and re-arm TCP_QUICKACK
before every recv() (Linux clears it again by itself).

Standalone, for benchmarks:  python -m tests.support.vpcd_card --port P
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import threading
import time

APP_AID = bytes.fromhex("F0434152444C494E4501")       # F0 = proprietary RID, "CARDLINE", 01
SERIAL = bytes.fromhex("C0FFEE0012345678")
DEFAULT_PIN = b"123456"
PIN_TRIES = 3
EF_SIZE = 4096
BIG_OBJECT = bytes(i * 7 % 251 for i in range(700))


def _atr() -> bytes:
    body = bytes([0x88, 0x01]) + b"CARDLINE"   # T0: TD1 present, 8 historical; TD1: T=1
    tck = 0
    for b in body:
        tck ^= b
    return bytes([0x3B]) + body + bytes([tck])


ATR = _atr()


def sw(value: int) -> bytes:
    return struct.pack(">H", value)


class IsoCard:
    """The card's logic; ``process`` takes a command APDU and returns a response APDU."""

    def __init__(self, pin: bytes = DEFAULT_PIN) -> None:
        self.ef = bytearray(EF_SIZE)
        self.ef[:16] = b"cardline-ef-0001"
        self.pin = pin
        self.tries_left = PIN_TRIES
        self.reset()

    def reset(self) -> None:
        """Power-on/reset: volatile state goes, the EF and the PIN counter stay."""
        self.selected = False
        self.verified = False
        self.pending = b""           # data waiting for GET RESPONSE

    # -- parsing ---------------------------------------------------------------------
    @staticmethod
    def parse(apdu: bytes) -> tuple[int, int, int, int, bytes, int | None] | None:
        """(cla, ins, p1, p2, data, ne) or None when the lengths are inconsistent."""
        if len(apdu) < 4:
            return None
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[4:]
        if not body:
            return cla, ins, p1, p2, b"", None
        if len(body) == 1:
            return cla, ins, p1, p2, b"", body[0] or 256
        if body[0] != 0:                                # short Lc
            lc = body[0]
            if len(body) == 1 + lc:
                return cla, ins, p1, p2, bytes(body[1:]), None
            if len(body) == 2 + lc:
                return cla, ins, p1, p2, bytes(body[1:1 + lc]), body[-1] or 256
            return None
        if len(body) == 3:                              # extended Le only
            return cla, ins, p1, p2, b"", (body[1] << 8 | body[2]) or 65536
        lc = body[1] << 8 | body[2]
        if lc == 0:
            return None
        if len(body) == 3 + lc:
            return cla, ins, p1, p2, bytes(body[3:]), None
        if len(body) == 5 + lc:
            return cla, ins, p1, p2, bytes(body[3:3 + lc]), (body[-2] << 8 | body[-1]) or 65536
        return None

    # -- commands --------------------------------------------------------------------
    def process(self, apdu: bytes) -> bytes:
        parsed = self.parse(apdu)
        if parsed is None:
            return sw(0x6700)
        cla, ins, p1, p2, data, ne = parsed
        if cla != 0x00:
            return sw(0x6E00)
        if ins != 0xC0:
            self.pending = b""       # GET RESPONSE must follow the command directly
        handler = {0xA4: self.select, 0xB0: self.read_binary, 0xD6: self.update_binary,
                   0x20: self.verify, 0xCA: self.get_data, 0xC0: self.get_response}.get(ins)
        if handler is None:
            return sw(0x6D00)
        return handler(p1, p2, data, ne)

    def select(self, p1, p2, data, ne) -> bytes:
        if p1 != 0x04:
            return sw(0x6A86)
        if data != APP_AID:
            return sw(0x6A82)
        self.selected = True
        self.verified = False
        if p2 == 0x0C:
            return sw(0x9000)
        fci = bytes([0x84, len(APP_AID)]) + APP_AID + bytes.fromhex("A5038001FF")
        fci = bytes([0x6F, len(fci)]) + fci
        return fci[:ne] + sw(0x9000) if ne else sw(0x9000)

    def read_binary(self, p1, p2, data, ne) -> bytes:
        if not self.selected:
            return sw(0x6986)
        if p1 & 0x80:                       # short EF id addressing: not supported
            return sw(0x6A81)
        offset = p1 << 8 | p2
        if offset >= EF_SIZE:
            return sw(0x6B00)
        want = ne or 0
        chunk = bytes(self.ef[offset:offset + want])
        return chunk + sw(0x6282 if len(chunk) < want else 0x9000)

    def update_binary(self, p1, p2, data, ne) -> bytes:
        if not self.selected:
            return sw(0x6986)
        if not self.verified:
            return sw(0x6982)
        if p1 & 0x80:
            return sw(0x6A81)
        offset = p1 << 8 | p2
        if offset >= EF_SIZE:
            return sw(0x6B00)
        if offset + len(data) > EF_SIZE:
            return sw(0x6A84)
        self.ef[offset:offset + len(data)] = data
        return sw(0x9000)

    def verify(self, p1, p2, data, ne) -> bytes:
        if not self.selected:
            return sw(0x6986)
        if p1 != 0x00 or p2 != 0x81:
            return sw(0x6A88)
        if self.tries_left == 0:
            return sw(0x6983)
        if not data:                        # status query
            return sw(0x9000) if self.verified else sw(0x63C0 | self.tries_left)
        if data == self.pin:
            self.tries_left = PIN_TRIES
            self.verified = True
            return sw(0x9000)
        self.tries_left -= 1
        self.verified = False
        return sw(0x6983) if self.tries_left == 0 else sw(0x63C0 | self.tries_left)

    def get_data(self, p1, p2, data, ne) -> bytes:
        tag = p1 << 8 | p2
        if tag == 0x005A:
            if ne != len(SERIAL):
                return sw(0x6C00 | len(SERIAL))
            return SERIAL + sw(0x9000)
        if tag == 0x7F21:
            self.pending = BIG_OBJECT
            return self._more()
        return sw(0x6A88)

    def get_response(self, p1, p2, data, ne) -> bytes:
        if not self.pending:
            return sw(0x6985)
        if p1 or p2:
            return sw(0x6B00)
        n = ne or 256
        chunk, self.pending = self.pending[:n], self.pending[n:]
        return chunk + self._more()

    def _more(self) -> bytes:
        """61xx announcing what GET RESPONSE can fetch next (00 = 256 or more), or 9000."""
        if not self.pending:
            return sw(0x9000)
        return sw(0x6100 | (min(len(self.pending), 256) & 0xFF))


class VpcdCard:
    """Connects an ``IsoCard`` to vpcd on 127.0.0.1:port from a background thread."""

    def __init__(self, port: int, card: IsoCard | None = None, atr: bytes = ATR) -> None:
        self.port = port
        self.card = card or IsoCard()
        self.atr = atr
        self.apdu_count = 0
        self.apdus: list[bytes] = []       # commands received, in order (for tests)
        self._drop_at: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    def insert(self, timeout_s: float = 5.0) -> None:
        """Connect to vpcd (retrying while it is not listening yet, e.g. pcscd restarting)."""
        if self._thread is not None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                s.connect(("127.0.0.1", self.port))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, args=(s,), daemon=True,
                                        name=f"vpcd-card-{self.port}")
        self._thread.start()

    def remove(self) -> None:
        """Disconnect: vpcd reports the card absent at its next poll."""
        s, t = self._sock, self._thread
        self._sock = self._thread = None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        if t is not None and t is not threading.current_thread():
            t.join(2)

    @property
    def inserted(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drop_after(self, n: int) -> None:
        """Answer n more APDUs, then drop the connection when the next one arrives."""
        with self._lock:
            self._drop_at = self.apdu_count + n + 1

    def reset_count(self) -> None:
        with self._lock:
            self.apdu_count = 0
            self.apdus.clear()

    def __enter__(self) -> VpcdCard:
        self.insert()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- wire protocol ---------------------------------------------------------------
    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            # Linux drops QUICKACK mode after a while: re-arm it before every read.
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            part = s.recv(n - len(buf))
            if not part:
                return None
            buf += part
        return buf

    def _serve(self, s: socket.socket) -> None:
        try:
            while True:
                head = self._recv_exact(s, 2)
                if head is None:
                    return
                msg = self._recv_exact(s, struct.unpack(">H", head)[0])
                if msg is None:
                    return
                if len(msg) == 1:
                    reply = self._control(msg[0])
                    if reply is None:
                        continue
                else:
                    with self._lock:
                        self.apdu_count += 1
                        self.apdus.append(msg)
                        drop = self._drop_at is not None and self.apdu_count >= self._drop_at
                        if drop:
                            self._drop_at = None
                    if drop:                 # pulled mid-APDU: no answer, connection gone
                        s.shutdown(socket.SHUT_RDWR)
                        return
                    reply = self.card.process(msg)
                s.sendall(struct.pack(">H", len(reply)) + reply)
        except OSError:
            return                               # remove() closed the socket under us
        finally:
            s.close()
            if self._sock is s:
                self._sock = None
                self._thread = None

    def _control(self, code: int) -> bytes | None:
        if code == 0x04:
            return self.atr
        if code in (0x00, 0x01, 0x02):          # power off / on / reset: no answer
            self.card.reset()
            return None
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description="ISO 7816-4 card emulator for vpcd")
    ap.add_argument("--port", type=int, required=True, help="vpcd slot port on 127.0.0.1")
    args = ap.parse_args()
    card = VpcdCard(args.port)
    card.insert(timeout_s=30)
    print(f"card inserted on 127.0.0.1:{args.port}, ATR {ATR.hex().upper()}", flush=True)
    try:
        while card.inserted:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        card.remove()


if __name__ == "__main__":
    main()
