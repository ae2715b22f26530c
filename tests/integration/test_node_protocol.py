"""flower-sidecar node: what a SuperNode behind the node sidecar relies on when
its WAN link to the SuperLink misbehaves (issue 5, /tmp/node-spec.md).

Real peers on loopback: python3-grpcio clients (the SuperNode side), a
python3-grpcio Fleet server (node_peers.py run as a script: stock or strict
ping policy, TLS) and, for faults grpcio cannot produce on cue, a raw h2c
server on a socket (node_peers.RawUpstream) that refuses streams, sends
GOAWAY, drops a connection after reading a request, goes silent, or answers
too_many_pings -- and records every stream and PING it got.

    make -s all build/flower-sidecar-asan
    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_node_protocol.py
    FS_SIDECAR_BIN=build/flower-sidecar-asan /usr/bin/python3 -m pytest ... (same file)

Scenarios:
 1. safe retry: RST_STREAM(REFUSED_STREAM), and a stream above a GOAWAY's
    last-stream-id, are repeated even for PushMessages (the upstream never
    processed them);
 2. a connection lost after the whole request was read: never repeated for
    PushMessages/PullMessages/ConfirmMessageReceived/Register/Activate/
    Deactivate/UnregisterNode (UNAVAILABLE, seen once); repeated on the next
    connection for GetRun, PullObject, PushObject, GetFab (OK, seen twice,
    same bytes); at most 3 repeats; a repeat keeps the hold deadline counted
    from the call's start;
 3. --retry-buffer bounds what can be repeated (0: nothing is); a 5 MiB
    PushObject (Flower's largest chunk) is repeated intact by default;
 4. keepalive: a silent upstream (raw server; and a TLS grpcio server frozen
    with SIGSTOP) is declared dead within time + timeout (+1 s), in-flight
    calls end UNAVAILABLE, health NOT_SERVING; no PINGs while idle; PINGs
    come keepalive-time after the upstream's last byte, and answered PINGs
    keep a slow call alive;
 5. GOAWAY ENHANCE_YOUR_CALM too_many_pings (a strict grpcio server, and a
    raw server that measures the next connection's PING interval): doubled
    keepalive time, no reconnect storm;
 6. a stock grpcio server with default keepalive settings: 200 calls with
    idle gaps, no GOAWAY, no reconnect;
 7. hold (wait-for-ready): a call waits for an upstream that comes up; the
    hold ends at --hold-timeout with "next attempt in" (0: at once) and held
    calls trigger no extra connection attempts; a call's own grpc-timeout
    bounds the hold and an expired call is never sent late; bad flag values
    exit 2;
 8. kill -9 of the upstream: an in-flight PushMessages ends UNAVAILABLE at
    once, an in-flight GetRun is repeated on the restarted upstream.

Every wait is bounded; every process is stopped by PID.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import pytest

import node_peers as peers
import procs
from conftest import (FIGURES, HOST, PY, SIDECAR, SLOW, Events, Sidecar, check_all_clean_exits, make_ca,
                      make_server_cert, rpc_error, wait_for)

HERE = Path(__file__).resolve().parent
NODE_PEERS = str(HERE / "node_peers.py")
FLEET = "flwr.proto.Fleet"
# Timing limits a user notices stay strict; ASan adds a little, not 3x.
SLACK = 0.5 * (SLOW - 1.0)

NEVER_REPEATED = ["PushMessages", "PullMessages", "ConfirmMessageReceived", "RegisterNode", "ActivateNode",
                  "DeactivateNode", "UnregisterNode"]
SIDE_EFFECT_FREE = ["GetRun", "PullObject", "PushObject", "GetFab"]


# --- the node sidecar ------------------------------------------------------------


class NodeSidecar(Sidecar):
    """`flower-sidecar node`: h2c listener for the SuperNode, one connection to
    --upstream (h2c with --no-tls, TLS verified against |tls_ca| otherwise)."""

    def __init__(self, tmp: Path, name: str, upstream: str, flags: list[str], tls_ca: Optional[Path] = None):
        super().__init__(tmp, name, flags, tls=False)
        self.events = Events(self.events.path, "node")
        self.upstream = upstream
        self.tls_ca = tls_ca

    def argv(self) -> list[str]:
        a = [SIDECAR, "node", "--listen", self.listen, "--admin", f"{HOST}:{self.admin_port}",
             "--upstream", self.upstream]
        a += ["--tls-ca", str(self.tls_ca)] if self.tls_ca else ["--no-tls"]
        # Teardown must not wait 10 s for a call a failed test left open.
        return a + ["--drain-timeout", "1"] + self.extra

    def call(self, method: str, req: Optional[bytes] = None, timeout: float = 10.0, sleep: Optional[float] = None,
             ch: Optional[grpc.Channel] = None):
        md = [("x-test-sleep", str(sleep))] if sleep is not None else None
        return (ch or self.fleet).unary_unary(f"/{FLEET}/{method}")(
            peers.fleet_request(method) if req is None else req, timeout=timeout, metadata=md)

    def raw_call(self, method: str, headers: list[tuple[str, str]], timeout: float = 5.0) -> dict:
        """A Fleet call from node_peers.RawClient (headers exactly as given,
        no deadline of its own); its result dict."""
        rc = peers.RawClient(self.port)
        try:
            return rc.call(f"/{FLEET}/{method}", peers.fleet_request(method), headers, timeout=timeout)
        finally:
            rc.close()

    def future(self, method: str, req: Optional[bytes] = None, timeout: float = 10.0, sleep: Optional[float] = None):
        """An asynchronous call; .t_done is set (monotonic) when it completes."""
        md = [("x-test-sleep", str(sleep))] if sleep is not None else None
        fut = self.channel().unary_unary(f"/{FLEET}/{method}").future(
            peers.fleet_request(method) if req is None else req, timeout=timeout, metadata=md)
        fut.t_start = time.monotonic()
        fut.t_done = None

        def done(f):
            f.t_done = time.monotonic()
        fut.add_done_callback(done)
        return fut

    @property
    def fleet(self) -> grpc.Channel:
        if not getattr(self, "_fleet", None) or self._fleet not in self.channels:
            self._fleet = self.channel()
        return self._fleet

    # -- admin port --

    def http(self, path: str) -> tuple[int, str]:
        """GET on the admin port over a raw socket (no proxy settings involved)."""
        with socket.create_connection((HOST, self.admin_port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            s.settimeout(5)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body.decode(errors="replace")

    def metrics(self) -> dict:
        code, body = self.http("/metrics")
        assert code == 200, (code, body[:300])
        out = {}
        for line in body.splitlines():
            m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$', line)
            if m and not line.startswith("#"):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def metric(self, name: str) -> Optional[float]:
        """Sum of every series of |name| (None when absent)."""
        vals = [v for k, v in self.metrics().items() if k == name or k.startswith(name + "{")]
        return sum(vals) if vals else None

    def health(self) -> int:
        """grpc.health.v1 Check for flwr.proto.Fleet: 1 SERVING, 2 NOT_SERVING."""
        with grpc.insecure_channel(f"{HOST}:{self.admin_port}") as ch:
            resp = ch.unary_unary("/grpc.health.v1.Health/Check")(peers.pb_bytes(1, FLEET), timeout=5)
        return resp[1] if len(resp) >= 2 and resp[0] == 0x08 else 0


@pytest.fixture
def node_sidecar(tmp_path):
    """node_sidecar(upstream_address, *flags, tls_ca=None, wait_upstream=True).
    Teardown: SIGTERM, exit 0, no sanitizer report, every event line JSON."""
    started: list[NodeSidecar] = []

    def make(upstream: str, *flags: str, tls_ca: Optional[Path] = None, wait_upstream: bool = True) -> NodeSidecar:
        sc = NodeSidecar(tmp_path, f"node{len(started)}", upstream, list(flags), tls_ca=tls_ca)
        started.append(sc)
        return sc.start(wait_upstream=wait_upstream)

    yield make
    check_all_clean_exits(started)


@pytest.fixture
def raw_upstream():
    """raw_upstream(script, default='ok'): node_peers.RawUpstream, stopped at teardown."""
    made: list[peers.RawUpstream] = []

    def make(script: Optional[dict] = None, default="ok", port: int = 0) -> peers.RawUpstream:
        up = peers.RawUpstream(script, default, port=port)
        made.append(up)
        return up

    yield make
    errors = []
    for up in made:
        up.stop()
        errors += up.errors
    if errors:
        pytest.fail("raw upstream errors:\n" + "\n".join(errors), pytrace=False)


# --- the grpcio Fleet upstream ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d, ca)
    return {"ca": ca[0], "cert": cert, "key": key}


class FleetUpstream:
    """node_peers.py as a python3-grpcio Fleet server (its own process, by PID)."""

    def __init__(self, tmp: Path, pki: Optional[dict], strict: bool = False, port: Optional[int] = None):
        self.tmp, self.pki, self.strict = tmp, pki, strict
        self.port = port or procs.free_port(HOST)
        self.proc: Optional[subprocess.Popen] = None
        self.n = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log(self) -> str:
        return str(self.tmp / f"fleet-{self.port}-{self.n}.log")

    def start(self) -> "FleetUpstream":
        self.n += 1
        argv = [PY, NODE_PEERS, "--listen", self.address]
        if self.pki:
            argv += ["--tls-cert", str(self.pki["cert"]), "--tls-key", str(self.pki["key"])]
        if self.strict:
            argv += ["--strict-pings"]
        self.proc = procs.start(argv, self.log())
        wait_for(lambda: self.proc.poll() is not None or "listening" in procs.tail(self.log()), 20,
                 f"grpcio Fleet server on {self.address}", interval=0.01)
        assert self.proc.poll() is None, f"grpcio Fleet server exited: {procs.tail(self.log())}"
        return self

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop(self.proc, timeout=3)

    def counts(self) -> dict:
        """Calls the server's handlers started, per method (asked directly, not through the sidecar)."""
        if self.pki:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(self.pki["ca"]).read_bytes())
            ch = grpc.secure_channel(self.address, creds, options=[("grpc.ssl_target_name_override", "localhost"),
                                                                   ("grpc.use_local_subchannel_pool", 1)])
        else:
            ch = grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        with ch:
            return json.loads(ch.unary_unary("/test.Control/Stats")(b"", timeout=10))


