"""flower-sidecar link: graceful shutdown.  On SIGTERM the listener closes at
once, calls in flight finish (up to --drain-timeout), and the process exits
0 (README.md, "Flags": 0 after a clean shutdown).
"""

from __future__ import annotations

import signal
import socket
import time

import grpc
import pytest

from conftest import HOST, SLOW, wait_for


def _refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_call_in_flight_finish(echo, make_sidecar, sig):
    sc = make_sidecar(upstream=echo)
    ch = sc.channel()
    before = echo.count("Sleep")
    fut = ch.unary_unary("/test.Echo/Sleep").future(b"2", timeout=30)
    wait_for(lambda: echo.count("Sleep") > before, 5 * SLOW, "Sleep to reach the upstream")

    t0 = time.monotonic()
    sc.signal(sig)
    ev = sc.events.wait("sidecar.drain")
    assert ev["signal"] == sig.name, ev
    # New connections are refused from now on (the listener is closed).
    wait_for(lambda: _refused(sc.port), 1 * SLOW, "the listener to close")

    assert fut.result() == b"slept"
    assert fut.code() == grpc.StatusCode.OK
    rc = sc.wait_exit(10 * SLOW)  # the default drain time
    elapsed = time.monotonic() - t0
    assert rc == 0, sc.logs()
    assert elapsed < 5 * SLOW, f"exit took {elapsed:.1f} s after a 2 s call"
    sc.events.wait("sidecar.stop")
    assert echo.cancelled() == 0


def test_drain_timeout_cuts_long_calls(echo, make_sidecar):
    sc = make_sidecar("--drain-timeout", "1", upstream=echo)
    ch = sc.channel()
    before = echo.count("Sleep")
    fut = ch.unary_unary("/test.Echo/Sleep").future(b"10", timeout=30)
    wait_for(lambda: echo.count("Sleep") > before, 5 * SLOW, "Sleep to reach the upstream")

    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    rc = sc.wait_exit(5 * SLOW)
    elapsed = time.monotonic() - t0
    assert rc == 0, sc.logs()
    assert 0.8 < elapsed < 2.5 * SLOW, f"exited {elapsed:.2f} s after SIGTERM with --drain-timeout 1"
    # The cut call fails for the client (it does not pretend success), and
    # the upstream's handler is cancelled rather than left running.
    err = fut.exception(timeout=10)
    assert err is not None and err.code() != grpc.StatusCode.OK
    wait_for(lambda: echo.cancelled() >= 1, 3 * SLOW, "the upstream Sleep to be cancelled")
