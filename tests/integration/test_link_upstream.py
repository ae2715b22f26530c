"""flower-sidecar link: upstream faults.  The SuperLink behind the sidecar is
down, dies with kill -9 mid-call, or resets a stream; clients must get
UNAVAILABLE (the one status Flower retries) with a message that says what
happened, and the sidecar must recover by itself.
"""

from __future__ import annotations

import socket
import time

import grpc

import h2raw
from conftest import SLOW, Bidi, make_ca, make_server_cert, rpc_error, unary, wait_for


def _unavailable_from_sidecar(err: grpc.RpcError, upstream: str) -> str:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    msg = err.details()
    assert msg.startswith("flower-sidecar:"), msg
    assert upstream in msg, msg
    # Flower 1.26 gives up for good on this phrase.
    assert "handshake failed" not in msg.lower(), msg
    return msg


def _call_until_ok(ch, timeout: float) -> tuple[bytes, list]:
    """Unary calls until one succeeds; (response, errors seen before)."""
    errors = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            return unary(ch, "Unary", b"back", timeout=5), errors
        except grpc.RpcError as e:
            errors.append((e.code(), e.details()))
            if time.monotonic() > deadline:
                raise AssertionError(f"no successful call within {timeout} s: {errors[-3:]}") from None
            time.sleep(0.1)


def test_upstream_not_running_then_started(make_upstream, make_sidecar):
    up = make_upstream(start=False)  # a free port with nothing on it yet
    sc = make_sidecar(upstream=up, wait_upstream=False)
    ch = sc.channel()
    t0 = time.monotonic()
    err = rpc_error(unary, ch, "Unary", b"x", timeout=20)
    elapsed = time.monotonic() - t0
    msg = _unavailable_from_sidecar(err, up.address)
    assert "refused" in msg, msg  # the reason, not just "failed"
    assert elapsed < 3 * SLOW, f"failing took {elapsed:.1f} s"  # fast: no waiting for a deadline
    ev = sc.events.wait("rpc.error", method="/test.Echo/Unary")
    assert ev["grpc_status"] == 14 and ev["grpc_message"].startswith("flower-sidecar:"), ev
    # Refused: nothing listens, so nothing was reached: probes, not a backoff
    # delay, look for the SuperLink (README, "Getting the upstream back").
    assert not sc.events.find("upstream.backoff"), sc.events.find("upstream.backoff")
    assert "probing every" in msg or "in progress" in msg, msg

    # The SuperLink comes up: the same sidecar, same client channel, works.
    up.start()
    pid = sc.pid
    resp, _ = _call_until_ok(ch, 5 * SLOW)
    assert resp == b"back"
    assert sc.pid == pid and sc.alive()
    sc.events.wait("upstream.up")


def test_upstream_killed_mid_stream(make_upstream, make_sidecar):
    up = make_upstream()
    sc = make_sidecar(upstream=up)
    a, b, c = sc.channel(), sc.channel(), sc.channel()
    stream = Bidi(a)
    stream.send(b"one")
    assert stream.recv() == b"one"
    assert unary(b, "Unary", b"b1") == b"b1"
    # A unary call waiting for its answer, like every Fleet call: Flower
    # retries it only if it ends UNAVAILABLE.
    sleeps = up.count("Sleep")
    waiting = c.unary_unary("/test.Echo/Sleep").future(b"30", timeout=60)
    wait_for(lambda: up.count("Sleep") > sleeps, 5 * SLOW, "Sleep to reach the upstream")
    mark = sc.events.mark()

    up.kill9()

    # Both calls in flight end with UNAVAILABLE from the sidecar, at once.
    t0 = time.monotonic()
    _unavailable_from_sidecar(waiting.exception(timeout=5 * SLOW), up.address)
    stream.send(b"two")
    _unavailable_from_sidecar(rpc_error(stream.recv), up.address)
    stream.done()
    assert time.monotonic() - t0 < 3 * SLOW
    down = sc.events.wait("upstream.down", since=mark)
    assert down["upstream"] == up.address and down["reason"], down

    # The sidecar keeps serving: the other connection and a brand-new one get
    # a quick, well-formed UNAVAILABLE instead of hanging.
    for ch in (b, sc.channel()):
        t0 = time.monotonic()
        err = rpc_error(unary, ch, "Unary", b"x", timeout=20)
        _unavailable_from_sidecar(err, up.address)
        assert time.monotonic() - t0 < 3 * SLOW
    assert sc.alive()

    # Restarted on the same port: calls succeed again, no sidecar restart.
    up.start()
    resp, _ = _call_until_ok(b, 5 * SLOW)
    assert resp == b"back"
    sc.events.wait("upstream.up", since=mark)
    stream2 = Bidi(a)
    stream2.send(b"three")
    assert stream2.recv() == b"three"
    stream2.done()
    assert sc.alive()