@pytest.fixture
def fleet_upstream(tmp_path):
    made: list[FleetUpstream] = []

    def make(pki: Optional[dict] = None, strict: bool = False, start: bool = True) -> FleetUpstream:
        up = FleetUpstream(tmp_path, pki, strict)
        made.append(up)
        return up.start() if start else up

    yield make
    for up in made:
        up.stop()


# --- assertions -------------------------------------------------------------------


def assert_unavailable_from_sidecar(err: grpc.RpcError, upstream: Optional[str] = None) -> str:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    msg = err.details() or ""
    assert msg.startswith("flower-sidecar:"), msg
    assert "handshake failed" not in msg.lower(), msg  # Flower 1.26 stops retrying on it
    if upstream:
        assert upstream in msg, msg
    return msg


def ends_with(suffix: str):
    return lambda v: isinstance(v, str) and v.endswith(suffix)


def wait_done(fut, timeout: float, what: str) -> float:
    """Waits (bounded) for a future from NodeSidecar.future; its duration."""
    wait_for(lambda: fut.t_done is not None, timeout, what, interval=0.005)
    return fut.t_done - fut.t_start


# --- 1. safe retry: the upstream never processed the stream ------------------------


def test_refused_stream_is_repeated_even_for_push_messages(node_sidecar, raw_upstream):
    up = raw_upstream({"PushMessages": ["refuse", "ok"]})
    sc = node_sidecar(up.address)
    req = peers.fleet_request("PushMessages")
    assert sc.call("PushMessages", req) == b""  # OK: the upstream refused it, so nothing happened yet

    sts = up.streams("PushMessages")
    assert [st.action for st in sts] == ["refuse", "ok"], up.summary()
    # The second stream carries the whole request, byte for byte (the refused
    # one may have been reset before its DATA was forwarded).
    assert bytes(sts[1].body) == peers.grpc_message(req), up.summary()
    ev = sc.events.wait("call.retry", method=ends_with("/PushMessages"))
    assert ev["attempt"] == 1 and "refused" in ev["reason"], ev
    assert ev["level"] == "info", ev
    # RST_STREAM does not kill the connection: same connection, no reconnect.
    assert len(up.conns) == 1 and sts[1].conn is sts[0].conn, up.summary()
    assert not sc.events.find("upstream.down")
    assert sc.metric("flower_sidecar_call_retries_total") >= 1


