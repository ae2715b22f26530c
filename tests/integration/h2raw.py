"""Hand-built HTTP/2 (RFC 9113) for the tests that need what no well-behaved
library sends: malformed frames towards the sidecar, and an upstream that
resets a stream with RST_STREAM in the middle of a response.

Only what those tests need: frame encoding and parsing, HPACK literals
without Huffman coding (RFC 7541 6.2.2), and RstUpstream.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Optional

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x2, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, CANCEL = 0x0, 0x1, 0x2, 0x8


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid & 0x7FFFFFFF) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack(headers: list[tuple[str, str]]) -> bytes:
    """Header block of literals without indexing, new names, no Huffman."""
    out = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return out


def grpc_message(payload: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def read_frame(sock: socket.socket, buf: bytearray) -> Optional[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of the next frame, or None at EOF."""
    while True:
        if len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) >= 9 + length:
                ftype, flags = buf[3], buf[4]
                sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload = bytes(buf[9:9 + length])
                del buf[:9 + length]
                return ftype, flags, sid, payload
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Reads until the peer closes (EOF or reset) or |timeout| passes.
    Returns (closed, everything read)."""
    deadline = time.monotonic() + timeout
    got = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError):
            return True, got
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def frames_in(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Parses complete frames out of bytes read from a server (after no preface)."""
    out, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if i + 9 + length > len(data):
            break
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                    data[i + 9:i + 9 + length]))
        i += 9 + length
    return out


class RstUpstream:
    """An h2c "gRPC server" on loopback that answers every request with
    response headers and one message, then, |delay| s later, resets the
    stream with RST_STREAM(|code|): what a real server does when its handler dies.

    Runs in a thread of the test process; stop() closes everything."""

    def __init__(self, code: int = INTERNAL_ERROR, message: bytes = b"partial", delay: float = 0.3):
        self.code = code
        self.delay = delay
        self.message = message
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.resets_sent = 0
        self.requests = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        buf = bytearray()
        conn.settimeout(0.5)
        try:
            while not self._stop.is_set() and len(buf) < len(PREFACE):
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                buf += chunk
            if bytes(buf[:len(PREFACE)]) != PREFACE:
                return
            del buf[:len(PREFACE)]
            conn.sendall(frame(SETTINGS, 0, 0))
            while not self._stop.is_set():
                try:
                    f = read_frame(conn, buf)
                except socket.timeout:
                    continue
                if f is None:
                    return
                ftype, flags, sid, _ = f
                if ftype == SETTINGS and not flags & ACK:
                    conn.sendall(frame(SETTINGS, ACK, 0))
                elif ftype == PING and not flags & ACK:
                    conn.sendall(frame(PING, ACK, 0, f[3]))
                elif ftype == HEADERS and sid % 2 == 1:
                    self.requests += 1
                    block = hpack([(":status", "200"), ("content-type", "application/grpc")])
                    conn.sendall(frame(HEADERS, END_HEADERS, sid, block) +
                                 frame(DATA, 0, sid, grpc_message(self.message)))
                    # A handler that dies a moment after its first message:
                    # the message is on its way before the reset.
                    time.sleep(self.delay)
                    conn.sendall(frame(RST_STREAM, 0, sid, struct.pack(">I", self.code)))
                    self.resets_sent += 1
        except OSError:
            return
        finally:
            conn.close()

    def stop(self):
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._thread.join(timeout=2)
