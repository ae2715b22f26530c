"""Hostile clients on the link role's public port (issue 13): one client,
however it misbehaves, must not slow, starve or fail another client's calls.

Each attack is bounded in count and time and sent with raw frames
(h2raw.py) over real TLS to a real sidecar in front of the grpcio echo
upstream; what is asserted is what a user relies on: legit calls on other
connections keep succeeding within a stated latency, health keeps
answering, and the sidecar's CPU stays bounded.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import urllib.request

import grpc
import pytest

import h2raw
from h2attacks import floods, hpack_amplification, rapid_reset_burst, silent_sockets, zero_window_burst
from conftest import SLOW, unary, wait_for

PAGE = 4096


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (USER_HZ 100)


def tls_h2(sc, ctx) -> ssl.SSLSocket:
    """A TLS + HTTP/2 connection to the sidecar, preface and SETTINGS sent."""
    raw = socket.create_connection(("127.0.0.1", sc.port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0))
    return s


class LegitCaller:
    """Unary calls on their own channel every |interval| s while running;
    records each call's latency or failure."""

    def __init__(self, channel: grpc.Channel, interval: float = 0.05):
        self.channel, self.interval = channel, interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                assert unary(self.channel, "Unary", b"legit", timeout=5) == b"legit"
                self.latencies.append(time.monotonic() - t0)
            except (grpc.RpcError, AssertionError) as e:
                self.failures.append(repr(e)[:200])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=10)

    def p99(self) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("inf")


def healthz(sc) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sc.admin_port}/healthz", timeout=2) as r:
            return r.status
    except Exception:  # noqa: BLE001 - any failure is "not answering"
        return 0


@pytest.mark.parametrize("conns", [40, 100])
def test_rapid_reset_does_not_reach_the_upstream_or_starve_others(conns, link, echo):
    """40 or 100 pre-handshaked TLS connections each send 1000 HEADERS +
    RST_STREAM pairs in one write (2.9 or 7.3 MB in all).  Before, every HEADERS was
    submitted to the shared upstream session at once and each reset scanned
    its queue of unsent requests: 12.5 s of CPU for this burst, legit calls
    12.5 s late, /healthz failing (measured again at c782f2d, 40 x 1000: 7.8 s
    of CPU, legit p99 2.7 s, one legit call failed).  Now a request is handed to the upstream
    connection only at its flush, so a stream reset in the same read batch
    never reaches it, and rpc.error lines (one per reset stream) are rate
    limited: the burst costs a fraction of a second of CPU (0.1-0.3 s here),
    legit calls on another connection stay fast (p99 0.1-0.2 s) and health
    answers throughout.  One loop pass still reads each connection's whole
    burst: reading in slices is not done yet (issue 13)."""
    per_conn = 1000
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=link.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    socks = [tls_h2(link, ctx) for _ in range(conns)]
    burst = rapid_reset_burst(per_conn)
    before_sleep = echo.count("Sleep")
    log0 = link.events.path.stat().st_size
    cpu0 = cpu_seconds(link.proc.pid)
    health = []
    with LegitCaller(link.channel()) as legit:
        time.sleep(0.3)
        t0 = time.monotonic()
        senders = [threading.Thread(target=s.sendall, args=(burst,), daemon=True) for s in socks]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=60)
        # The sidecar is done with the burst when its CPU time stops growing.
        last, idle_since = cpu_seconds(link.proc.pid), time.monotonic()
        while time.monotonic() - t0 < 60:
            health.append(healthz(link))
            time.sleep(0.1)
            now = cpu_seconds(link.proc.pid)
            if now - last > 0.02:
                last, idle_since = now, time.monotonic()
            elif time.monotonic() - idle_since > 1.0:
                break
        busy = idle_since - t0
        time.sleep(0.5)
    cpu = cpu_seconds(link.proc.pid) - cpu0
    for s in socks:
        s.close()
    reached = echo.count("Sleep") - before_sleep
    log_bytes = link.events.path.stat().st_size - log0
    errors = [e for e in link.events.all() if e["event"] == "rpc.error"]
    print(f"rapid reset {conns} x {per_conn}: sidecar CPU {cpu:.2f} s, busy {busy:.2f} s, "
          f"{reached} of {conns * per_conn} requests reached the upstream, legit calls {len(legit.latencies)} ok, "
          f"{len(legit.failures)} failed, p99 {legit.p99() * 1000:.0f} ms, event log +{log_bytes / 1e6:.2f} MB")
    assert len(legit.failures) <= 1, legit.failures[:3]
    assert legit.p99() < 1.0 * SLOW, f"legit p99 {legit.p99():.3f} s"
    assert all(h == 200 for h in health), f"/healthz answers during the burst: {health}"
    assert cpu < 5.0 * SLOW, f"the burst cost {cpu:.2f} s of sidecar CPU"
    # Streams reset in the same read as their HEADERS never go upstream; a
    # read that splits a pair may let a few through.
    assert reached < conns * per_conn // 10, f"{reached} cancelled requests reached the upstream"
    # One rpc.error per reset stream would be 250 bytes x every stream: the
    # kind is rate limited and says how much it held back.
    assert len(errors) < 1000 + 100 * (busy + 5), f"{len(errors)} rpc.error lines"
    assert log_bytes < 2_000_000, f"the burst wrote {log_bytes} bytes of events"
    assert unary(link.channel(), "Unary", b"after") == b"after"