def test_stream_above_goaway_last_stream_id_is_repeated(node_sidecar, raw_upstream):
    # GOAWAY(last-stream-id = the GetRun's stream): the PushMessages stream
    # above it was never processed, so it is repeated on the next connection.
    up = raw_upstream({"PushMessages": ["goaway", "ok"]})
    sc = node_sidecar(up.address)
    assert sc.call("GetRun") == b""
    req = peers.fleet_request("PushMessages")
    t0 = time.monotonic()
    assert sc.call("PushMessages", req) == b""
    assert time.monotonic() - t0 < 3 * SLOW

    sts = up.streams("PushMessages")
    assert [st.action for st in sts] == ["goaway", "ok"], up.summary()
    first, second = sts
    last_sid = first.conn.goaway_sent[0]
    assert last_sid == up.streams("GetRun")[0].sid < first.sid, up.summary()
    assert second.conn is not first.conn, up.summary()
    assert bytes(second.body) == peers.grpc_message(req)
    ev = sc.events.wait("call.retry", method=ends_with("/PushMessages"))
    assert ev["attempt"] == 1, ev
    assert up.count("GetRun") == 1  # the processed call was not touched


# --- 2. a connection lost after the whole request was read -----------------------


@pytest.mark.parametrize("method", NEVER_REPEATED)
def test_lost_side_effecting_call_is_never_repeated(node_sidecar, raw_upstream, method):
    up = raw_upstream({method: ["drop"]})
    sc = node_sidecar(up.address)
    t0 = time.monotonic()
    err = rpc_error(sc.call, method, timeout=10)
    elapsed = time.monotonic() - t0
    msg = assert_unavailable_from_sidecar(err, up.address)
    assert elapsed < 2 + SLACK, f"UNAVAILABLE after {elapsed:.2f} s: {msg}"
    assert up.count(method) == 1, up.summary()

    # The sidecar reconnects (one immediate attempt) and still does not send
    # the lost call again: the SuperNode's own retry decides.
    sc.events.wait("upstream.up", count=2, timeout=5)
    time.sleep(1.0)
    assert up.count(method) == 1, f"{method} reached the upstream twice:\n{up.summary()}"
    assert not sc.events.find("call.retry", method=ends_with("/" + method))
    # The SuperNode's retry then works on the new connection.
    assert sc.call(method) == b""
    assert up.count(method) == 2
    assert sc.metric("flower_sidecar_calls_failed_upstream_down_total") >= 1


@pytest.mark.parametrize("method", SIDE_EFFECT_FREE)
def test_lost_side_effect_free_call_is_repeated(node_sidecar, raw_upstream, method):
    up = raw_upstream({method: ["drop", "ok"]})
    sc = node_sidecar(up.address)
    req = peers.fleet_request(method, size=2000)
    t0 = time.monotonic()
    assert sc.call(method, req, timeout=10) == b""
    assert time.monotonic() - t0 < 3 * SLOW
    sts = up.streams(method)
    assert [st.action for st in sts] == ["drop", "ok"], up.summary()
    assert sts[0].conn is not sts[1].conn, up.summary()
    assert bytes(sts[1].body) == bytes(sts[0].body) == peers.grpc_message(req)
    ev = sc.events.wait("call.retry", method=ends_with("/" + method))
    assert ev["attempt"] == 1 and ev["reason"], ev


def test_at_most_three_repeats_per_call(node_sidecar, raw_upstream):
    # An upstream that loses every GetRun with its connection: the sidecar
    # repeats it 3 times, then gives the SuperNode UNAVAILABLE.
    up = raw_upstream({"GetRun": ["drop"] * 6})
    sc = node_sidecar(up.address, "--backoff-initial", "0.2", "--backoff-max", "0.5")
    t0 = time.monotonic()
    err = rpc_error(sc.call, "GetRun", timeout=15)
    assert_unavailable_from_sidecar(err, up.address)
    assert time.monotonic() - t0 < 5 * SLOW
    time.sleep(1.0)
    assert up.count("GetRun") == 4, up.summary()
    retries = sc.events.find("call.retry", method=ends_with("/GetRun"))
    assert [ev["attempt"] for ev in retries] == [1, 2, 3], retries