def test_upstream_rst_stream_reaches_client(make_sidecar):
    # A real RST_STREAM(INTERNAL_ERROR) from the upstream after one message:
    # the client gets the message, then the call fails (not hangs), and the
    # upstream connection stays usable for the next call.
    rst = h2raw.RstUpstream(code=h2raw.INTERNAL_ERROR, message=b"partial")
    try:
        sc = make_sidecar(upstream=rst.address)
        ch = sc.channel()
        for attempt in range(2):
            call = ch.unary_stream("/test.Echo/ServerStream")(b"10,10", timeout=10)
            got = []
            t0 = time.monotonic()
            try:
                for m in call:
                    got.append(m)
                raise AssertionError(f"stream ended OK after {got!r}")
            except grpc.RpcError as e:
                err = e
            assert time.monotonic() - t0 < 5 * SLOW
            assert got == [b"partial"], got
            assert err.code() == grpc.StatusCode.INTERNAL, (err.code(), err.details())
        wait_for(lambda: rst.resets_sent >= 2, 2, "two resets")
        ev = sc.events.wait("rpc.error", method="/test.Echo/ServerStream")
        assert "reset" in ev["grpc_message"], ev
        assert len(sc.events.find("upstream.up")) == 1  # the connection survived the resets
    finally:
        rst.stop()


def test_upstream_that_never_speaks_http2(make_sidecar):
    # A port that accepts TCP but never answers (a hung SuperLink, a wrong
    # service): calls fail with UNAVAILABLE after --connect-timeout, they do
    # not hang until the client's deadline.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    addr = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        sc = make_sidecar("--connect-timeout", "1", upstream=addr, wait_upstream=False)
        ch = sc.channel()
        t0 = time.monotonic()
        err = rpc_error(unary, ch, "Unary", b"x", timeout=30)
        elapsed = time.monotonic() - t0
        msg = _unavailable_from_sidecar(err, addr)
        assert "SETTINGS" in msg or "timeout" in msg.lower() or "timed out" in msg.lower(), msg
        assert elapsed < 4 * SLOW, f"took {elapsed:.1f} s with --connect-timeout 1"
        assert sc.alive()
    finally:
        silent.close()


def test_upstream_speaking_tls_instead_of_h2c(make_sidecar, make_upstream, tmp_path):
    # SuperLink started without --insecure behind a link sidecar: a
    # misconfiguration the operator must be able to see in the message.
    ca = make_ca(tmp_path / "pki")
    cert, key = make_server_cert(tmp_path / "pki", ca)
    up = make_upstream("--tls-cert", str(cert), "--tls-key", str(key))
    sc = make_sidecar("--connect-timeout", "2", upstream=up, wait_upstream=False)
    ch = sc.channel()
    t0 = time.monotonic()
    err = rpc_error(unary, ch, "Unary", b"x", timeout=30)
    _unavailable_from_sidecar(err, up.address)
    assert time.monotonic() - t0 < 5 * SLOW
    assert sc.alive()
    assert not sc.events.find("upstream.up")