def test_hpack_amplification_closes_the_connection(link):
    """100 HEADERS frames of 16 KB (1.6 MB) whose 1-byte indexes repeat a 4 KB
    table entry: 6.4 GB of decoded headers.  Decoding on past the header
    list limit cost about 2.5 us per attacker byte (~400 KB/s saturated the
    core).  A block that decodes to more than 4 x --max-header-list-size is
    now abuse: the connection is closed (GOAWAY ENHANCE_YOUR_CALM) at the
    first such block, legit calls on other connections stay fast."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=link.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    s = tls_h2(link, ctx)
    cpu0 = cpu_seconds(link.proc.pid)
    with LegitCaller(link.channel()) as legit:
        time.sleep(0.3)
        try:
            s.sendall(hpack_amplification(100))
        except OSError:
            pass  # closed by the sidecar mid-send: what we want
        closed, got = h2raw.read_until_closed(s, 10 * SLOW)
        time.sleep(0.5)
    cpu = cpu_seconds(link.proc.pid) - cpu0
    s.close()
    goaways = [f for f in h2raw.frames_in(got) if f[0] == h2raw.GOAWAY]
    print(f"hpack amplification 100 x 16 KB: sidecar CPU {cpu:.2f} s, closed {closed}, "
          f"GOAWAY {[struct.unpack('>I', f[3][4:8])[0] for f in goaways]}, legit p99 {legit.p99() * 1000:.0f} ms")
    assert closed, "the abusing connection is still open"
    assert any(struct.unpack(">I", f[3][4:8])[0] == 0xB for f in goaways), "no GOAWAY ENHANCE_YOUR_CALM"
    assert cpu < 1.0 * SLOW, f"the attack cost {cpu:.2f} s of sidecar CPU"
    assert len(legit.failures) <= 1 and legit.p99() < 1.0 * SLOW, (legit.failures[:3], legit.p99())
    wait_for(lambda: [e for e in link.events.all() if e["event"] == "conn.close" and "header abuse" in e["reason"]],
             5 * SLOW, "conn.close saying why")


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the sidecar closes |s| within |timeout| (what it sends
    before, e.g. its SETTINGS, is read and ignored)."""
    return h2raw.read_until_closed(s, timeout)[0]