def test_repeated_call_keeps_the_hold_deadline_from_its_start(node_sidecar, raw_upstream):
    # GetRun is lost with its connection 1 s after it started, and the
    # upstream stays unreachable: the repeat waits like a held call, and the
    # hold (2 s) counts from the call's start, not from the loss.
    up = raw_upstream({"GetRun": [("drop", 1.0)]})
    sc = node_sidecar(up.address, "--hold-timeout", "2")
    fut = sc.future("GetRun", timeout=30)
    wait_for(lambda: up.streams("GetRun") and up.streams("GetRun")[0].t_end, 5, "GetRun to reach the upstream")
    up.stop_accepting()
    elapsed = wait_done(fut, 6 * SLOW, "the repeated GetRun to give up")
    msg = assert_unavailable_from_sidecar(fut.exception(timeout=0), up.address)
    assert 1.8 <= elapsed <= 2.6 + SLACK, f"ended {elapsed:.2f} s after its start: {msg}"
    assert "next attempt in" in msg or "probing every" in msg, msg
    assert up.count("GetRun") == 1


# --- 3. the retry buffer ----------------------------------------------------------


def test_retry_buffer_bounds_what_is_repeated(node_sidecar, raw_upstream):
    up = raw_upstream({"PushObject": ["drop", "drop", "ok"]})
    sc = node_sidecar(up.address, "--retry-buffer", "16K")
    big = peers.fleet_request("PushObject", size=64 * 1024)
    err = rpc_error(sc.call, "PushObject", big, timeout=10)
    assert_unavailable_from_sidecar(err, up.address)
    sc.events.wait("upstream.up", count=2, timeout=5)
    time.sleep(0.5)
    assert up.count("PushObject") == 1, f"a request larger than --retry-buffer was repeated:\n{up.summary()}"
    assert len(up.streams("PushObject")[0].body) == len(peers.grpc_message(big))  # it was read whole

    small = peers.fleet_request("PushObject", size=1024)
    assert sc.call("PushObject", small, timeout=10) == b""
    assert up.count("PushObject") == 3, up.summary()


def test_lost_5mib_push_object_is_repeated_intact(node_sidecar, raw_upstream):
    # Flower's ArrayChunk objects are up to 5 MiB: under the default 8M
    # retry buffer, such a PushObject lost with its connection is repeated whole.
    up = raw_upstream({"PushObject": ["drop", "ok"]})
    sc = node_sidecar(up.address)
    req = peers.fleet_request("PushObject", size=5 * 1024 * 1024)
    assert sc.call("PushObject", req, timeout=20) == b""
    sts = up.streams("PushObject")
    assert len(sts) == 2, up.summary()
    assert bytes(sts[0].body) == bytes(sts[1].body) == peers.grpc_message(req)


def test_retry_buffer_zero_disables_repeats(node_sidecar, raw_upstream):
    up = raw_upstream({"PushMessages": ["refuse"], "GetRun": ["drop"]})
    sc = node_sidecar(up.address, "--retry-buffer", "0")
    # The refusal may reach the client as the sidecar's UNAVAILABLE or as the
    # upstream's RST_STREAM(REFUSED_STREAM), which gRPC clients report as
    # UNAVAILABLE: either way the SuperNode's own retry takes over.
    err = rpc_error(sc.call, "PushMessages", timeout=10)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert "handshake failed" not in (err.details() or "").lower()
    assert_unavailable_from_sidecar(rpc_error(sc.call, "GetRun", timeout=10), up.address)
    time.sleep(0.5)
    assert up.count("PushMessages") == 1 and up.count("GetRun") == 1, up.summary()
    assert not sc.events.find("call.retry")


# --- 4. keepalive -----------------------------------------------------------------


def test_keepalive_declares_silent_upstream_dead(node_sidecar, raw_upstream):
    # The upstream takes the call and then goes silent: no answer, no PING ACK,
    # no FIN (a blackholed WAN link).  Reconnecting is refused from then on.
    up = raw_upstream({"PushMessages": ["stall"]})
    sc = node_sidecar(up.address, "--keepalive-time", "1", "--keepalive-timeout", "1")
    assert sc.call("GetRun") == b""
    mark = sc.events.mark()
    fut = sc.future("PushMessages", timeout=30)
    wait_for(lambda: up.streams("PushMessages") and up.streams("PushMessages")[0].t_end, 5,
             "PushMessages to reach the upstream")
    up.stop_accepting()

    elapsed = wait_done(fut, 8 * SLOW, "the call on the dead connection to end")
    FIGURES.append(f"node: silent upstream declared dead {elapsed:.2f} s after the call's request "
                   f"(--keepalive-time 1 --keepalive-timeout 1)")
    err = fut.exception(timeout=1)
    assert err is not None, "the call succeeded on a silent upstream?"
    msg = assert_unavailable_from_sidecar(err, up.address)
    # Detected within keepalive time + timeout (+1 s), not after TCP's minutes.
    # (The upstream's last byte was its WINDOW_UPDATE for this request.)
    assert 0.8 <= elapsed <= 3.0 + SLACK, f"dead link noticed after {elapsed:.2f} s ({msg})"
    assert "keepalive" in msg.lower(), msg
    down = sc.events.wait("upstream.down", since=mark, timeout=2)
    assert down["reason"].startswith("keepalive"), down
    assert "PING" in down["reason"] or "ping" in down["reason"], down
    conn = up.conns[0]
    assert conn.pings, f"no PING reached the upstream before it was declared dead:\n{up.summary()}"
    wait_for(lambda: conn.t_closed, 3, "the sidecar to close the dead connection")

    # Health says so, on both interfaces, while the upstream stays unreachable.
    assert sc.health() == 2
    code, body = sc.http("/healthz")
    assert code == 503, (code, body)
    ch = sc.events.wait("health.change", since=mark, to="NOT_SERVING", timeout=2)
    assert ch["reason"], ch
    assert up.count("PushMessages") == 1
    assert sc.metric("flower_sidecar_keepalive_pings_total") >= 1
    assert sc.metric("flower_sidecar_calls_failed_upstream_down_total") >= 1
    assert sc.metric("flower_sidecar_upstream_up") == 0


