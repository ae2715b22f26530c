"""flower-sidecar link: the gRPC data path between real grpcio clients and a
real grpcio upstream (echo_server.py), over real TLS verified with the
auto-generated CA.

    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_link_proxy.py
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
import time

import grpc
import pytest

import h2raw
import procs
from conftest import HOST, PY, SIDECAR, SLOW, Bidi, rpc_error, unary, wait_for


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_unary_metadata_and_trailers_over_verified_tls(link, echo, host):
    # The client verifies the sidecar's certificate against ca.pem for both
    # names a SuperNode may dial; grpcio refuses anything else.
    ch = link.channel(host)
    resp, call = ch.unary_unary("/test.Echo/Unary").with_call(
        b"hello \x00\xff bytes", metadata=[("x-echo-a", "1"), ("x-echo-bin-bin", b"\x00\x01\xfe")], timeout=10)
    assert resp == b"hello \x00\xff bytes"
    assert call.code() == grpc.StatusCode.OK
    initial = dict(call.initial_metadata())
    assert initial.get("x-echo-a") == "1"
    assert initial.get("x-echo-bin-bin") == b"\x00\x01\xfe"  # binary metadata survives the hop
    assert ("x-trailer", "done") in [(m.key, m.value) for m in call.trailing_metadata()]
    opened = link.events.wait("conn.open")
    assert opened["alpn"] == "h2" and opened["tls_version"].startswith("TLS"), opened
    assert echo.count("Unary") == 1


@pytest.mark.parametrize("code", [
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED])
def test_error_status_and_message_pass_through(link, code):
    # Flower decides retry or give-up from the status: it must arrive as the
    # upstream sent it, and be logged as rpc.error.
    ch = link.channel()
    err = rpc_error(unary, ch, "Fail", b"%d" % code.value[0])
    assert err.code() == code
    assert err.details() == "failing on purpose: %d" % code.value[0]
    ev = link.events.wait("rpc.error", method="/test.Echo/Fail")
    assert ev["grpc_status"] == code.value[0], ev
    assert ev["grpc_message"] == "failing on purpose: %d" % code.value[0], ev
    assert ev["level"] == "warn"


def test_server_streaming_order_and_content(link):
    ch = link.channel()
    msgs = list(ch.unary_stream("/test.Echo/ServerStream")(b"300,5000", timeout=30))
    assert len(msgs) == 300
    assert all(m == bytes([i % 256]) * 5000 for i, m in enumerate(msgs))


def test_client_streaming_count_and_bytes(link):
    ch = link.channel()
    reqs = [bytes([i % 256]) * (i * 97 % 70000) for i in range(200)]
    resp = ch.stream_unary("/test.Echo/ClientStream")(iter(reqs), timeout=30)
    assert resp == b"%d,%d" % (len(reqs), sum(map(len, reqs)))


def test_bidi_streaming_interleaved(link):
    # Each message goes out only after the previous echo came back: the
    # sidecar must forward both directions while the stream stays open.
    ch = link.channel()
    b = Bidi(ch)
    try:
        for i in range(100):
            m = b"ping-%d-" % i + bytes([i]) * (i * 1000)
            b.send(m)
            assert b.recv() == m
    finally:
        b.done()
    assert list(b.call) == []
    assert b.call.code() == grpc.StatusCode.OK


def test_500_concurrent_calls_over_50_connections(link, echo):
    channels = [link.channel("127.0.0.1") for _ in range(50)]
    before = echo.count("Unary")
    futures = {}
    for i, ch in enumerate(channels):
        stub = ch.unary_unary("/test.Echo/Unary")
        for j in range(10):
            req = b"call-%d-%d" % (i, j) + bytes(range(256)) * (j + 1)
            futures[req] = stub.future(req, timeout=60 * SLOW)
    bad = []
    for req, fut in futures.items():
        try:
            if fut.result() != req:
                bad.append((req[:12], "wrong payload"))
        except grpc.RpcError as e:
            bad.append((req[:12], e.code(), e.details()))
    assert not bad, f"{len(bad)} of 500 calls failed, e.g. {bad[:5]}\n{link.logs(20)}"
    assert echo.count("Unary") - before == 500
    # Really 50 connections, and each carried its 10 calls.
    link.events.wait("conn.open", count=50)
    link.close_channels()
    link.events.wait("conn.close", count=50, timeout=15)
    closes = link.events.find("conn.close")
    assert len(closes) == 50
    assert sorted(c["rpcs"] for c in closes) == [10] * 50


def test_client_deadline_reaches_upstream(link, echo):
    ch = link.channel()
    before = echo.cancelled()
    err = rpc_error(unary, ch, "Sleep", b"5", timeout=0.5)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    t0 = time.monotonic()
    wait_for(lambda: echo.cancelled() > before, 1.5 * SLOW, "the upstream to see the cancellation")
    assert time.monotonic() - t0 < 1.5 * SLOW


def test_client_cancel_reaches_upstream(link, echo):
    # No deadline at all: only the sidecar passing the client's RST_STREAM on
    # can stop the upstream handler.
    ch = link.channel()
    before_calls, before = echo.count("Sleep"), echo.cancelled()
    fut = ch.unary_unary("/test.Echo/Sleep").future(b"30")
    wait_for(lambda: echo.count("Sleep") > before_calls, 5 * SLOW, "Sleep to reach the upstream")
    fut.cancel()
    t0 = time.monotonic()
    wait_for(lambda: echo.cancelled() > before, 1.5 * SLOW, "the upstream to see the cancellation")
    assert time.monotonic() - t0 < 1.5 * SLOW
    ev = link.events.wait("rpc.error", method="/test.Echo/Sleep")
    assert ev["grpc_status"] == grpc.StatusCode.CANCELLED.value[0], ev


def test_upstream_abort_mid_stream_reaches_client(link):
    # The upstream sends 5 messages, then fails the call: the client sees the
    # 5 messages and then exactly the upstream's status and message.
    ch = link.channel()
    call = ch.unary_stream("/test.Echo/Abort")(b"5,%d" % grpc.StatusCode.ABORTED.value[0], timeout=10)
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for m in call:
            got.append(m)
    assert got == [b"msg-%d" % i for i in range(5)]
    assert ei.value.code() == grpc.StatusCode.ABORTED
    assert ei.value.details() == "aborted after 5 messages"
    ev = link.events.wait("rpc.error", method="/test.Echo/Abort")
    assert ev["grpc_status"] == grpc.StatusCode.ABORTED.value[0] and ev["grpc_message"] == "aborted after 5 messages"


def _max_msg_sidecar(echo, make_sidecar):
    return make_sidecar("--max-message-size", "1M", upstream=echo)


def test_max_message_size_request(echo, make_sidecar):
    sc = _max_msg_sidecar(echo, make_sidecar)
    ch = sc.channel()
    # Up to the limit, inclusive, passes.
    for n in (1000, 512 * 1024, 1024 * 1024):
        assert unary(ch, "Sink", b"s" * n).startswith(b"%d," % n)
    err = rpc_error(unary, ch, "Sink", b"s" * (2 * 1024 * 1024))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("flower-sidecar:"), err.details()
    assert "--max-message-size" in err.details()
    # One byte over is over.
    err = rpc_error(unary, ch, "Sink", b"s" * (1024 * 1024 + 1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection is still good afterwards.
    assert unary(ch, "Unary", b"after") == b"after"
    ev = sc.events.wait("rpc.error", method="/test.Echo/Sink")
    assert ev["grpc_status"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_max_message_size_response(echo, make_sidecar):
    sc = _max_msg_sidecar(echo, make_sidecar)
    ch = sc.channel()
    assert len(unary(ch, "Random", b"%d,1" % (1024 * 1024))) == 1024 * 1024
    err = rpc_error(unary, ch, "Random", b"%d,1" % (2 * 1024 * 1024))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("flower-sidecar:"), err.details()
    assert unary(ch, "Unary", b"after") == b"after"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener(echo, make_sidecar):
    sc = make_sidecar(upstream=echo, listen_host="::1")
    ch = sc.channel("ipv6:[::1]")
    assert unary(ch, "Unary", b"over v6") == b"over v6"
    ev = sc.events.wait("conn.open")
    assert ev["peer"].startswith("[::1]:"), ev
    # Only ::1 listens: IPv4 loopback on the same port is not the sidecar.
    with pytest.raises(OSError):
        socket.create_connection((HOST, sc.port), timeout=2).close()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_upstream(make_upstream, make_sidecar):
    up = make_upstream(host="::1")
    sc = make_sidecar(upstream=up)
    assert unary(sc.channel(), "Unary", b"to v6") == b"to v6"
    # Logged the way it was configured, so that the port is unambiguous.
    assert sc.events.find("upstream.up")[0]["upstream"] == f"[::1]:{up.port}"


def test_more_calls_than_the_upstream_stream_limit(make_upstream, make_sidecar):
    # An upstream that takes 4 streams per connection: the sidecar opens more
    # upstream connections (--upstream-conns, 8 for link) and queues the rest;
    # every call still completes.
    up = make_upstream("--max-concurrent-streams", "4")
    sc = make_sidecar(upstream=up)
    ch = sc.channel()
    stub = ch.unary_unary("/test.Echo/Sleep")
    t0 = time.monotonic()
    futs = [stub.future(b"0.5", timeout=30 * SLOW) for _ in range(48)]
    results = []
    for f in futs:
        try:
            results.append(f.result())
        except grpc.RpcError as e:
            results.append((e.code(), e.details()))
    bad = [r for r in results if r != b"slept"]
    assert not bad, f"{len(bad)} of 48 failed: {bad[:3]}\n{sc.logs(20)}"
    # 48 calls of 0.5 s through at most 8 x 4 streams: two waves, not 48.
    assert time.monotonic() - t0 < 5 * SLOW


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_churn_leaks_nothing(link):
    # A daemon that runs for months: 300 connections that each make one call
    # and go away must leave no descriptors (and, under ASan, no leaks)
    # behind.
    assert unary(link.channel(), "Unary", b"warm") == b"warm"
    link.close_channels()
    link.events.wait("conn.close")
    base_fds = _open_fds(link.pid)
    for i in range(300):
        ch = link.channel()
        assert unary(ch, "Unary", b"%d" % i) == b"%d" % i
        link.close_channels()
    link.events.wait("conn.close", count=301, timeout=20)
    assert _open_fds(link.pid) <= base_fds, sorted(os.listdir(f"/proc/{link.pid}/fd"))
    assert link.rss()["VmRSS"] < 64 * 1024


def _idle_h2_over_tls(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """A TLS + HTTP/2 connection that has exchanged SETTINGS both ways (the
    sidecar has acknowledged ours, so its session read the preface) and then
    stays silent."""
    s = ctx.wrap_socket(socket.create_connection((HOST, port), timeout=10), server_hostname=HOST)
    assert s.selected_alpn_protocol() == "h2"
    s.sendall(h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0))
    buf, acked = bytearray(), False
    while not acked:
        f = h2raw.read_frame(s, buf)
        assert f is not None, "sidecar closed an idle connection during its set-up"
        if f[0] == h2raw.SETTINGS and f[1] & h2raw.ACK:
            acked = True
        elif f[0] == h2raw.SETTINGS:
            s.sendall(h2raw.frame(h2raw.SETTINGS, h2raw.ACK, 0))
    return s


@pytest.mark.skipif(os.path.basename(SIDECAR) != "flower-sidecar",
                    reason="RSS per connection means something only for the normal build")
def test_idle_connections_stay_small(link):
    # Thousands of SuperNodes each hold a connection open: an idle TLS +
    # HTTP/2 connection must cost what OpenSSL and nghttp2 need (about 14 +
    # 9 kB, bench/README.md; 25 kB measured here), not what it cost with
    # nghttp2's buffers on malloc (34 kB here, 40 kB in the bench; see
    # proxy/h2mem.c).
    n = 600
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 200), hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=link.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    warm = [_idle_h2_over_tls(ctx, link.port) for _ in range(50)]
    before = link.rss()["VmRSS"]
    conns = [_idle_h2_over_tls(ctx, link.port) for _ in range(n)]
    per_conn_kb = (link.rss()["VmRSS"] - before) * 1.024 / n
    for s in warm + conns:
        s.close()
    print(f"link: {per_conn_kb:.1f} kB per idle TLS + HTTP/2 connection ({n} connections)")
    assert per_conn_kb < 30, f"{per_conn_kb:.1f} kB per idle connection"
    link.events.wait("conn.close", count=n + 50, timeout=20)
    assert unary(link.channel(), "Unary", b"after") == b"after"


def test_request_headers_over_the_limit(link, echo):
    ch = link.channel()
    before = echo.count("Unary")
    err = rpc_error(ch.unary_unary("/test.Echo/Unary"), b"x", metadata=[("x-big", "v" * 20000)], timeout=10)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("flower-sidecar:") and "--max-header-list-size" in err.details(), err.details()
    assert unary(ch, "Unary", b"after") == b"after"
    assert echo.count("Unary") == before + 1  # the oversized call never reached the upstream


CLIENT = """
import sys, grpc
ch = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials(open(sys.argv[2], "rb").read()))
ch.unary_unary("/test.Echo/Sleep")(b"60", timeout=120)
"""


def test_client_process_killed_cancels_upstream_call(link, echo, tmp_path):
    # A SuperNode that dies (kill -9) mid-call: its TCP connection goes away,
    # and the upstream handler must be cancelled, not left running.
    before_calls, before = echo.count("Sleep"), echo.cancelled()
    client = procs.start([PY, "-c", CLIENT, f"localhost:{link.port}", str(link.tls_dir / "ca.pem")],
                         str(tmp_path / "client.log"))
    try:
        wait_for(lambda: echo.count("Sleep") > before_calls, 10 * SLOW, "Sleep to reach the upstream")
        client.kill()  # SIGKILL, by PID
        client.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(lambda: echo.cancelled() > before, 2 * SLOW, "the upstream to see the cancellation")
        assert time.monotonic() - t0 < 2 * SLOW
    finally:
        procs.stop(client)
    ev = link.events.wait("conn.close")
    assert ev["rpcs"] == 1, ev


def test_an_oversized_header_fails_alone(link, echo):
    """One client's request with a header near grpcio's 8 KiB metadata limit
    must end alone: a gRPC server that receives it ends the whole shared
    upstream connection, failing every other client's calls with
    RESOURCE_EXHAUSTED, which Flower does not retry.  Sizes sweep across the
    limit while five calls are in flight on the same upstream connection;
    each request either passes or ends with the sidecar's own message, and
    the calls in flight all succeed."""
    ch = link.channel()
    other = link.channel()
    in_flight = [other.unary_unary("/test.Echo/Sleep").future(b"3", timeout=20) for _ in range(5)]
    wait_for(lambda: echo.count("Sleep") >= 5, 10 * SLOW, "the calls in flight to reach the upstream")
    refused = 0
    for size in range(7500, 8400, 25):
        try:
            assert unary(ch, "Unary", b"x", metadata=[("x-big", "v" * size)], timeout=10) == b"x"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, e.code(), e.details())
            assert e.details().startswith("flower-sidecar:") and "--max-header-list-size" in e.details(), e.details()
            refused += 1
    assert refused > 0, "no request was large enough to be refused: the sweep misses the limit"
    assert [f.result() for f in in_flight] == [b"slept"] * 5