def test_silent_connections_are_closed_and_capped(make_upstream, make_sidecar, tmp_path):
    """Connections that only hold a descriptor: TCP connected, no TLS
    ClientHello (TLS link) or no HTTP/2 preface (h2c, which had no timer at
    all: 20,000 of them used every descriptor and took the admin port down
    too).  With --max-connections 100 and a 1 s handshake timeout, 300 such
    sockets: at most 100 are held, the rest are closed at once
    (conn.refused), /healthz answers throughout, every held one is closed
    within the timeout, and then a legit call succeeds."""
    echo = make_upstream()
    for tls in (True, False):
        sc = make_sidecar("--max-connections", "100", "--tls-handshake-timeout", "1", upstream=echo, tls=tls)
        socks = silent_sockets(sc.port, 300)
        t0 = time.monotonic()
        assert healthz(sc) in (200, 503), "the admin port does not answer"
        refused_at_once = sum(closed_by_peer(s, 0.5) for s in socks[100:])
        closed = sum(closed_by_peer(s, 3.0 * SLOW) for s in socks[:100])
        took = time.monotonic() - t0
        for s in socks:
            s.close()
        print(f"silent {'TLS' if tls else 'h2c'}: {len(socks)} sockets, {refused_at_once} of the last 200 refused "
              f"at once, {closed} of the first 100 closed within {took:.1f} s")
        assert refused_at_once == 200, refused_at_once
        assert closed == 100
        wait_for(lambda: healthz(sc) == 200, 5 * SLOW, "/healthz SERVING")
        if tls:
            assert unary(sc.channel(), "Unary", b"after") == b"after"
        else:
            ch = grpc.insecure_channel(f"127.0.0.1:{sc.port}")
            assert unary(ch, "Unary", b"after") == b"after"
        refused = [e for e in sc.events.all() if e["event"] == "conn.refused"]
        assert refused and refused[0]["max_connections"] == 100
        if not tls:  # h2c connections are open (conn.open) from the start: their close says why
            reasons = [e["reason"] for e in sc.events.all() if e["event"] == "conn.close"]
            assert sum("no HTTP/2 preface within 1s" in r for r in reasons) == 100, reasons[:3]


def test_zero_window_clients_cannot_exhaust_memory(link, echo):
    """4 connections that announce a zero stream window and ask 1000 x 300 KiB
    each: the upstream answers at once, nothing can go to the client.
    Before, the sidecar buffered a whole stream window (256 KiB) per
    stream: 1.07 GB for 4 connections, held after they closed.  Now an
    upstream stream is granted one buffer block (16 KiB) until its client
    takes bytes, so the sidecar's peak RSS stays under 128 MiB (78 MiB
    here), and heap pages go back to the system after the calls end (18 MiB
    after, within 8 s).  Legit latency is not asserted here: 4000 calls of
    300 KiB saturate the Python upstream itself (measured: calls made
    directly to it during the attack, p99 4.0 s, 1 failed; through the
    sidecar p99 2.0 s; the sidecar used 0.8 s of CPU).  After the attack a
    call succeeds."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=link.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    base = link.rss()["VmRSS"]
    socks = [tls_h2(link, ctx) for _ in range(4)]
    with LegitCaller(link.channel()) as legit:
        for s in socks:
            s.sendall(zero_window_burst(1000, 300 * 1024))
        # The upstream answers as fast as it can build 300 KiB replies: wait
        # until the sidecar's memory has not grown for 2 s (at most 60 s).
        t0, last, still = time.monotonic(), 0, time.monotonic()
        while time.monotonic() - t0 < 60 * SLOW and time.monotonic() - still < 2.0:
            time.sleep(0.2)
            now = link.rss()["VmRSS"]
            if now > last + 1024:
                last, still = now, time.monotonic()
        peak = link.rss()["VmHWM"]
        for s in socks:
            s.close()
        link.events.wait("conn.close", count=4, timeout=10 * SLOW)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 8 and link.rss()["VmRSS"] > base + 32 * 1024:
            time.sleep(0.2)
    after = link.rss()["VmRSS"]
    print(f"zero window 4 x 1000 x 300 KiB: sidecar RSS {base / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB, "
          f"{after / 1024:.1f} MiB after; legit p99 {legit.p99() * 1000:.0f} ms, {len(legit.failures)} failed")
    assert peak < 128 * 1024, f"peak RSS {peak / 1024:.1f} MiB"
    assert after < base + 32 * 1024, f"RSS after {after / 1024:.1f} MiB (before {base / 1024:.1f})"
    assert unary(link.channel(), "Unary", b"after", timeout=30) == b"after"


def metric(sc, name: str) -> float:
    """One sample of the sidecar's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{sc.admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def slow_reader_burst(streams: int, size: int) -> bytes:
    """A client that takes the first 16 KiB of each response and then reads
    nothing: stream window 16 KiB, the connection window opened wide, then
    |streams| unary calls to Sized asking |size| bytes.  Taking bytes is what
    widens a call's upstream window to --stream-window."""
    settings = h2raw.frame(h2raw.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 16384))
    wide = h2raw.frame(h2raw.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30))
    return settings + wide + zero_window_burst(streams, size)[len(settings):]