def test_keepalive_no_pings_while_idle_and_answered_pings_keep_a_slow_call(node_sidecar, raw_upstream):
    up = raw_upstream({"GetRun": ["ok", ("slow", 3.5)]})
    sc = node_sidecar(up.address, "--keepalive-time", "1", "--keepalive-timeout", "1")
    assert sc.call("GetRun") == b""
    time.sleep(3.5)
    assert not up.pings(), f"PINGs on an idle connection (a stock SuperLink punishes them):\n{up.summary()}"

    # A call the upstream answers after 3.5 s while ACKing every PING: the
    # sidecar probes the silence and keeps the connection.
    t0 = time.monotonic()
    assert sc.call("GetRun", timeout=15) == b""
    assert 3.3 <= time.monotonic() - t0 < 6 * SLOW
    call = up.streams("GetRun")[1]
    times = [round(t - call.t_end, 2) for _, t in up.pings()]
    n = len(times)
    assert 2 <= n <= 4, f"{n} PINGs during 3.5 s of silence with --keepalive-time 1: at {times} s"
    # Each PING comes about 1 s after the last byte from the upstream (its
    # WINDOW_UPDATE for the request, then each PING ACK, sent at once).
    gaps = [round(b - a, 2) for a, b in zip([0.0] + times, times)]
    FIGURES.append(f"node: PINGs at {times} s into a silent call (--keepalive-time 1, ACKs at once)")
    assert all(0.8 <= g <= 1.5 for g in gaps), \
        f"PINGs at {times} s into the silence (gaps {gaps}) with --keepalive-time 1 and instant ACKs"
    assert len(up.conns) == 1 and not sc.events.find("upstream.down"), up.summary()
    assert sc.metric("flower_sidecar_keepalive_pings_total") >= 2
    rtt = sc.metric("flower_sidecar_upstream_ping_rtt_seconds")
    assert rtt is not None and 0 <= rtt < 0.5, rtt

    # Idle again: no more PINGs.
    time.sleep(2.5)
    assert len(up.pings()) == n, up.summary()


@pytest.mark.parametrize("hold", [[], ["--hold-timeout", "0"]], ids=["default", "hold-timeout-0"])
def test_stalled_heartbeat_ends_unavailable_before_its_deadline(node_sidecar, raw_upstream, hold):
    # Flower's heartbeat has a 5 s deadline and the SuperNode stops on
    # DEADLINE_EXCEEDED.  A heartbeat forwarded onto a link that has just
    # gone silent (keepalive would notice only after 30 + 10 s) must end
    # UNAVAILABLE before its deadline: halfway there the sidecar PINGs, and
    # with no answer it ends the call and lets keepalive finish the connection.
    # Also when calls are not held for a reconnect (--hold-timeout 0).
    up = raw_upstream({"SendNodeHeartbeat": ["stall"]})
    sc = node_sidecar(up.address, "--keepalive-time", "30", "--keepalive-timeout", "3", *hold)
    assert sc.call("GetRun") == b""
    mark = sc.events.mark()
    fut = sc.future("SendNodeHeartbeat", timeout=2)
    elapsed = wait_done(fut, 5 * SLOW, "the stalled heartbeat to end")
    err = fut.exception(timeout=1)
    assert err is not None, "a heartbeat succeeded on a stalled upstream?"
    msg = assert_unavailable_from_sidecar(err, up.address)
    FIGURES.append(f"node: heartbeat (2 s deadline) on a stalled link ended UNAVAILABLE after {elapsed:.2f} s")
    assert 1.5 <= elapsed < 2.0, f"ended after {elapsed:.2f} s: {msg}"
    assert "PING" in msg, msg
    assert up.conns[0].pings, f"no PING probed the stalled connection:\n{up.summary()}"
    # The unanswered probe ends the connection keepalive-timeout after it.
    down = sc.events.wait("upstream.down", since=mark, timeout=6 * SLOW)
    assert down["reason"].startswith("keepalive"), down


def test_heartbeat_stuck_behind_trickling_bytes_ends_unavailable(node_sidecar, raw_upstream):
    # A lossy WAN (seen in the 20 % loss federation test): bytes queued long
    # ago keep trickling in, so the connection is not silent, but the PING
    # the sidecar sends for a heartbeat halfway to its deadline is stuck
    # behind them (a PING round trip of 27 s was measured there).  Only the
    # PING's ACK proves the connection is answering: without it the
    # heartbeat ends UNAVAILABLE (retried) rather than DEADLINE_EXCEEDED
    # (which stops the SuperNode), and the trickling call is not disturbed.
    up = raw_upstream({"PullObject": [("trickle", 0.1, 30)], "SendNodeHeartbeat": ["hang"]})
    sc = node_sidecar(up.address, "--keepalive-time", "30", "--keepalive-timeout", "10")
    assert sc.call("GetRun") == b""
    pull = sc.future("PullObject", timeout=30)
    wait_for(lambda: up.count("PullObject") == 1, 5 * SLOW, "the PullObject to reach the upstream")
    time.sleep(0.3)  # the trickle has begun
    hb = sc.future("SendNodeHeartbeat", timeout=2)
    elapsed = wait_done(hb, 5 * SLOW, "the heartbeat to end")
    err = hb.exception(timeout=1)
    assert err is not None, "the heartbeat succeeded on a connection that never answered it?"
    msg = assert_unavailable_from_sidecar(err, up.address)
    assert "PING" in msg, msg
    assert 1.5 <= elapsed < 2.0, f"ended after {elapsed:.2f} s: {msg}"
    assert up.conns[0].pings, f"no PING probed the heartbeat:\n{up.summary()}"
    assert pull.result(timeout=10 * SLOW) == bytes(30)
    assert len(up.conns) == 1, f"the trickling connection was dropped:\n{up.summary()}"


