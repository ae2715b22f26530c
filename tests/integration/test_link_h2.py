"""flower-sidecar link --no-tls: malformed HTTP/2 from a client closes that
connection and nothing else; the sidecar neither crashes nor stops serving.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

import h2raw
from conftest import HOST, unary

# name: (bytes sent, what conn.close must say, GOAWAY expected before the close)
CASES = {
    # Not HTTP/2 at all where the client preface must be.
    "bad-preface": (b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64, "preface", False),
    "almost-preface": (h2raw.PREFACE[:-3] + b"XYZ" + h2raw.frame(h2raw.SETTINGS, 0, 0), "preface", False),
    # A valid preface, then bytes that are no frame (a huge length field).
    "garbage-after-preface": (h2raw.PREFACE + b"\xff" * 9 + os.urandom(4096), "protocol error", True),
    # RFC 9113 6.2: HEADERS on stream 0 is a connection error PROTOCOL_ERROR.
    "headers-on-stream-0": (h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0) + h2raw.frame(
        h2raw.HEADERS, h2raw.END_HEADERS | h2raw.END_STREAM, 0,
        h2raw.hpack([(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Unary"),
                     (":authority", "x")])), "PROTOCOL_ERROR", True),
    # SETTINGS with a length that is not a multiple of 6.
    "bad-settings-length": (h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0, b"\x00\x04\x00"),
                            "FRAME_SIZE_ERROR", True),
    # WINDOW_UPDATE pushing the connection window past 2^31-1.
    "window-overflow": (h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0) + h2raw.frame(
        h2raw.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF)), "FLOW_CONTROL_ERROR", True),
}


@pytest.fixture
def h2c(echo, make_sidecar):
    sc = make_sidecar(upstream=echo, tls=False)
    good = sc.channel(HOST)
    assert unary(good, "Unary", b"before") == b"before"
    yield sc
    assert sc.alive()
    assert unary(good, "Unary", b"after") == b"after", "a bad client disturbed a good connection"
    assert unary(sc.channel(HOST), "Unary", b"new") == b"new"


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_http2_closes_the_connection(h2c, name):
    data, reason, want_goaway = CASES[name]
    s = socket.create_connection((HOST, h2c.port), timeout=5)
    local = s.getsockname()[1]
    try:
        s.sendall(data)
    except OSError:
        pass  # closed before we finished: fine
    closed, got = h2raw.read_until_closed(s, 5)
    s.close()
    assert closed, f"{name}: connection still open after 5 s"
    # After a valid preface the client is owed a GOAWAY with an error code
    # (RFC 9113 5.4.1) before the close.
    goaways = [struct.unpack(">I", p[4:8])[0] for t, _, _, p in h2raw.frames_in(got) if t == h2raw.GOAWAY]
    if want_goaway:
        assert goaways and goaways[-1] != h2raw.NO_ERROR, f"{name}: no GOAWAY with an error code in {got[:200]!r}"
    ev = h2c.events.wait("conn.close", peer=f"{HOST}:{local}")
    assert reason in ev["reason"], ev