def test_call_and_buffer_budgets_bound_memory(make_upstream, make_sidecar):
    """--max-calls 400 --max-buffer 8M against 2 connections of 200 slow
    readers (each takes 16 KiB of a 300 KiB answer, which widens its upstream
    window, then reads nothing) and then 8 connections asking 300 calls each
    with a zero window (calls that can never finish).  Calls open never
    exceed the cap (the rest are refused, or give way), the pool never
    exceeds 8 MiB (the widenings beyond it are refused, the calls go on with
    16 KiB), peak RSS stays under 64 MiB, and a legit client on its own
    connection keeps succeeding: at the cap, a call of the client holding the
    most calls gives way to a client holding fewer.  The sidecar uses little
    CPU (0.3 s over the 6 s measured); the legit calls' latency is the
    Python upstream's, which builds every reply the attack asks (2.7 s of its
    CPU; legit p99 1.6-1.8 s here), so it is bounded loosely (5 s)."""
    echo = make_upstream()
    sc = make_sidecar("--max-calls", "400", "--max-buffer", "8M", upstream=echo)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=sc.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    base = sc.rss()["VmRSS"]
    cpu0, up0 = cpu_seconds(sc.proc.pid), cpu_seconds(echo.proc.pid)
    most_open = pool_most = 0.0

    def watch(seconds: float):
        """Samples calls open and the pool's use every 0.1 s for |seconds|."""
        nonlocal most_open, pool_most
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            most_open = max(most_open, metric(sc, "flower_sidecar_calls_open"))
            pool_most = max(pool_most, metric(sc, 'flower_sidecar_buffer_pool_bytes{state="used"}'))
            time.sleep(0.1)

    with LegitCaller(sc.channel()) as legit:
        slow = [tls_h2(sc, ctx) for _ in range(2)]
        for s in slow:
            s.sendall(slow_reader_burst(200, 300 * 1024))
        watch(2 * SLOW)
        refusals = metric(sc, "flower_sidecar_buffer_pool_refusals_total")
        socks = [tls_h2(sc, ctx) for _ in range(8)]
        for s in socks:
            s.sendall(zero_window_burst(300, 64 * 1024))
        watch(4 * SLOW)
        peak = sc.rss()["VmHWM"]
        cpu, up_cpu = cpu_seconds(sc.proc.pid) - cpu0, cpu_seconds(echo.proc.pid) - up0
        refused = metric(sc, "flower_sidecar_calls_refused_total")
        evicted = metric(sc, "flower_sidecar_calls_evicted_total")
        for s in socks + slow:
            s.close()
    print(f"budgets: calls open at most {most_open:.0f} (cap 400), {refused:.0f} refused, {evicted:.0f} evicted; "
          f"pool at most {pool_most / 2**20:.1f} MiB (cap 8), {refusals:.0f} widenings refused; RSS {base / 1024:.1f} "
          f"MiB before, peak {peak / 1024:.1f} MiB; legit {len(legit.latencies)} ok, p99 "
          f"{legit.p99() * 1000:.0f} ms, {len(legit.failures)} failed {legit.failures[:2]}; CPU over 6 s: sidecar "
          f"{cpu:.2f} s, upstream {up_cpu:.2f} s")
    assert most_open <= 400
    assert refused + evicted > 0
    assert 0 < pool_most <= 8 * 2**20
    assert refusals > 0
    assert peak < 64 * 1024, f"peak RSS {peak / 1024:.1f} MiB"
    assert cpu < 1.5 * SLOW, f"sidecar CPU {cpu:.2f} s"
    assert len(legit.failures) <= 1 and legit.p99() < 5.0 * SLOW
    assert unary(sc.channel(), "Unary", b"after", timeout=30) == b"after"


