"""Peers for the node-role suite (test_node_protocol.py): what sits on either
side of `flower-sidecar node`.

- RawUpstream: an h2c "SuperLink" on a socket, for faults grpcio cannot be
  made to produce on cue: RST_STREAM(REFUSED_STREAM), GOAWAY below a stream,
  a connection dropped after a whole request was read, an upstream that goes
  silent (no PING ACK), GOAWAY ENHANCE_YOUR_CALM "too_many_pings".  It
  records every connection, stream (with its decoded :path) and PING with
  its arrival time.
- RawClient: a minimal h2c client, for a request whose headers grpcio does
  not let a test choose (a grpc-timeout the client itself never enforces).
- HpackDecoder: HPACK (RFC 7541) decoding with the dynamic table and
  Huffman-coded strings, because nghttp2 (inside the sidecar) indexes and
  Huffman-codes what it sends.
- Fleet request builders (hand-encoded protobuf, field numbers from
  /work/shared/fleet-api.md).
- Run as a script: a python3-grpcio Fleet upstream (all 12 methods on raw
  bytes, per-method counters via /test.Control/Stats, optional sleep set by
  the request metadata `x-test-sleep`, optional TLS, optional strict ping
  policy) -- a real gRPC server for kill -9 and too_many_pings tests:

      /usr/bin/python3 node_peers.py --listen 127.0.0.1:PORT [--tls-cert C --tls-key K]
                                     [--strict-pings]

Everything binds to 127.0.0.1; threads are daemons and stop() closes every
socket.  Frame helpers come from h2raw.py.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import traceback
from typing import Callable, Optional, Union

import echo_server
import h2raw
from h2raw import (ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, RST_STREAM,
                   SETTINGS, WINDOW_UPDATE, frame, grpc_message, hpack)

CONTINUATION = 0x9
PADDED, PRIORITY = 0x8, 0x20
REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB

FLEET = "flwr.proto.Fleet"
FLEET_METHODS = ("RegisterNode", "ActivateNode", "DeactivateNode", "UnregisterNode", "SendNodeHeartbeat",
                 "PullMessages", "PushMessages", "GetRun", "GetFab", "PushObject", "PullObject",
                 "ConfirmMessageReceived")


# --- HPACK decoding (RFC 7541) ------------------------------------------------

# Appendix A, index 1..61.
STATIC_TABLE = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]

# Appendix B is a canonical Huffman code: it is fully given by each
# symbol's code length (codes of one length are consecutive, in symbol
# order).  Lengths as (length, [symbol ranges]); symbol 256 is EOS.
_HUFFMAN_LENGTHS = [
    (5, [(48, 50), (97, 97), (99, 99), (101, 101), (105, 105), (111, 111), (115, 116)]),
    (6, [(32, 32), (37, 37), (45, 47), (51, 57), (61, 61), (65, 65), (95, 95), (98, 98), (100, 100),
         (102, 104), (108, 110), (112, 112), (114, 114), (117, 117)]),
    (7, [(58, 58), (66, 87), (89, 89), (106, 107), (113, 113), (118, 122)]),
    (8, [(38, 38), (42, 42), (44, 44), (59, 59), (88, 88), (90, 90)]),
    (10, [(33, 34), (40, 41), (63, 63)]),
    (11, [(39, 39), (43, 43), (124, 124)]),
    (12, [(35, 35), (62, 62)]),
    (13, [(0, 0), (36, 36), (64, 64), (91, 91), (93, 93), (126, 126)]),
    (14, [(94, 94), (125, 125)]),
    (15, [(60, 60), (96, 96), (123, 123)]),
    (19, [(92, 92), (195, 195), (208, 208)]),
    (20, [(128, 128), (130, 131), (162, 162), (184, 184), (194, 194), (224, 224), (226, 226)]),
    (21, [(153, 153), (161, 161), (167, 167), (172, 172), (176, 177), (179, 179), (209, 209), (216, 217),
          (227, 227), (229, 230)]),
    (22, [(129, 129), (132, 134), (136, 136), (146, 146), (154, 154), (156, 156), (160, 160), (163, 164),
          (169, 170), (173, 173), (178, 178), (181, 181), (185, 187), (189, 190), (196, 196), (198, 198),
          (228, 228), (232, 233)]),
    (23, [(1, 1), (135, 135), (137, 141), (143, 143), (147, 147), (149, 152), (155, 155), (157, 158),
          (165, 166), (168, 168), (174, 175), (180, 180), (182, 183), (188, 188), (191, 191), (197, 197),
          (231, 231), (239, 239)]),
    (24, [(9, 9), (142, 142), (144, 145), (148, 148), (159, 159), (171, 171), (206, 206), (215, 215),
          (225, 225), (236, 237)]),
    (25, [(199, 199), (207, 207), (234, 235)]),
    (26, [(192, 193), (200, 202), (205, 205), (210, 210), (213, 213), (218, 219), (238, 238), (240, 240),
          (242, 243), (255, 255)]),
    (27, [(203, 204), (211, 212), (214, 214), (221, 223), (241, 241), (244, 248), (250, 254)]),
    (28, [(2, 8), (11, 12), (14, 21), (23, 31), (127, 127), (220, 220), (249, 249)]),
    (30, [(10, 10), (13, 13), (22, 22), (256, 256)]),
]


def _huffman_codes() -> dict:
    """{(length, code): symbol} for the canonical code above."""
    out, code, prev_len = {}, -1, 0
    for length, ranges in _HUFFMAN_LENGTHS:
        for lo, hi in ranges:
            for sym in range(lo, hi + 1):
                code = (code + 1) << (length - prev_len) if code >= 0 else 0
                prev_len = length
                out[(length, code)] = sym
    return out


_HUFFMAN = _huffman_codes()
assert len(_HUFFMAN) == 257 and _HUFFMAN[(30, 0x3FFFFFFF)] == 256 and _HUFFMAN[(5, 0)] == 48


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = length = 0
    for byte in data:
        for bit in range(7, -1, -1):
            code = (code << 1) | ((byte >> bit) & 1)
            length += 1
            sym = _HUFFMAN.get((length, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman-coded string")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise ValueError("bad Huffman code")
    # Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if length > 7 or code != (1 << length) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)


class HpackDecoder:
    """One connection direction's HPACK decoding context."""

    def __init__(self, max_size: int = 4096):
        self.dynamic: list[tuple[str, str]] = []  # newest first
        self.max_size = max_size

    @staticmethod
    def _int(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
        limit = (1 << prefix) - 1
        v = data[pos] & limit
        pos += 1
        if v < limit:
            return v, pos
        shift = 0
        while True:
            b = data[pos]
            pos += 1
            v += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v, pos

    def _str(self, data: bytes, pos: int) -> tuple[str, int]:
        huff = data[pos] & 0x80
        n, pos = self._int(data, pos, 7)
        raw = data[pos:pos + n]
        if len(raw) != n:
            raise ValueError("truncated HPACK string")
        return (huffman_decode(raw) if huff else raw).decode("latin-1"), pos + n

    def _get(self, idx: int) -> tuple[str, str]:
        if idx <= 0:
            raise ValueError("HPACK index 0")
        if idx <= len(STATIC_TABLE):
            return STATIC_TABLE[idx - 1]
        return self.dynamic[idx - len(STATIC_TABLE) - 1]

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        self._evict()

    def _evict(self) -> None:
        while self.dynamic and sum(len(n) + len(v) + 32 for n, v in self.dynamic) > self.max_size:
            self.dynamic.pop()

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        out, pos = [], 0
        while pos < len(block):
            b = block[pos]
            if b & 0x80:  # indexed field
                idx, pos = self._int(block, pos, 7)
                out.append(self._get(idx))
            elif b & 0x40:  # literal with incremental indexing
                idx, pos = self._int(block, pos, 6)
                name = self._get(idx)[0] if idx else None
                if name is None:
                    name, pos = self._str(block, pos)
                value, pos = self._str(block, pos)
                self._add(name, value)
                out.append((name, value))
            elif b & 0x20:  # dynamic table size update
                self.max_size, pos = self._int(block, pos, 5)
                self._evict()
            else:  # literal without indexing / never indexed
                idx, pos = self._int(block, pos, 4)
                name = self._get(idx)[0] if idx else None
                if name is None:
                    name, pos = self._str(block, pos)
                value, pos = self._str(block, pos)
                out.append((name, value))
        return out


def header_block(payload: bytes, flags: int) -> bytes:
    """The header block fragment of a HEADERS frame's payload (padding and priority removed)."""
    pad = 0
    if flags & PADDED:
        pad = payload[0]
        payload = payload[1:]
    if flags & PRIORITY:
        payload = payload[5:]
    return payload[:len(payload) - pad] if pad else payload


def data_payload(payload: bytes, flags: int) -> bytes:
    if flags & PADDED:
        pad = payload[0]
        return payload[1:len(payload) - pad]
    return payload


# --- protobuf (hand-encoded) ---------------------------------------------------


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_varint(field: int, v: int) -> bytes:
    return varint(field << 3) + varint(v)


def pb_bytes(field: int, b: Union[bytes, str]) -> bytes:
    if isinstance(b, str):
        b = b.encode()
    return varint((field << 3) | 2) + varint(len(b)) + b


def pb_double(field: int, v: float) -> bytes:
    return varint((field << 3) | 1) + struct.pack("<d", v)


NODE_ID = 11120582391849163402  # above 2^53, like Flower's
RUN_ID = 4242


def node(node_id: int = NODE_ID) -> bytes:
    return pb_bytes(1, pb_varint(1, node_id))


def fleet_object(body: bytes, type_: str = "ArrayChunk") -> tuple[str, bytes]:
    """(object_id, object): Flower's object layout, id = SHA-256 of the whole object."""
    import hashlib
    obj = f"{type_}  {len(body)}".encode() + b"\x00" + body
    return hashlib.sha256(obj).hexdigest(), obj


def fleet_request(method: str, size: int = 0) -> bytes:
    """A plausible request of |method|; PushObject carries an object of about |size| bytes."""
    n = node()
    if method == "PushMessages":
        return n + pb_double(4, 1.5)
    if method == "PullMessages":
        return n
    if method == "ConfirmMessageReceived":
        return n + pb_varint(2, RUN_ID) + pb_bytes(3, "ab" * 32)
    if method in ("ActivateNode", "RegisterNode"):
        return pb_bytes(1, b"-----BEGIN PUBLIC KEY-----\n" + b"K" * 160 + b"\n-----END PUBLIC KEY-----\n") + (
            pb_double(2, 30.0) if method == "ActivateNode" else b"")
    if method in ("DeactivateNode", "UnregisterNode"):
        return pb_varint(1, NODE_ID)
    if method == "SendNodeHeartbeat":
        return n + pb_double(2, 30.0)
    if method == "GetRun":
        return n + pb_varint(2, RUN_ID)
    if method == "GetFab":
        return n + pb_bytes(2, "cd" * 32) + pb_varint(3, RUN_ID)
    if method == "PullObject":
        return n + pb_varint(2, RUN_ID) + pb_bytes(3, "ef" * 32)
    if method == "PushObject":
        oid, obj = fleet_object(bytes(i % 251 for i in range(size)))
        return n + pb_varint(2, RUN_ID) + pb_bytes(3, oid) + pb_bytes(4, obj)
    raise ValueError(method)


# --- the raw upstream ----------------------------------------------------------


class Stream:
    def __init__(self, conn: "Conn", sid: int, headers: list[tuple[str, str]]):
        self.conn = conn
        self.sid = sid
        self.headers = headers
        self.path = dict(headers).get(":path", "")
        self.method = self.path.rsplit("/", 1)[-1]
        self.body = bytearray()
        self.t_headers = time.monotonic()
        self.t_end: Optional[float] = None  # END_STREAM from the client
        self.rst_code: Optional[int] = None  # RST_STREAM from the client
        self.action = "ok"
        self.answered = False


class Conn:
    def __init__(self, server: "RawUpstream", sock: socket.socket, idx: int):
        self.server = server
        self.sock = sock
        self.idx = idx
        self.t_open = time.monotonic()
        self.t_closed: Optional[float] = None  # EOF or error seen
        self.pings: list[float] = []  # arrival of each PING (not ACK) from the sidecar
        self.frames: list[tuple[float, int, int, int, int]] = []  # (time, type, flags, stream, length) received
        self.streams: dict[int, Stream] = {}
        self.goaway_sent: Optional[tuple[int, int, bytes]] = None
        self.goaway_received: Optional[tuple[int, int]] = None
        self.state = "open"  # open | stalled | closing | closed
        self.calm_on_ping: Optional[Stream] = None
        self.held_pings: Optional[list[bytes]] = None  # while a trickle runs: PINGs not yet ACKed
        self.lock = threading.Lock()
        self.decoder = HpackDecoder()
        self.header_buf: Optional[tuple[int, int, bytearray]] = None  # (sid, flags, block) until END_HEADERS

    def send(self, data: bytes) -> None:
        if self.state in ("stalled", "closed"):
            return
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def respond(self, st: Stream, payload: bytes = b"") -> None:
        if st.answered or self.state != "open" or st.rst_code is not None:
            return
        st.answered = True
        self.send(frame(HEADERS, END_HEADERS, st.sid,
                        hpack([(":status", "200"), ("content-type", "application/grpc")])) +
                  frame(DATA, 0, st.sid, grpc_message(payload)) +
                  frame(HEADERS, END_HEADERS | END_STREAM, st.sid, hpack([("grpc-status", "0")])))

    def refuse(self, st: Stream) -> None:
        st.answered = True
        self.send(frame(RST_STREAM, 0, st.sid, struct.pack(">I", REFUSED_STREAM)))

    def goaway(self, last_sid: int, code: int, debug: bytes = b"") -> None:
        self.goaway_sent = (last_sid, code, debug)
        self.send(frame(GOAWAY, 0, 0, struct.pack(">II", last_sid, code) + debug))

    def close_gracefully(self) -> None:
        """FIN now; the reader thread drains until the sidecar closes (so no
        RST can overtake what was sent), then closes."""
        if self.state in ("closing", "closed"):
            return
        self.state = "closing"
        self.closing_since = time.monotonic()
        with self.lock:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


Action = Union[str, tuple]


class RawUpstream:
    """h2c server speaking just enough gRPC; behaviour scripted per method.

    script: {method name: [action for its 1st arrival, 2nd, ...]}, later
    arrivals (and unscripted methods) get |default|.  Arrivals are counted
    over all connections, at the request's HEADERS.  Actions:
      "ok"            answer at once (empty message, grpc-status 0)
      ("slow", s)     answer s seconds after the request ended (PINGs are ACKed meanwhile)
      "refuse"        RST_STREAM(REFUSED_STREAM) at HEADERS
      "goaway"        at HEADERS: GOAWAY(NO_ERROR) whose last-stream-id is below
                      this stream, then close the connection
      "drop"          read the whole request, then close the TCP connection without a byte
      ("drop", s)     the same, s seconds after the request ended
      "stall"         read the whole request, then never send anything on this
                      connection again (no PING ACK, no WINDOW_UPDATE)
      "calm"          read the whole request; at the next PING send GOAWAY
                      ENHANCE_YOUR_CALM "too_many_pings" (last-stream-id = this stream) and close
      ("trickle", s, n)  answer with an n-byte message sent one byte every s seconds;
                      meanwhile PING ACKs wait behind it (sent when it ends): a lossy
                      link, where old bytes keep arriving and new ones are stuck
      "hang"          never answer this stream; the connection carries on
    """

    def __init__(self, script: Optional[dict] = None, default: Action = "ok",
                 response: Callable[[Stream], bytes] = lambda st: b"", port: int = 0):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default = default
        self.response = response
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self.arrivals: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accepting = True
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- what happened --

    def streams(self, method: Optional[str] = None) -> list[Stream]:
        out = [st for c in list(self.conns) for st in list(c.streams.values())]
        out.sort(key=lambda st: st.t_headers)
        return [st for st in out if method is None or st.method == method]

    def count(self, method: str) -> int:
        return len(self.streams(method))

    def pings(self) -> list[tuple[int, float]]:
        """(connection index, arrival time) of every PING, in order."""
        return sorted(((c.idx, t) for c in list(self.conns) for t in c.pings), key=lambda p: p[1])

    def summary(self) -> str:
        """For assertion messages."""
        lines = []
        for c in list(self.conns):
            sts = ", ".join(f"{st.sid}:{st.method}:{st.action}" + (f":rst{st.rst_code}" if st.rst_code is not None else "")
                            for st in c.streams.values())
            lines.append(f"conn {c.idx} {c.state} pings={len(c.pings)} goaway_sent={c.goaway_sent} "
                         f"goaway_received={c.goaway_received} streams=[{sts}]")
        return "\n".join(lines + self.errors) or "no connections"

    # -- control --

    def stop_accepting(self) -> None:
        """Close the listening socket: further connection attempts are refused."""
        self._accepting = False
        try:
            self.sock.close()
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.stop_accepting()
        for c in list(self.conns):
            try:
                c.sock.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    # -- internals --

    def _accept(self):
        self.sock.settimeout(0.1)
        while not self._stop.is_set() and self._accepting:
            try:
                s, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c = Conn(self, s, len(self.conns))
            self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    def _action(self, method: str) -> Action:
        with self._lock:
            n = self.arrivals.get(method, 0)
            self.arrivals[method] = n + 1
            plan = self.script.get(method, [])
            return plan[n] if n < len(plan) else self.default

    def _serve(self, c: Conn):
        s = c.sock
        s.settimeout(0.1)
        buf = bytearray()
        try:
            while len(buf) < len(PREFACE):
                if self._stop.is_set():
                    return
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:  # reset, or closed by stop()
                    return
                if not chunk:
                    return
                buf += chunk
            if bytes(buf[:len(PREFACE)]) != PREFACE:
                self.errors.append(f"conn {c.idx}: bad preface {bytes(buf[:24])!r}")
                return
            del buf[:len(PREFACE)]
            # MAX_CONCURRENT_STREAMS 100, INITIAL_WINDOW_SIZE 1 MiB; a large connection window.
            c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100) + struct.pack(">HI", 4, 1 << 20)) +
                   frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 24))))
            while not self._stop.is_set():
                if c.state == "closing" and time.monotonic() - c.closing_since > 3:
                    return
                try:
                    f = h2raw.read_frame(s, buf)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if f is None:
                    return
                try:
                    self._frame(c, *f)
                except Exception:  # a decoding bug here must fail the test (see errors), not hang it
                    self.errors.append(f"conn {c.idx}: {traceback.format_exc()}")
                    return
        finally:
            c.t_closed = time.monotonic()
            c.state = "closed"
            try:
                s.close()
            except OSError:
                pass

    def _frame(self, c: Conn, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        c.frames.append((time.monotonic(), ftype, flags, sid, len(payload)))
        if ftype == PING:
            if flags & ACK:
                return
            c.pings.append(time.monotonic())
            if c.calm_on_ping is not None and c.state == "open":
                c.goaway(c.calm_on_ping.sid, ENHANCE_YOUR_CALM, b"too_many_pings")
                c.close_gracefully()
            elif c.state == "open" and c.held_pings is not None:
                c.held_pings.append(payload)
            elif c.state == "open":
                c.send(frame(PING, ACK, 0, payload))
            return
        if c.state != "open":
            return  # stalled or closing: read and discard
        if ftype == SETTINGS:
            if not flags & ACK:
                c.send(frame(SETTINGS, ACK, 0))
        elif ftype == GOAWAY:
            c.goaway_received = struct.unpack(">II", payload[:8])
        elif ftype == HEADERS or ftype == CONTINUATION:
            if ftype == HEADERS:
                c.header_buf = (sid, flags, bytearray(header_block(payload, flags)))
            elif c.header_buf is not None:
                c.header_buf[2].extend(payload)
            if flags & END_HEADERS and c.header_buf is not None:
                hsid, hflags, block = c.header_buf
                c.header_buf = None
                headers = c.decoder.decode(bytes(block))
                if hsid in c.streams:
                    st = c.streams[hsid]  # trailers from the client: unexpected for gRPC, ignored
                    if hflags & END_STREAM:
                        self._request_done(c, st)
                    return
                st = Stream(c, hsid, headers)
                c.streams[hsid] = st
                st.action = self._action(st.method)
                if st.action == "refuse":
                    c.refuse(st)
                elif st.action == "goaway":
                    c.goaway(max(0, hsid - 2), h2raw.NO_ERROR)
                    c.close_gracefully()
                elif hflags & END_STREAM:
                    self._request_done(c, st)
        elif ftype == DATA:
            st = c.streams.get(sid)
            body = data_payload(payload, flags)
            if payload:
                inc = struct.pack(">I", len(payload))
                out = frame(WINDOW_UPDATE, 0, 0, inc)
                if st is not None and not flags & END_STREAM:
                    out += frame(WINDOW_UPDATE, 0, sid, inc)
                c.send(out)
            if st is not None:
                st.body += body
                if flags & END_STREAM:
                    self._request_done(c, st)
        elif ftype == RST_STREAM:
            st = c.streams.get(sid)
            if st is not None:
                st.rst_code = struct.unpack(">I", payload[:4])[0]

    def _request_done(self, c: Conn, st: Stream) -> None:
        st.t_end = time.monotonic()
        a = st.action
        if a == "refuse" or st.answered:
            return
        if a == "ok":
            c.respond(st, self.response(st))
        elif isinstance(a, tuple) and a[0] == "slow":
            t = threading.Timer(a[1], lambda: c.respond(st, self.response(st)))
            t.daemon = True
            t.start()
        elif a == "drop":
            c.close_gracefully()
        elif isinstance(a, tuple) and a[0] == "drop":
            t = threading.Timer(a[1], c.close_gracefully)
            t.daemon = True
            t.start()
        elif a == "stall":
            c.state = "stalled"
        elif a == "calm":
            c.calm_on_ping = st
        elif isinstance(a, tuple) and a[0] == "trickle":
            threading.Thread(target=self._trickle, args=(c, st, a[1], a[2]), daemon=True).start()
        elif a == "hang":
            pass
        else:
            raise ValueError(f"unknown action {a!r}")


    def _trickle(self, c: Conn, st: Stream, every: float, n: int) -> None:
        c.held_pings = []
        st.answered = True
        c.send(frame(HEADERS, END_HEADERS, st.sid,
                     hpack([(":status", "200"), ("content-type", "application/grpc")])))
        msg = grpc_message(bytes(n))
        for i in range(len(msg)):
            if self._stop.is_set() or c.state != "open" or st.rst_code is not None:
                break
            c.send(frame(DATA, 0, st.sid, msg[i:i + 1]))
            time.sleep(every)
        else:
            c.send(frame(HEADERS, END_HEADERS | END_STREAM, st.sid, hpack([("grpc-status", "0")])))
        held, c.held_pings = c.held_pings, None
        for payload in held:
            c.send(frame(PING, ACK, 0, payload))


# --- a raw client ----------------------------------------------------------------


class RawClient:
    """One h2c connection to the sidecar's listener; one request at a time."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.decoder = HpackDecoder()
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0) +
                          frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 24)))
        self.next_sid = 1

    def call(self, path: str, body: bytes, extra_headers: list[tuple[str, str]] = (),
             timeout: float = 10.0) -> dict:
        """Sends a unary gRPC request; returns {'headers', 'trailers', 'data', 'rst', 't_end'}
        once the stream ends (or after |timeout|: 't_end' None)."""
        sid = self.next_sid
        self.next_sid += 2
        hdrs = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
                ("content-type", "application/grpc"), ("te", "trailers"), *extra_headers]
        self.sock.sendall(frame(HEADERS, END_HEADERS, sid, hpack(hdrs)) +
                          frame(DATA, END_STREAM, sid, grpc_message(body)))
        out = {"headers": [], "trailers": [], "data": b"", "rst": None, "t_end": None}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                f = h2raw.read_frame(self.sock, self.buf)
            except socket.timeout:
                break
            except OSError:
                break
            if f is None:
                break
            ftype, flags, fsid, payload = f
            if ftype == SETTINGS and not flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))
            elif ftype == HEADERS and fsid == sid:
                decoded = self.decoder.decode(header_block(payload, flags))
                (out["trailers"] if out["headers"] else out["headers"]).extend(decoded)
                if flags & END_STREAM:
                    if not out["trailers"]:  # Trailers-Only
                        out["trailers"] = out["headers"]
                    out["t_end"] = time.monotonic()
                    return out
            elif ftype == HEADERS:
                self.decoder.decode(header_block(payload, flags))  # keep the HPACK context right
            elif ftype == DATA and fsid == sid:
                out["data"] += data_payload(payload, flags)
                if flags & END_STREAM:
                    out["t_end"] = time.monotonic()
                    return out
            elif ftype == RST_STREAM and fsid == sid:
                out["rst"] = struct.unpack(">I", payload[:4])[0]
                out["t_end"] = time.monotonic()
                return out
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- the grpcio Fleet upstream (run as a script) --------------------------------


def _serve_grpc() -> None:
    import argparse
    import json
    from concurrent import futures

    import grpc

    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--strict-pings", action="store_true",
                    help="a strict server: PINGs without data more often than every 5 min are strikes, "
                         "the second strike gets GOAWAY ENHANCE_YOUR_CALM too_many_pings")
    a = ap.parse_args()

    counts: dict = {}
    lock = threading.Lock()

    def handler(method):
        def h(req, ctx):
            with lock:
                counts[method] = counts.get(method, 0) + 1
            md = dict(ctx.invocation_metadata())
            end = time.monotonic() + float(md.get("x-test-sleep", "0"))
            while time.monotonic() < end and ctx.is_active():
                time.sleep(0.01)
            return b""
        return grpc.unary_unary_rpc_method_handler(h)

    def stats(req, ctx):
        with lock:
            return json.dumps(counts).encode()

    # Stock: grpcio's defaults.  Strict: what the brief of issue 5 calls a
    # strict upstream (long minimum ping interval, strikes counted).
    opts = []
    if a.strict_pings:
        opts = [("grpc.http2.min_ping_interval_without_data_ms", 300000), ("grpc.http2.max_ping_strikes", 1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=opts)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(FLEET, {m: handler(m) for m in FLEET_METHODS}),
        grpc.method_handlers_generic_handler("test.Control", {"Stats": grpc.unary_unary_rpc_method_handler(stats)}),
    ))
    echo_server.serve(server, a.listen, a.tls_cert, a.tls_key)


if __name__ == "__main__":
    _serve_grpc()