def test_slow_answer_on_a_live_connection_keeps_its_deadline(node_sidecar, raw_upstream):
    # The same heartbeat on a connection that answers PINGs is a slow server,
    # not a dead link: the client's own deadline decides; and a side-effecting
    # call with a deadline is never turned into UNAVAILABLE (it would be
    # repeated).
    up = raw_upstream({"SendNodeHeartbeat": [("slow", 3)], "PushMessages": ["stall"]})
    sc = node_sidecar(up.address, "--keepalive-time", "30", "--keepalive-timeout", "10")
    assert sc.call("GetRun") == b""
    with pytest.raises(grpc.RpcError) as e:
        sc.call("SendNodeHeartbeat", timeout=2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.value.code(), e.value.details())
    assert up.conns[0].pings, "no PING probed the slow call"
    with pytest.raises(grpc.RpcError) as e:
        sc.call("PushMessages", timeout=2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.value.code(), e.value.details())
    assert up.count("PushMessages") == 1


def test_keepalive_detects_a_frozen_grpcio_upstream_over_tls(node_sidecar, fleet_upstream, pki):
    # A real grpcio server frozen with SIGSTOP (by PID) mid-call: its kernel
    # still ACKs TCP, but nothing answers the PINGs over TLS.
    up = fleet_upstream(pki)
    sc = node_sidecar(up.address, "--keepalive-time", "1", "--keepalive-timeout", "1", "--backoff-initial", "0.5",
                      "--backoff-max", "1", "--connect-timeout", "2", tls_ca=pki["ca"])
    fut = sc.future("PushMessages", sleep=30, timeout=60)
    wait_for(lambda: up.counts().get("PushMessages"), 5 * SLOW, "PushMessages to reach the upstream", interval=0.05)
    mark = sc.events.mark()
    up.proc.send_signal(signal.SIGSTOP)
    try:
        t_stop = time.monotonic()
        wait_for(lambda: fut.t_done is not None, 6 * SLOW, "the call on the frozen upstream to end", interval=0.005)
        msg = assert_unavailable_from_sidecar(fut.exception(timeout=0), up.address)
        took = fut.t_done - t_stop
        FIGURES.append(f"node: frozen (SIGSTOP) TLS grpcio upstream declared dead {took:.2f} s after the freeze")
        assert took <= 3.0 + SLACK, f"noticed {took:.2f} s after the freeze: {msg}"
        down = sc.events.wait("upstream.down", since=mark, timeout=2)
        assert down["reason"].startswith("keepalive"), down
        assert sc.health() == 2
    finally:
        up.proc.send_signal(signal.SIGCONT)
    # Thawed: the sidecar reconnects by itself and the SuperNode's retry works.
    wait_for(lambda: sc.events.find("upstream.up", since=mark), 8 * SLOW, "a new upstream connection")
    assert sc.call("PushMessages", timeout=10) == b""
    assert up.counts().get("PushMessages") == 2  # the lost call was not repeated


# --- 5. too_many_pings --------------------------------------------------------------


def test_strict_grpcio_server_too_many_pings_doubles_keepalive(node_sidecar, fleet_upstream, pki):
    # python3-grpcio with a 5 min minimum ping interval and 1 strike: the third
    # PING on a silent call gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    up = fleet_upstream(pki, strict=True)
    sc = node_sidecar(up.address, "--keepalive-time", "1", "--keepalive-timeout", "1",
                      "--backoff-initial", "0.5", "--backoff-max", "1", tls_ca=pki["ca"])
    t0 = time.monotonic()
    # (grpcio 1.51 forgives the first strike after it sends a WINDOW_UPDATE,
    # so the GOAWAY comes with the 4th PING.)
    err = rpc_error(sc.call, "PushMessages", sleep=20, timeout=30)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert time.monotonic() - t0 < 12, f"no too_many_pings within 12 s\n{sc.logs()}"
    ev = sc.events.wait("upstream.too_many_pings", timeout=5)
    assert ev["level"] == "warn", ev
    assert float(ev["keepalive_time_s"]) == 2.0, ev

    # The next connection PINGs every 2 s: a 3 s silent call gets at most one
    # PING, which this server accepts (its first on the connection).
    assert sc.call("PushMessages", sleep=3, timeout=20) == b""
    time.sleep(0.5)
    assert len(sc.events.find("upstream.too_many_pings")) == 1, sc.logs()
    ups = sc.events.find("upstream.up")
    assert len(ups) == 2, f"{len(ups)} upstream connections (reconnect storm?)\n{sc.logs()}"
    assert up.counts().get("PushMessages") == 2