def test_the_admin_port_cannot_be_locked(link):
    """300 connections to the admin port that send the HTTP/2 preface and
    nothing else.  Before, the preface stopped the 10 s request timer and 256
    of them held every admin slot for good: /healthz and the READY_SCRIPT
    were locked out.  Now a new connection takes the place of the oldest one
    that serves no Watch, and one that opens no stream is closed after 10 s
    (30 s once it has served a request); /healthz answers throughout."""
    socks = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", link.admin_port), timeout=5)
        s.sendall(h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0))
        socks.append(s)
    t0 = time.monotonic()
    answers = []
    while time.monotonic() - t0 < 2:
        answers.append(healthz(link))
        time.sleep(0.1)
    closed = sum(closed_by_peer(s, 0.01) for s in socks)
    print(f"admin: {len(socks)} preface-only connections, /healthz {answers.count(200)} of {len(answers)} answered "
          f"SERVING, {closed} already closed")
    assert answers and all(a == 200 for a in answers), answers
    # The oldest went to make room; the rest go when their request timer ends.
    wait_for(lambda: all(closed_by_peer(s, 0.01) for s in socks), 15 * SLOW, "the idle admin connections to close")
    for s in socks:
        s.close()


def test_watch_streams_are_capped(link):
    """Watch streams cost the sidecar a stream each for as long as the
    client likes (50k of them took 83 MB): at most 1024 in all; the next
    one ends RESOURCE_EXHAUSTED at once, and Check keeps answering."""
    chans = [grpc.insecure_channel(f"127.0.0.1:{link.admin_port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                             ("grpc.channel_id", i)])
             for i in range(3)]
    watches = []
    for i in range(1024):
        call = chans[i % 2].unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=60)
        watches.append(call)
    first = [next(w) for w in watches[:5]]
    wait_for(lambda: len([e for e in watches if e.is_active()]) == 1024, 10 * SLOW, "1024 Watch streams")
    over = chans[2].unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=10)
    try:
        list(over)
        raise AssertionError("the 1025th Watch was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    check = chans[2].unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
    assert check == b"\x08\x01" and first[0] == b"\x08\x01"  # SERVING
    for w in watches:
        w.cancel()
    for c in chans:
        c.close()


# 20,000 PRIORITY frames on stream 1 (no stream opened); 20,000 connection
# WINDOW_UPDATEs of 1 byte, nothing received to justify them; a request,
# then 20,000 empty DATA frames without END_STREAM.
FLOODS = floods()


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_frame_floods_close_the_connection(link, kind):
    """Frames that carry nothing cost work: PRIORITY beyond 100 per stream,
    WINDOW_UPDATE beyond 100 + 10 per DATA frame sent, more than 10 empty
    DATA frames in a row.  The flooding connection is closed with GOAWAY
    ENHANCE_YOUR_CALM, conn.close says why, other clients are unharmed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=link.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    s = tls_h2(link, ctx)
    with LegitCaller(link.channel()) as legit:
        time.sleep(0.2)
        try:
            s.sendall(FLOODS[kind]())
        except OSError:
            pass  # closed mid-send: what we want
        closed, got = h2raw.read_until_closed(s, 10 * SLOW)
        time.sleep(0.3)
    s.close()
    goaways = [struct.unpack(">I", f[3][4:8])[0] for f in h2raw.frames_in(got) if f[0] == h2raw.GOAWAY]
    assert closed and 0xB in goaways, (closed, goaways)
    assert not legit.failures and legit.latencies, legit.failures[:3]
    wait_for(lambda: [e for e in link.events.all() if e["event"] == "conn.close" and "flood" in e["reason"]],
             5 * SLOW, "conn.close saying flood")


def test_a_reading_client_is_not_a_flood(link):
    """A 32 MiB download in 16 KiB DATA frames: grpcio's WINDOW_UPDATEs for it
    stay within the limit."""
    big = b"y" * (32 << 20)
    assert unary(link.channel(), "Unary", big, timeout=60) == big
    assert not [e for e in link.events.all() if e["event"] == "conn.close" and "flood" in e.get("reason", "")]