def test_too_many_pings_next_connection_pings_at_doubled_interval(node_sidecar, raw_upstream):
    up = raw_upstream({"PushMessages": ["calm", ("slow", 5.0)]})
    sc = node_sidecar(up.address, "--keepalive-time", "1", "--keepalive-timeout", "1")
    err = rpc_error(sc.call, "PushMessages", timeout=10)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    first = up.streams("PushMessages")[0]
    c0 = first.conn
    assert c0.goaway_sent and c0.goaway_sent[1] == peers.ENHANCE_YOUR_CALM, up.summary()
    assert 0.8 <= c0.pings[0] - first.t_end <= 1.5, f"first PING {c0.pings[0] - first.t_end:.2f} s after the request"
    ev = sc.events.wait("upstream.too_many_pings", timeout=3)
    assert float(ev["keepalive_time_s"]) == 2.0, ev
    sc.events.wait("upstream.up", count=2, timeout=5)

    # Answered after 5 s of silence, PINGs ACKed: now about every 2 s.
    assert sc.call("PushMessages", timeout=15) == b""
    second = up.streams("PushMessages")[1]
    c1 = second.conn
    assert c1 is not c0, up.summary()
    times = [round(t - second.t_end, 2) for t in c1.pings if t >= second.t_end]
    assert 1 <= len(times) <= 3, f"PINGs at {times} s on the next connection"
    # Every PING about 2 s after the upstream's last byte (its WINDOW_UPDATE,
    # then each ACK, sent at once): not 1 s (not doubled), not 3 s.
    gaps = [round(b - a, 2) for a, b in zip([0.0] + times, times)]
    assert all(1.6 <= g <= 2.5 for g in gaps), f"PINGs at {times} s (gaps {gaps}) with keepalive time 2 s"
    assert len(up.conns) == 2, up.summary()  # no reconnect storm
    assert len(sc.events.find("upstream.too_many_pings")) == 1


# --- 6. a stock gRPC server is not punished ---------------------------------------


@pytest.mark.long
def test_stock_grpcio_server_is_not_punished_in_normal_operation(node_sidecar, fleet_upstream, pki):
    up = fleet_upstream(pki)
    sc = node_sidecar(up.address, tls_ca=pki["ca"])
    mix = ["PullMessages"] * 8 + ["SendNodeHeartbeat", "GetRun", "GetFab", "PullObject", "PullObject",
                                  "ConfirmMessageReceived", "PushMessages", "PushObject", "PushObject",
                                  "PullMessages", "PullMessages", "PullMessages"]
    assert len(mix) == 20
    results, lock = [], threading.Lock()

    def one(m):
        try:
            r = sc.call(m, peers.fleet_request(m, size=4096), timeout=10)
            out = ("OK", r)
        except grpc.RpcError as e:
            out = (e.code(), e.details())
        with lock:
            results.append((m, out))

    t0 = time.monotonic()
    for burst in range(10):
        threads = [threading.Thread(target=one, args=(m,)) for m in mix]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        time.sleep(1.7)  # idle gap: no call open
    assert time.monotonic() - t0 < 60
    bad = [r for r in results if r[1][0] != "OK"]
    assert len(results) == 200 and not bad, bad[:5]
    for name in ("upstream.down", "upstream.too_many_pings", "call.retry"):
        assert not sc.events.find(name), f"{name}: {sc.events.find(name)[:3]}"
    assert len(sc.events.find("upstream.up")) == 1
    assert sc.metric("flower_sidecar_upstream_connects_total") == 1
    counts = up.counts()
    assert sum(counts.values()) == 200, counts  # nothing lost, nothing repeated
    assert sc.health() == 1


# --- 7. hold (wait-for-ready) -------------------------------------------------------


def test_hold_waits_for_the_upstream_and_expired_calls_are_not_sent_late(node_sidecar, fleet_upstream, pki):
    up = fleet_upstream(pki, start=False)  # nothing listens on its port yet
    sc = node_sidecar(up.address, "--backoff-initial", "0.5", "--backoff-max", "1", tls_ca=pki["ca"],
                      wait_upstream=False)

    # A call with a 0.5 s deadline ends by its deadline, not at the 20 s hold.
    t0 = time.monotonic()
    err = rpc_error(sc.call, "GetRun", timeout=0.5)
    assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), (err.code(), err.details())
    assert time.monotonic() - t0 < 0.5 + 0.4 + SLACK
    # The same from a client that never enforces its own grpc-timeout: the
    # sidecar ends the held call itself.
    t0 = time.monotonic()
    res = sc.raw_call("GetFab", [("grpc-timeout", "500m")])
    assert res["t_end"] is not None, f"no answer within 5 s to a call with grpc-timeout 500m: {res}"
    assert 0.3 <= res["t_end"] - t0 <= 1.0 + SLACK, f"ended after {res['t_end'] - t0:.2f} s: {res}"
    status = dict(res["trailers"]).get("grpc-status")
    assert status in ("4", "14"), res

    # A call with a 10 s deadline; the upstream appears about 2 s later.
    fut = sc.future("PushMessages", timeout=10)
    time.sleep(2.0)
    assert not fut.done(), f"held call ended early: {fut.exception(timeout=0)}"
    up.start()
    t_up = time.monotonic()
    elapsed = wait_done(fut, 10, "the held call")
    assert fut.exception(timeout=0) is None, f"held call failed: {fut.exception(timeout=0)}"
    FIGURES.append(f"node: held call answered {fut.t_done - t_up:.2f} s after the upstream came up "
                   f"({elapsed:.2f} s after it started; --backoff-max 1)")
    # Sent once the upstream was reachable: within one backoff delay (<= 1.2 s).
    assert fut.t_done - t_up < 1.2 + 1.0 + SLACK, f"sent {fut.t_done - t_up:.2f} s after the upstream came up"
    assert elapsed >= 2.0
    time.sleep(0.5)
    counts = up.counts()
    assert counts.get("PushMessages") == 1, counts
    # The calls whose deadline passed while held never reached the upstream.
    assert not counts.get("GetRun") and not counts.get("GetFab"), counts
    assert sc.metric("flower_sidecar_calls_held_total") >= 1


def test_held_call_forwards_what_is_left_of_its_deadline(node_sidecar, raw_upstream):
    # A call held ~2 s with grpc-timeout 10 s reaches the upstream with about
    # 8 s left, as a gRPC client would send it after waiting that long: the
    # server must not think it has more time than the client will give.
    port = procs.free_port("127.0.0.1")
    sc = node_sidecar(f"127.0.0.1:{port}", "--backoff-initial", "0.5", "--backoff-max", "0.5",
                      wait_upstream=False)
    fut = sc.future("GetRun", timeout=10)
    time.sleep(2.0)
    up = raw_upstream(port=port)
    elapsed = wait_done(fut, 5 * SLOW, "the held call")
    assert fut.exception(timeout=0) is None, fut.exception(timeout=0)
    [st] = up.streams("GetRun")
    sent = dict(st.headers).get("grpc-timeout", "")
    assert sent.endswith("m") and sent[:-1].isdigit(), st.headers
    left_ms = int(sent[:-1])
    assert 10000 - elapsed * 1000 - 300 <= left_ms <= 10000 - 1900, (sent, elapsed)
    # A call that was not held goes out with its header untouched.
    res = sc.raw_call("GetFab", [("grpc-timeout", "7S")])
    assert dict(res["trailers"]).get("grpc-status") == "0", res
    assert dict(up.streams("GetFab")[0].headers).get("grpc-timeout") == "7S"


def test_hold_timeout_ends_the_call_and_says_when_the_next_attempt_is(node_sidecar):
    addr = f"{HOST}:{procs.free_port(HOST)}"  # nothing listens there: refused, so probed
    sc = node_sidecar(addr, "--hold-timeout", "1", wait_upstream=False)
    wait_for(lambda: (sc.metric("flower_sidecar_upstream_probes_total") or 0) >= 1, 5, "a first probe")
    futs = [sc.future(m, timeout=30) for m in ("PushMessages", "GetRun", "PullMessages")]
    for f in futs:
        elapsed = wait_done(f, 5 * SLOW, "a held call to end at --hold-timeout")
        # Not at once, not at the 20 s default, not at the client's 30 s.
        assert 0.8 <= elapsed <= 2.0 + SLACK, f"held call ended after {elapsed:.2f} s"
        msg = assert_unavailable_from_sidecar(f.exception(timeout=0))
        assert msg.startswith(f"flower-sidecar: upstream {addr} unreachable"), msg
        # Refused: nothing was reached, so no backoff delay but probes.
        assert msg.endswith("link down, probing every 1 s"), msg
    # Held calls wait for the probes; they do not trigger attempts.
    connects = sc.metric("flower_sidecar_upstream_connects_total")
    assert connects is not None and connects <= 2, f"{connects} connection attempts\n{sc.logs()}"
    assert sc.metric("flower_sidecar_calls_held_total") >= 3
    assert sc.metric("flower_sidecar_calls_failed_upstream_down_total") >= 3


def test_hold_timeout_zero_fails_at_once(node_sidecar):
    addr = f"{HOST}:{procs.free_port(HOST)}"
    sc = node_sidecar(addr, "--hold-timeout", "0", wait_upstream=False)
    t0 = time.monotonic()
    err = rpc_error(sc.call, "PullMessages", timeout=10)
    assert time.monotonic() - t0 < 0.5 + SLACK
    msg = assert_unavailable_from_sidecar(err, addr)
    assert "unreachable" in msg, msg


@pytest.mark.parametrize("flag,value", [("--hold-timeout", "301"), ("--hold-timeout", "-1"),
                                        ("--keepalive-time", "0"), ("--keepalive-timeout", "0"),
                                        ("--retry-buffer", "lots")])
def test_bad_robustness_flags_are_rejected(tmp_path, flag, value):
    r = subprocess.run([SIDECAR, "node", "--upstream", "127.0.0.1:9", "--no-tls", "--listen", f"{HOST}:{procs.free_port()}",
                        "--admin", f"{HOST}:{procs.free_port()}", flag, value],
                       capture_output=True, text=True, timeout=10 * SLOW)
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and value in lines[0], r.stderr


# --- 8. the upstream dies under in-flight calls ------------------------------------


def test_upstream_killed_in_flight_calls_end_at_once_or_are_repeated(node_sidecar, fleet_upstream, pki):
    up = fleet_upstream(pki)
    sc = node_sidecar(up.address, "--backoff-initial", "0.5", "--backoff-max", "1", tls_ca=pki["ca"])
    push = sc.future("PushMessages", sleep=30, timeout=60)
    get = sc.future("GetRun", sleep=1.0, timeout=20)
    wait_for(lambda: up.counts().get("PushMessages") and up.counts().get("GetRun"), 5 * SLOW,
             "both calls to reach the upstream", interval=0.05)
    mark = sc.events.mark()

    t_kill = time.monotonic()
    up.kill9()
    wait_for(lambda: push.t_done is not None, 3 * SLOW, "PushMessages to end", interval=0.005)
    FIGURES.append(f"node: in-flight PushMessages ended {push.t_done - t_kill:.3f} s after kill -9 of the upstream")
    assert push.t_done - t_kill <= 1.0 + SLACK, f"PushMessages ended {push.t_done - t_kill:.2f} s after kill -9"
    assert_unavailable_from_sidecar(push.exception(timeout=0), up.address)
    down = sc.events.wait("upstream.down", since=mark, timeout=2)
    assert down["reason"], down
    # GetRun has no side effects: the sidecar keeps it for the next connection.
    assert not get.done(), f"GetRun ended at once: {get.exception(timeout=0)}"

    up.start()  # same port, new process, fresh counters
    wait_done(get, 10 * SLOW, "the repeated GetRun")
    assert get.exception(timeout=0) is None, f"GetRun failed: {get.exception(timeout=0)}"
    counts = up.counts()
    assert counts.get("GetRun") == 1 and not counts.get("PushMessages"), counts
    ev = sc.events.wait("call.retry", method=ends_with("/GetRun"))
    assert ev["attempt"] == 1, ev
