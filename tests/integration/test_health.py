"""The sidecar's health (issue 3): grpc.health.v1 Check/Watch and GET /healthz on
the admin port, the health.change events, malformed admin traffic, and the
OpenNebula READY_SCRIPT (deploy/opennebula/health-check.sh).

Independent peers only: python3-grpcio clients (with the health_pb2 module that
protoc generates into build/py), the grpcio upstream echo_server.py, raw
sockets speaking HTTP/1.1 and hand-made HTTP/2 frames, and build/flower-probe.

    make build/flower-sidecar build/flower-sidecar-asan build/flower-probe proto-py
    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_health.py
    FS_SIDECAR_BIN=build/flower-sidecar-asan /usr/bin/python3 -m pytest -q \\
        -p no:cacheprovider tests/integration/test_health.py

Latencies of health changes are printed as "LATENCY ..." lines (pytest -s).

Time limits: the 1 s limits on health changes are the product's promise and
stay 1 s under ASan too; limits that only guard against hangs are multiplied
by SLOW under ASan.  Every wait is bounded; every process is started here and
stopped by its PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import procs  # noqa: E402  (free_port, wait_port, start, stop, tail)

PYGEN = ROOT / "build" / "py"
if not (PYGEN / "health_pb2.py").exists():
    raise RuntimeError("build/py/health_pb2.py missing: run `make proto-py` first")
sys.path.insert(0, str(PYGEN))
import health_pb2  # noqa: E402

PY = "/usr/bin/python3"
ECHO = str(HERE / "echo_server.py")
HOST = "127.0.0.1"
READY_SCRIPT = ROOT / "deploy" / "opennebula" / "health-check.sh"


def _bin(var: str, default: str) -> str:
    p = os.environ.get(var, default)
    return p if os.path.isabs(p) else str(ROOT / p)


SIDECAR = _bin("FS_SIDECAR_BIN", "build/flower-sidecar")
PROBE = _bin("FLOWER_PROBE", "build/flower-probe")


def _is_asan(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    # gcc links libasan dynamically: the binary names __asan_init, not the runtime's strings
    return b"__asan_init" in data or b"AddressSanitizer" in data


IS_ASAN = _is_asan(SIDECAR)
SLOW = 3.0 if IS_ASAN else 1.0

HCR = health_pb2.HealthCheckResponse
HCQ = health_pb2.HealthCheckRequest
SERVING, NOT_SERVING, SERVICE_UNKNOWN = HCR.SERVING, HCR.NOT_SERVING, HCR.SERVICE_UNKNOWN
NAMES = {v: k for k, v in HCR.ServingStatus.items()}
FLEET = "flwr.proto.Fleet"
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"

CHANGE_LIMIT_S = 1.0      # a health change reaches Watch clients within this
SNIFF_TIMEOUT_S = 10.0    # admin: first request must be complete within this
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer")
# Never through a proxy, never sharing a connection with another channel.
CHANNEL_OPTS = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]


def latency(what: str, seconds: float) -> None:
    print(f"LATENCY {what}: {seconds * 1000:.0f} ms ({'asan' if IS_ASAN else 'normal'} binary)")


def wait_for(pred, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def listening(port: int) -> bool:
    """Some socket LISTENs on |port| (read from /proc: no connection made)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def connectable(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


# --- processes -------------------------------------------------------------


class Upstream:
    """echo_server.py (python3-grpcio) on a fixed port, started and killed by PID."""

    def __init__(self, tmp: Path, port: Optional[int] = None):
        self.tmp = tmp
        self.port = port or procs.free_port(HOST)
        self.proc: Optional[subprocess.Popen] = None
        self.n = 0
        self.spawned_at = self.connectable_at = 0.0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log(self) -> str:
        return str(self.tmp / f"echo-{self.port}-{self.n}.log")

    def start(self, wait: bool = True) -> "Upstream":
        """Starts it; with wait, returns once the port accepts connections and
        records that moment (polled every 5 ms) in connectable_at."""
        self.n += 1
        self.spawned_at = time.monotonic()
        self.proc = procs.start([PY, ECHO, "--listen", self.address], self.log())
        if wait:
            self.wait_connectable()
        return self

    def wait_connectable(self) -> float:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"echo server exited: {procs.tail(self.log())}")
            return connectable(self.port)
        wait_for(up, 20, f"echo server on {self.address}", interval=0.005)
        self.connectable_at = time.monotonic()
        return self.connectable_at

    def kill9(self) -> float:
        """SIGKILL (by PID); returns the moment just before the signal."""
        t = time.monotonic()
        self.proc.kill()
        self.proc.wait(timeout=10)
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop(self.proc, timeout=3)

    def count(self, method: str) -> int:
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTS) as ch:
            stats = json.loads(ch.unary_unary("/test.Echo/Stats")(b"", timeout=10))
        return stats["counts"].get(method, 0)


class Sidecar:
    """flower-sidecar ROLE --no-tls: h2c on --listen and to --upstream in both
    roles, admin on its own port.  Events (stdout) and stderr in files."""

    def __init__(self, tmp: Path, name: str, role: str, upstream: str, extra: list[str]):
        self.tmp, self.name, self.role, self.upstream = tmp, name, role, upstream
        self.port = procs.free_port(HOST)
        self.admin_port = procs.free_port(HOST)
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None
        self.events_path = tmp / f"{name}.events"
        self.stderr_path = tmp / f"{name}.stderr"
        self.channels: list[grpc.Channel] = []

    @property
    def admin(self) -> str:
        return f"{HOST}:{self.admin_port}"

    def argv(self) -> list[str]:
        return [SIDECAR, self.role, "--listen", f"{HOST}:{self.port}", "--upstream", self.upstream,
                "--admin", self.admin, "--no-tls", "--backoff-initial", "0.2", "--backoff-max", "0.5", "--probe-interval", "0.3",
                *self.extra]

    def start(self) -> "Sidecar":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
        if IS_ASAN:
            env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":detect_leaks=1"
            env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        with open(self.events_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=env, start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or (listening(self.admin_port) and listening(self.port)),
                 10 * SLOW, f"{self.name} listening")
        assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}\n{self.logs()}"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def channel(self, target: Optional[str] = None) -> grpc.Channel:
        """A grpcio channel (own TCP connection) to the admin port, or to |target|."""
        ch = grpc.insecure_channel(target or self.admin,
                                   options=CHANNEL_OPTS + [("fs.test.n", len(self.channels))])
        self.channels.append(ch)
        return ch

    def fleet_channel(self) -> grpc.Channel:
        return self.channel(f"{HOST}:{self.port}")

    def close_channels(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels.clear()

    def events(self) -> list[dict]:
        try:
            data = self.events_path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.split(b"\n")[:-1]:
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError as e:
                raise AssertionError(f"event line is not JSON ({e}): {raw[:300]!r}") from None
            out.append(ev)
        return out

    def changes(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "health.change"]

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self, lines: int = 40) -> str:
        return (f"--- {self.name} events ---\n{procs.tail(str(self.events_path), lines)}\n"
                f"--- {self.name} stderr ---\n{procs.tail(str(self.stderr_path), lines)}")

    def stop(self) -> Optional[int]:
        self.close_channels()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            return procs.stop(self.proc, timeout=15 * SLOW)
        return self.proc.returncode


class Harness:
    """What one test started; teardown stops it all and checks every sidecar
    exited 0 without a sanitizer report."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.upstreams: list[Upstream] = []
        self.sidecars: list[Sidecar] = []
        self.watchers: list["Watcher"] = []
        self.popens: list[subprocess.Popen] = []

    def upstream(self, start: bool = True) -> Upstream:
        up = Upstream(self.tmp)
        self.upstreams.append(up)
        return up.start() if start else up

    def sidecar(self, role: str, upstream, *extra: str) -> Sidecar:
        addr = upstream if isinstance(upstream, str) else upstream.address
        sc = Sidecar(self.tmp, f"sidecar{len(self.sidecars)}-{role}", role, addr, list(extra))
        self.sidecars.append(sc)
        return sc.start()

    def watch(self, sc: Sidecar, service: str = FLEET, channel: Optional[grpc.Channel] = None) -> "Watcher":
        w = Watcher(channel or sc.channel(), service)
        self.watchers.append(w)
        return w

    def teardown(self) -> None:
        for w in self.watchers:
            w.cancel()
        for p in self.popens:
            if p.poll() is None:
                procs.stop(p, timeout=3)
        problems = []
        for sc in self.sidecars:
            rc = sc.stop()
            if rc not in (0, None):
                problems.append(f"{sc.name}: exit code {rc} (expected 0 after SIGTERM)\n{sc.logs()}")
            err = sc.stderr()
            if any(m in err for m in SANITIZER_MARKERS):
                problems.append(f"{sc.name}: sanitizer report:\n{err[-6000:]}")
        for up in self.upstreams:
            up.stop()
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.teardown()


@pytest.fixture(params=["link", "node"])
def role(request):
    return request.param


# --- clients ---------------------------------------------------------------


def check(ch: grpc.Channel, service: str = FLEET, timeout: float = 5.0) -> int:
    stub = ch.unary_unary(CHECK, request_serializer=HCQ.SerializeToString,
                          response_deserializer=HCR.FromString)
    return stub(HCQ(service=service), timeout=timeout).status


def check_error(ch: grpc.Channel, service: str) -> grpc.RpcError:
    try:
        st = check(ch, service)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"Check({service!r}) answered {NAMES.get(st, st)}, expected an error")


def raw_call(ch: grpc.Channel, method: str, req: bytes, timeout: float = 5.0, **kw):
    """A unary call with raw request and response bytes."""
    return ch.unary_unary(method)(req, timeout=timeout, **kw)


def raw_error(ch: grpc.Channel, method: str, req: bytes, **kw) -> grpc.RpcError:
    try:
        r = raw_call(ch, method, req, **kw)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{method} with {req[:40]!r} answered {r!r}, expected an error")


class Watcher:
    """A Watch stream read by its own thread; items are (monotonic time, status)."""

    def __init__(self, ch: grpc.Channel, service: str, timeout: float = 180):
        stub = ch.unary_stream(WATCH, request_serializer=HCQ.SerializeToString,
                               response_deserializer=HCR.FromString)
        self.started_at = time.monotonic()
        self.call = stub(HCQ(service=service), timeout=timeout)
        self.service = service
        self.items: list[tuple[float, int]] = []
        self.error: Optional[grpc.RpcError] = None
        self.ended = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for r in self.call:
                with self.cond:
                    self.items.append((time.monotonic(), r.status))
                    self.cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def statuses(self) -> list[int]:
        with self.cond:
            return [s for _, s in self.items]

    def nth(self, n: int, timeout: float) -> tuple[float, int]:
        """The n-th message (1-based), waiting up to |timeout| s for it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.items) < n and not self.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            if len(self.items) < n:
                raise AssertionError(
                    f"Watch({self.service!r}): message {n} not received within {timeout:.1f} s; have "
                    f"{[NAMES.get(s, s) for _, s in self.items]}, ended={self.ended} error={self.error!r}")
            return self.items[n - 1]

    def cancel(self):
        self.call.cancel()
        self.thread.join(timeout=5)


def names(statuses) -> list[str]:
    return [NAMES.get(s, str(s)) for s in statuses]


def assert_reason(change: dict) -> None:
    """A health.change reason is a complete phrase: not empty, no dangling
    separator (an empty detail appended after ': ')."""
    r = change.get("reason")
    assert isinstance(r, str) and r.strip(), change
    assert not r.rstrip().endswith(":") and r == r.strip(), f"reason {r!r} in {change}"


def http(addr: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Sends |data| on a fresh connection; returns all bytes until the server closes."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.settimeout(timeout)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_to_eof(s, timeout)


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    """Everything until EOF (or a reset); AssertionError if still open after |timeout|."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout:.1f} s; got {out[:200]!r}")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        except socket.timeout:
            continue
        if not chunk:
            return out
        out += chunk


def http_get(addr: str, path: str = "/healthz", method: str = "GET") -> tuple[int, dict, bytes]:
    raw = http(addr, f"{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n".encode())
    return parse_http(raw)


def parse_http(raw: bytes) -> tuple[int, dict, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response: {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    proto, code, _ = lines[0].split(" ", 2)
    assert proto == "HTTP/1.1", lines[0]
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(code), hdrs, body


def probe(addr: str, service: str = FLEET, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    return subprocess.run([PROBE, "-addr", addr, "-service", service, *args], capture_output=True,
                          text=True, timeout=20, env=env)


def wait_status(sc: Sidecar, want: int, timeout: float, service: str = FLEET) -> None:
    ch = sc.channel()
    wait_for(lambda: check(ch, service) == want, timeout, f"{sc.name} {NAMES[want]}", interval=0.05)


def fleet_call(sc: Sidecar, payload: bytes = b"through the sidecar") -> None:
    """A call on the Fleet path (the listener) that must succeed."""
    with grpc.insecure_channel(f"{HOST}:{sc.port}", options=CHANNEL_OPTS) as ch:
        assert raw_call(ch, "/test.Echo/Unary", payload, timeout=10) == payload


class InFlight:
    """A Fleet-path call (echo Sleep) running while the body of the with-block runs."""

    def __init__(self, sc: Sidecar, seconds: float = 1.5):
        self.sc, self.seconds = sc, seconds
        self.result: Optional[bytes] = None
        self.error: Optional[BaseException] = None

    def __enter__(self):
        self.ch = grpc.insecure_channel(f"{HOST}:{self.sc.port}", options=CHANNEL_OPTS)

        def run():
            try:
                self.result = raw_call(self.ch, "/test.Echo/Sleep", str(self.seconds).encode(),
                                       timeout=30 * SLOW)
            except BaseException as e:  # noqa: BLE001 -- reported by __exit__
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=30 * SLOW)
        self.ch.close()
        if exc[0] is None:
            assert not self.thread.is_alive(), "the in-flight Fleet call did not finish"
            assert self.error is None, f"the in-flight Fleet call failed: {self.error!r}"
            assert self.result == b"slept", self.result
        return False


def still_fine(sc: Sidecar) -> None:
    """After malformed traffic: the sidecar is up, the Fleet path works, health answers."""
    assert sc.alive(), f"{sc.name} exited with {sc.proc.returncode}\n{sc.logs()}"
    fleet_call(sc)
    with grpc.insecure_channel(sc.admin, options=CHANNEL_OPTS) as ch:
        assert check(ch) == SERVING
    code, _, body = http_get(sc.admin)
    assert (code, body) == (200, b"SERVING\n")


# --- minimal HTTP/2 client (raw frames) ----------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def hpack_int(n: int, bits: int = 7) -> bytes:
    limit = (1 << bits) - 1
    if n < limit:
        return bytes([n])
    out = [limit]
    n -= limit
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    out.append(n)
    return bytes(out)


def hpack(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, no Huffman: valid for any decoder."""
    out = b""
    for k, v in headers:
        kb, vb = k.encode(), v.encode()
        out += b"\x00" + hpack_int(len(kb)) + kb + hpack_int(len(vb)) + vb
    return out


def grpc_headers(path: str) -> bytes:
    return hpack([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "admin"),
                  ("content-type", "application/grpc"), ("te", "trailers")])


def grpc_msg(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(payload)) + payload


class RawH2:
    """HTTP/2 by hand: the preface, an empty SETTINGS, then whatever the test sends.
    read() collects frames per stream and ACKs the server's SETTINGS and PINGs."""

    def __init__(self, addr: str, handshake: bool = True):
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        if handshake:
            self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def request(self, sid: int, path: str, body: Optional[bytes], end_on_headers: bool = False) -> None:
        flags = END_HEADERS | (END_STREAM if end_on_headers else 0)
        data = frame(HEADERS, flags, sid, grpc_headers(path))
        if body is not None:
            data += frame(DATA, END_STREAM, sid, body)
        self.send(data)

    def _pump(self, timeout: float) -> bool:
        self.s.settimeout(timeout)
        try:
            chunk = self.s.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                break
            ftype, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9:9 + n]
            self.buf = self.buf[9 + n:]
            self.frames.append((ftype, flags, sid, payload))
            if ftype == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))
        return True

    def read_until(self, pred, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"raw h2: condition not met (closed={self.closed}); frames: "
                                     f"{[(t, f, s, p[:30]) for t, f, s, p in self.frames]}")
            self._pump(min(left, 0.5))

    def stream(self, sid: int) -> list[tuple[int, int, bytes]]:
        return [(t, f, p) for t, f, s, p in self.frames if s == sid]

    def stream_done(self, sid: int) -> bool:
        return any((t in (HEADERS, DATA) and f & END_STREAM) or t == RST_STREAM for t, f, _ in self.stream(sid))

    def data(self, sid: int) -> bytes:
        return b"".join(p for t, _, p in self.stream(sid) if t == DATA)

    def goaway(self) -> Optional[int]:
        """The error code of the server's GOAWAY, if one came."""
        for t, _, s, p in self.frames:
            if t == GOAWAY and len(p) >= 8:
                return int.from_bytes(p[4:8], "big")
        return None

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"raw h2: connection still open after {timeout:.1f} s")
            self._pump(min(left, 0.5))

    def close(self, reset: bool = False) -> None:
        if reset:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.s.close()


def serving_msg(status: int) -> bytes:
    return grpc_msg(HCR(status=status).SerializeToString())


# ===========================================================================
# Health follows the upstream
# ===========================================================================


def test_upstream_absent_is_not_serving(h, role):
    up = h.upstream(start=False)  # a free port: connection refused
    sc = h.sidecar(role, up)

    r = probe(sc.admin, FLEET)
    assert r.returncode == 4, f"probe: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}"
    assert "NOT_SERVING" in r.stderr + r.stdout
    assert probe(sc.admin, "").returncode == 4

    ch = sc.channel()
    assert check(ch, FLEET) == NOT_SERVING
    assert check(ch, "") == NOT_SERVING

    code, hdrs, body = http_get(sc.admin)
    assert code == 503, (code, body)
    text = body.decode()
    assert text.startswith("NOT_SERVING: ") and text.endswith("\n"), text
    reason = text[len("NOT_SERVING: "):].strip()
    assert "upstream" in reason and len(reason) > len("upstream"), f"reason: {text!r}"
    assert hdrs.get("content-length") == str(len(body))

    # HEAD: same status, no body
    code, hdrs, body = parse_http(http(sc.admin, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert code == 503 and body == b"" and int(hdrs["content-length"]) > 0

    changes = sc.changes()
    assert changes, sc.logs()
    last = changes[-1]
    assert last["to"] == "NOT_SERVING" and last["service"] == FLEET
    for c in changes:
        assert_reason(c)
    assert sc.alive()


def test_serving_follows_upstream(h, role):
    """NOT_SERVING -> SERVING within 1 s of the upstream accepting connections,
    -> NOT_SERVING within 1 s of a kill -9; Watch clients see exactly that."""
    up = h.upstream(start=False)
    sc = h.sidecar(role, up)
    w_fleet = h.watch(sc, FLEET)
    w_all = h.watch(sc, "")
    for w in (w_fleet, w_all):
        t, st = w.nth(1, CHANGE_LIMIT_S)
        assert st == NOT_SERVING
        latency(f"{role}: first Watch message after the call", t - w.started_at)
    time.sleep(0.8)  # the sidecar is now retrying with backoff

    up.start()
    t_conn = up.connectable_at
    for w in (w_fleet, w_all):
        t, st = w.nth(2, 5 * SLOW)
        assert st == SERVING, names(w.statuses())
        latency(f"{role}: SERVING after the upstream became connectable (Watch {w.service!r})", t - t_conn)
        latency(f"{role}: SERVING after the upstream process was spawned", t - up.spawned_at)
        assert t - t_conn <= CHANGE_LIMIT_S, f"SERVING {t - t_conn:.3f} s after the upstream accepted"

    r = probe(sc.admin, FLEET, "-v")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert check(sc.channel()) == SERVING
    assert http_get(sc.admin)[::2] == (200, b"SERVING\n")
    fleet_call(sc)

    t_kill = up.kill9()
    for w in (w_fleet, w_all):
        t, st = w.nth(3, 5 * SLOW)
        assert st == NOT_SERVING, names(w.statuses())
        latency(f"{role}: NOT_SERVING after kill -9 of the upstream (Watch {w.service!r})", t - t_kill)
        assert t - t_kill <= CHANGE_LIMIT_S, f"NOT_SERVING {t - t_kill:.3f} s after the upstream died"

    assert probe(sc.admin, FLEET).returncode == 4
    code, _, body = http_get(sc.admin)
    assert code == 503 and b"upstream" in body, body

    # nothing else while the sidecar keeps retrying a dead upstream
    time.sleep(1.5)
    for w in (w_fleet, w_all):
        assert names(w.statuses()) == ["NOT_SERVING", "SERVING", "NOT_SERVING"]
        assert not w.ended, w.error

    # and back once it returns
    up.start()
    for w in (w_fleet, w_all):
        t, st = w.nth(4, 5 * SLOW)
        assert st == SERVING
        latency(f"{role}: SERVING after the upstream came back (Watch {w.service!r})", t - up.connectable_at)
        assert t - up.connectable_at <= CHANGE_LIMIT_S

    # health.change: one event per change, a consistent chain, all fields
    changes = sc.changes()
    assert [(c["from"], c["to"]) for c in changes] == [
        ("UNKNOWN", "NOT_SERVING"), ("NOT_SERVING", "SERVING"), ("SERVING", "NOT_SERVING"),
        ("NOT_SERVING", "SERVING")], json.dumps(changes, indent=1)
    for c in changes:
        assert c["service"] == FLEET and c["role"] == role
        assert_reason(c)
        # warn (what operators alert on) only for losing SERVING, not for
        # the first verdict at start
        assert c["level"] == ("warn" if c["from"] == "SERVING" else "info"), c
    assert "upstream" in changes[2]["reason"], changes[2]
    # the event is logged as the change happens: right after upstream.down/up
    evs = sc.events()
    i_down = next(i for i, e in enumerate(evs) if e["event"] == "upstream.down")
    assert evs[i_down + 1]["event"] == "health.change" and evs[i_down + 1]["to"] == "NOT_SERVING", evs[i_down:]


class FakeUpstream:
    """A TCP listener that is not an HTTP/2 server: 'silent' accepts and reads
    but never writes; 'http1' answers every connection with an HTTP/1.1 400."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _run(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "http1":
                try:
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
                c.close()
            else:
                self.conns.append(c)

    def close(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("mode", ["silent", "http1"])
def test_listening_but_not_http2_upstream_is_not_serving(h, role, mode):
    """An open port is not a working upstream (the old `nc -z` check): without
    the upstream's HTTP/2 SETTINGS the sidecar stays NOT_SERVING."""
    fake = FakeUpstream(mode)
    try:
        sc = h.sidecar(role, fake.address)
        w = h.watch(sc)
        assert w.nth(1, CHANGE_LIMIT_S)[1] == NOT_SERVING
        wait_for(lambda: fake.accepted >= 1, 5 * SLOW, "the sidecar's connection to the fake upstream")
        time.sleep(2.0)
        assert w.statuses() == [NOT_SERVING], names(w.statuses())
        assert probe(sc.admin).returncode == 4
        code, _, body = http_get(sc.admin)
        assert code == 503 and b"upstream" in body, body
        assert all(c["to"] != "SERVING" for c in sc.changes())
    finally:
        fake.close()


class FlappingUpstream(FakeUpstream):
    """Accepts, sends an HTTP/2 SETTINGS frame (so the sidecar's connection is
    up), and closes the connection |hold| seconds later: the upstream flaps."""

    def __init__(self, hold: float):
        self.hold = hold
        super().__init__("flap")

    def _run(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                c.sendall(frame(SETTINGS, 0, 0))
                time.sleep(self.hold)
            except OSError:
                pass
            c.close()


def test_flapping_upstream(h):
    """Up and down every few hundred ms: each Watch client sees every change,
    in order, never the same status twice in a row, as the events say."""
    fake = FlappingUpstream(hold=0.15)
    try:
        sc = h.sidecar("link", fake.address)
        ws = [h.watch(sc, FLEET if i % 2 else "") for i in range(10)]
        for w in ws:
            w.nth(1, 5 * SLOW)
        wait_for(lambda: fake.accepted >= 8, 20 * SLOW, "8 upstream connections")
    finally:
        fake.close()
    wait_status(sc, NOT_SERVING, 5 * SLOW)
    time.sleep(0.3)
    changes = sc.changes()
    assert all(a["to"] == b["from"] for a, b in zip(changes, changes[1:])), changes
    to_serving = sum(c["to"] == "SERVING" for c in changes)
    assert to_serving >= 4, changes
    for w in ws:
        st = w.statuses()
        assert all(a != b for a, b in zip(st, st[1:])), names(st)
        assert st[-1] == NOT_SERVING and st.count(SERVING) == to_serving, (names(st), len(changes))
        assert not w.ended, w.error
    assert sc.alive()


# SIGTERM is taken with sigtimedwait, blocked in every thread from the start:
# a Python handler runs only in the main thread, and only once that thread
# wakes up; when the kernel gave the signal to one of grpcio's threads, the
# main thread slept on in its wait (seen once under load: no GOAWAY 5 s
# after the SIGTERM).
GRACEFUL_UPSTREAM = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any thread exists
sys.path.insert(0, sys.argv[2])
import grpc
from concurrent import futures
import echo_server
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((echo_server.handlers(),))
port = server.add_insecure_port(sys.argv[1])
server.start()
print("listening %d" % port, flush=True)
if signal.sigtimedwait({signal.SIGTERM}, 120) is not None:
    print("stopping", flush=True)
    server.stop(grace=15).wait()
"""


def test_upstream_goaway_is_not_serving(h, role, tmp_path):
    """The upstream shuts down gracefully (grpcio server.stop(grace)): it sends
    GOAWAY, stops listening, and keeps the connection only for the call in
    flight.  No new call can get through from then on, so health must say
    NOT_SERVING within 1 s, not when the last call ends."""
    script = tmp_path / "graceful_upstream.py"
    script.write_text(GRACEFUL_UPSTREAM)
    up = h.upstream(start=False)
    log = str(tmp_path / "graceful.log")
    proc = procs.start([PY, str(script), up.address, str(HERE)], log)
    h.popens.append(proc)
    wait_for(lambda: "listening" in procs.tail(log) or proc.poll() is not None, 20, "graceful upstream")
    sc = h.sidecar(role, up)
    wait_status(sc, SERVING, 5 * SLOW)
    w = h.watch(sc)
    assert w.nth(1, CHANGE_LIMIT_S)[1] == SERVING

    result: dict = {}
    ch = sc.fleet_channel()

    def sleep_call():
        try:
            result["reply"] = raw_call(ch, "/test.Echo/Sleep", b"4", timeout=30)
        except grpc.RpcError as e:
            result["error"] = e

    t_call = threading.Thread(target=sleep_call, daemon=True)
    t_call.start()
    wait_for(lambda: up.count("Sleep") >= 1, 5 * SLOW, "the Sleep call at the upstream")
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not listening(up.port), 5, "the upstream to stop listening")
    # the truth: a new call cannot get through now
    with grpc.insecure_channel(f"{HOST}:{sc.port}", options=CHANNEL_OPTS) as ch2:
        try:
            raw_call(ch2, "/test.Echo/Unary", b"x", timeout=5)
            new_call = "succeeded"
        except grpc.RpcError as e:
            new_call = f"{e.code().name}: {e.details()}"
    t, st = w.nth(2, 15 * SLOW)
    t_call.join(timeout=15 * SLOW)
    assert result.get("reply") == b"slept", result  # the call in flight is not harmed
    assert st == NOT_SERVING, names(w.statuses())
    assert t - t_term <= CHANGE_LIMIT_S, (
        f"NOT_SERVING only {t - t_term:.2f} s after the upstream's GOAWAY (when the call in flight "
        f"ended); meanwhile its listener was closed and a new call got {new_call}")
    latency(f"{role}: NOT_SERVING after the upstream's GOAWAY", t - t_term)
    # A planned stop (GOAWAY NO_ERROR) is not what operators alert on (warn).
    warns = [e for e in sc.events() if e["level"] == "warn" and e["event"] in ("upstream.down", "health.change")]
    assert not warns, warns


def test_sigterm_is_not_serving_while_draining(h, role):
    up = h.upstream()
    sc = h.sidecar(role, up)
    wait_status(sc, SERVING, 5 * SLOW)
    w = h.watch(sc)
    assert w.nth(1, CHANGE_LIMIT_S)[1] == SERVING

    result: dict = {}
    ch = sc.fleet_channel()

    def sleep_call():
        try:
            result["reply"] = raw_call(ch, "/test.Echo/Sleep", b"3", timeout=30)
        except grpc.RpcError as e:
            result["error"] = e
        result["done_at"] = time.monotonic()

    t_call = threading.Thread(target=sleep_call, daemon=True)
    t_call.start()
    wait_for(lambda: up.count("Sleep") >= 1, 5 * SLOW, "the Sleep call at the upstream")

    t_term = time.monotonic()
    sc.proc.send_signal(signal.SIGTERM)
    t, st = w.nth(2, 5 * SLOW)
    assert st == NOT_SERVING, names(w.statuses())
    latency(f"{role}: NOT_SERVING after SIGTERM (Watch)", t - t_term)
    assert t - t_term <= CHANGE_LIMIT_S

    # while the call is in flight, every client sees NOT_SERVING: draining
    r = probe(sc.admin, FLEET)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert check(sc.channel()) == NOT_SERVING
    code, _, body = http_get(sc.admin)
    assert code == 503 and body == b"NOT_SERVING: draining\n", body
    assert t_call.is_alive() and sc.alive(), "the drain ended before the checks ran"

    t_call.join(timeout=15 * SLOW)
    assert result.get("reply") == b"slept", result
    assert procs.wait_exit(sc.proc, 15 * SLOW) == 0
    assert result["done_at"] - t_term >= 2.0  # the call really was in flight throughout

    drains = [c for c in sc.changes() if c["to"] == "NOT_SERVING" and "draining" in c["reason"]]
    assert len(drains) == 1 and drains[0]["from"] == "SERVING", sc.changes()
    assert [c["to"] for c in sc.changes()][-1] == "NOT_SERVING"  # no SERVING while shutting down


def test_unknown_service(h, role):
    up = h.upstream()
    sc = h.sidecar(role, up)
    wait_status(sc, SERVING, 5 * SLOW)
    ch = sc.channel()

    for name in ("flwr.proto.Nope", "flwr.proto.Fleet.", "grpc.health.v1.Health", "x" * 200):
        e = check_error(ch, name)
        assert e.code() == grpc.StatusCode.NOT_FOUND, (name, e)
    r = probe(sc.admin, "flwr.proto.Nope")
    assert r.returncode == 3, (r.stdout, r.stderr)

    unknown = h.watch(sc, "flwr.proto.Nope", channel=ch)
    known = h.watch(sc, FLEET, channel=ch)
    t, st = unknown.nth(1, CHANGE_LIMIT_S)
    assert st == SERVICE_UNKNOWN
    latency(f"{role}: SERVICE_UNKNOWN after the Watch call", t - unknown.started_at)
    assert known.nth(1, CHANGE_LIMIT_S)[1] == SERVING

    time.sleep(1.0)
    assert not unknown.ended and unknown.call.is_active(), f"unknown-service Watch ended: {unknown.error!r}"
    assert unknown.statuses() == [SERVICE_UNKNOWN]

    # a health change is not sent to it, and it stays open
    up.kill9()
    assert known.nth(2, 5 * SLOW)[1] == NOT_SERVING
    time.sleep(0.5)
    assert unknown.statuses() == [SERVICE_UNKNOWN] and not unknown.ended
    # the known services still answer on the same connection
    assert check(ch, "") == NOT_SERVING


@pytest.mark.parametrize("layout", ["one connection", "one connection each"])
def test_fifty_watchers(h, layout):
    up = h.upstream(start=False)
    sc = h.sidecar("link", up)
    shared = sc.channel()
    ws = [h.watch(sc, FLEET if i % 2 else "", channel=shared if layout == "one connection" else None)
          for i in range(50)]
    for w in ws:
        assert w.nth(1, 5 * SLOW)[1] == NOT_SERVING

    up.start()
    worst = max(w.nth(2, 5 * SLOW)[0] for w in ws) - up.connectable_at
    assert all(w.statuses()[:2] == [NOT_SERVING, SERVING] for w in ws)
    latency(f"50 watchers ({layout}): last SERVING after the upstream became connectable", worst)
    assert worst <= CHANGE_LIMIT_S

    t_kill = up.kill9()
    worst = max(w.nth(3, 5 * SLOW)[0] for w in ws) - t_kill
    latency(f"50 watchers ({layout}): last NOT_SERVING after kill -9", worst)
    assert worst <= CHANGE_LIMIT_S
    for w in ws:
        assert names(w.statuses()) == ["NOT_SERVING", "SERVING", "NOT_SERVING"]

    # half of them go away; the rest still get the next change
    for w in ws[::2]:
        w.cancel()
    up.start()
    for w in ws[1::2]:
        assert w.nth(4, 5 * SLOW)[1] == SERVING
    assert sc.alive()


def test_watchers_that_vanish(h):
    """Watch streams whose connection is reset, or that are cancelled, while
    changes are pushed: nothing is sent to freed streams (ASan would tell)."""
    up = h.upstream()
    sc = h.sidecar("link", up)
    wait_status(sc, SERVING, 5 * SLOW)
    conns = []
    for _ in range(5):
        c = RawH2(sc.admin)
        for sid in range(1, 20, 2):
            c.request(sid, WATCH, grpc_msg(HCQ(service=FLEET).SerializeToString()))
        c.read_until(lambda c=c: all(c.data(s) for s in range(1, 20, 2)))
        assert c.data(1) == serving_msg(SERVING)
        conns.append(c)
    # cancel some streams, reset some connections, keep one
    conns[0].send(b"".join(frame(RST_STREAM, 0, sid, struct.pack(">I", 8)) for sid in range(1, 20, 2)))
    conns[1].send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    conns[2].close(reset=True)
    conns[3].close()
    grpc_ws = [h.watch(sc) for _ in range(5)]
    for w in grpc_ws:
        w.nth(1, 5 * SLOW)
    for w in grpc_ws[:3]:
        w.cancel()
    time.sleep(0.2)

    up.kill9()
    for c in (conns[1], conns[4]):
        c.read_until(lambda c=c: c.data(3).endswith(serving_msg(NOT_SERVING)))
    up.start()
    conns[4].read_until(lambda: conns[4].data(19).endswith(serving_msg(SERVING)))
    for w in grpc_ws[3:]:
        w.nth(3, 5 * SLOW)
        assert names(w.statuses()) == ["SERVING", "NOT_SERVING", "SERVING"]
    conns[1].close()
    conns[4].close(reset=True)
    still_fine(sc)


def test_healthz_http(h):
    up = h.upstream()
    sc = h.sidecar("link", up)
    wait_status(sc, SERVING, 5 * SLOW)

    code, hdrs, body = http_get(sc.admin)
    assert (code, body) == (200, b"SERVING\n")
    assert hdrs["content-type"].startswith("text/plain") and hdrs["content-length"] == "8"
    assert hdrs.get("connection") == "close"
    assert http_get(sc.admin, "/metrics")[0] == 200  # Prometheus text (issue 4)
    code, hdrs, body = http_get(sc.admin, "/")  # the federation page (issue 17)
    assert code == 200 and hdrs["content-type"] == "text/html; charset=utf-8" and body.startswith(b"<!DOCTYPE html>")
    assert http_get(sc.admin, "/v1/federation")[0] == 200
    for path in ("/healthz/", "/HEALTHZ", "/grpc.health.v1.Health/Check", "/" + "a" * 200, "/v1/federation/", "//"):
        assert http_get(sc.admin, path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert http_get(sc.admin, "/healthz", method)[0] == 405, method
    code, _, body = parse_http(http(sc.admin, b"HEAD /healthz HTTP/1.1\r\n\r\n"))
    assert (code, body) == (200, b"")
    # HTTP/1.0 and bare-LF requests
    assert parse_http(http(sc.admin, b"GET /healthz HTTP/1.0\r\n\r\n"))[::2] == (200, b"SERVING\n")
    assert parse_http(http(sc.admin, b"GET /healthz HTTP/1.1\nHost: x\n\n"))[::2] == (200, b"SERVING\n")
    # a request in small pieces
    with socket.create_connection((HOST, sc.admin_port), timeout=5) as s:
        for piece in (b"GE", b"T /hea", b"lthz HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            s.sendall(piece)
            time.sleep(0.05)
        assert parse_http(read_to_eof(s, 5))[::2] == (200, b"SERVING\n")
    # a second, pipelined request is not answered: one response, then close
    raw = http(sc.admin, b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1 and parse_http(raw)[0] == 200
    # a large but acceptable head
    big = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 7000 + b"\r\n\r\n"
    assert parse_http(http(sc.admin, big))[::2] == (200, b"SERVING\n")
    still_fine(sc)


# ===========================================================================
# Malformed admin traffic: an error or a close, never a crash; the Fleet
# path keeps working (a call is in flight throughout).
# ===========================================================================


@pytest.fixture
def served(h):
    up = h.upstream()
    sc = h.sidecar("link", up)
    wait_status(sc, SERVING, 5 * SLOW)
    return sc


def test_random_bytes(served):
    sc = served
    rng = random.Random(1234)
    with InFlight(sc):
        for i in range(12):
            junk = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 100, 4000])))
            # Junk that could still become a request is left to the 10 s
            # timeout (test_half_open_connections_are_closed); all of these
            # can be judged at once.
            if i % 3 == 0:
                junk = b"\x16\x03\x01" + junk  # a TLS ClientHello's first bytes
            elif i % 3 == 1:
                junk = bytes([0x80 | rng.getrandbits(7)]) + junk
            else:
                junk = b"GET" + junk + b"\r\n\r\n"
            raw = http(sc.admin, junk)
            assert raw.startswith(b"HTTP/1.1 4"), (junk[:40], raw[:80])
            if i % 3 != 2:
                assert raw.startswith(b"HTTP/1.1 400 ") or raw.startswith(b"HTTP/1.1 431 "), (junk[:40], raw[:80])
        for junk in (b"\x00", b"\r\n\r\n", b"get /healthz HTTP/1.1\r\n\r\n", b"GET /healthz\r\n\r\n",
                     b"GET /healthz FTP/1.0\r\n\r\n", b"G\x00T / HTTP/1.1\r\n\r\n", b"\xff" * 70000,
                     b"GET " + b"/" * 300 + b" HTTP/1.1\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\x00\r\n\r\n",
                     PREFACE[:18] + b"XXXXXX", PREFACE[:-1] + b"X"):
            raw = http(sc.admin, junk)
            assert raw.startswith(b"HTTP/1.1 4"), (junk[:40], raw[:80])
            code = parse_http(raw)[0]
            assert code in (400, 404, 431), (junk[:40], raw[:80])
        # a flood of connections that send garbage and vanish
        for i in range(50):
            with socket.create_connection((HOST, sc.admin_port), timeout=5) as s:
                s.sendall(bytes([rng.getrandbits(8) | 0x80]) * 64)
                if i % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    still_fine(sc)


def test_oversized_http_request(served):
    sc = served
    with InFlight(sc):
        # one big write
        raw = http(sc.admin, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
        assert parse_http(raw)[0] in (400, 431), raw[:100]
        # a huge request line
        raw = http(sc.admin, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        assert parse_http(raw)[0] in (400, 431), raw[:100]
        # many small writes: the head grows past 8 KiB without ever ending
        with socket.create_connection((HOST, sc.admin_port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            sent = 0
            try:
                for _ in range(200):
                    s.sendall(b"X-Header-%05d: %s\r\n" % (sent, b"v" * 80))
                    sent += 1
                    time.sleep(0.002)
            except (BrokenPipeError, ConnectionResetError):
                pass
            raw = read_to_eof(s, 5 * SLOW)
            assert parse_http(raw)[0] in (400, 431), raw[:100]
        # 1 MiB of headers
        raw = http(sc.admin, b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200000 + b"\r\n")
        assert parse_http(raw)[0] in (400, 431), raw[:100]
    still_fine(sc)


def test_half_open_connections_are_closed(served):
    """Partial first requests, then silence: closed after about 10 s, while
    complete requests and the Fleet path go on."""
    sc = served
    partials = {
        "nothing": b"",
        "partial HTTP/1.1 request": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        "partial request line": b"GE",
        "partial HTTP/2 preface": PREFACE[:10],
    }
    socks = {}
    t0 = time.monotonic()
    for name, data in partials.items():
        s = socket.create_connection((HOST, sc.admin_port), timeout=5)
        if data:
            s.sendall(data)
        socks[name] = s
    closed_after = {}

    def watch_close(name, s):
        try:
            got = read_to_eof(s, SNIFF_TIMEOUT_S + 5 * SLOW)
            closed_after[name] = (time.monotonic() - t0, got)
        except AssertionError as e:
            closed_after[name] = (None, str(e))

    threads = [threading.Thread(target=watch_close, args=kv, daemon=True) for kv in socks.items()]
    for t in threads:
        t.start()
    # meanwhile: Fleet calls, health, complete requests
    with InFlight(sc, 3.0):
        for _ in range(5):
            fleet_call(sc)
            assert http_get(sc.admin)[0] == 200
            time.sleep(0.5)
    for t in threads:
        t.join(timeout=SNIFF_TIMEOUT_S + 10 * SLOW)
    for s in socks.values():
        s.close()
    for name, (after, got) in closed_after.items():
        assert after is not None, f"{name}: {got}"
        latency(f"half-open admin connection ({name}) closed", after)
        assert SNIFF_TIMEOUT_S - 1.0 <= after <= SNIFF_TIMEOUT_S + 2.0 * SLOW, (name, after)
    still_fine(sc)


def test_half_open_http2_requests_are_ended(served):
    """HTTP/2 requests left incomplete (no END_STREAM, a cut message, a header
    block without its CONTINUATION): like an incomplete HTTP/1.1 request, each
    gets an error or a close after about 10 s rather than holding its stream
    and connection for ever.  (An idle HTTP/2 connection without streams may
    stay: gRPC clients keep those.)"""
    sc = served
    conns = {}
    for name in ("HEADERS without END_STREAM", "message cut short", "HEADERS without CONTINUATION"):
        c = RawH2(sc.admin)
        c.read_until(lambda c=c: any(t == SETTINGS and not f & ACK for t, f, _, _ in c.frames))
        if name == "HEADERS without END_STREAM":
            c.send(frame(HEADERS, END_HEADERS, 1, grpc_headers(CHECK)))
        elif name == "message cut short":
            c.send(frame(HEADERS, END_HEADERS, 1, grpc_headers(WATCH)) + frame(DATA, 0, 1, b"\x00\x00\x00\x00\x10\x0a"))
        else:
            c.send(frame(HEADERS, 0, 1, grpc_headers(CHECK)))
        conns[name] = c
    t0 = time.monotonic()
    ended = {}
    with InFlight(sc, 3.0):
        for name, c in conns.items():
            try:
                c.read_until(lambda c=c: c.stream_done(1) or c.goaway() is not None,
                             timeout=max(0.1, t0 + SNIFF_TIMEOUT_S + 3 * SLOW - time.monotonic()))
                ended[name] = time.monotonic() - t0
            except AssertionError:
                ended[name] = None if not c.closed else time.monotonic() - t0
    for c in conns.values():
        c.close()
    for name, after in ended.items():
        if after is not None:
            latency(f"half-open HTTP/2 request ({name}) ended", after)
    still_fine(sc)
    assert all(v is not None for v in ended.values()), (
        f"incomplete HTTP/2 requests still open {SNIFF_TIMEOUT_S + 3 * SLOW:.0f} s later: "
        f"{[k for k, v in ended.items() if v is None]}")


def test_http2_preface_then_garbage(served):
    sc = served
    rng = random.Random(99)
    with InFlight(sc):
        for i in range(8):
            c = RawH2(sc.admin, handshake=False)
            c.send(PREFACE + bytes(rng.getrandbits(8) for _ in range(rng.choice([9, 64, 3000]))))
            c.wait_closed(5 * SLOW)
            c.close()
        # valid SETTINGS, then a frame header announcing 16 MiB
        c = RawH2(sc.admin)
        c.send(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 100)
        c.wait_closed(5 * SLOW)
        assert c.goaway() is not None, c.frames
        c.close()
        # DATA on a stream that was never opened
        c = RawH2(sc.admin)
        c.send(frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"))
        c.wait_closed(5 * SLOW)
        assert c.goaway() is not None
        c.close()
        # HEADERS with a broken HPACK block
        c = RawH2(sc.admin)
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\xff\xff\xff\xff\xff"))
        c.wait_closed(5 * SLOW)
        c.close()
        # the preface one byte at a time, then a valid Check
        c = RawH2(sc.admin, handshake=False)
        for b in PREFACE:
            c.send(bytes([b]))
            time.sleep(0.005)
        c.send(frame(SETTINGS, 0, 0))
        c.request(1, CHECK, grpc_msg(b""))
        c.read_until(lambda: c.stream_done(1))
        assert c.data(1) == serving_msg(SERVING)
        c.close()
        # a request without :path, then a valid one on the same connection
        c = RawH2(sc.admin)
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1,
                     hpack([(":method", "POST"), (":scheme", "http"), (":authority", "x")])))
        c.request(3, CHECK, grpc_msg(b""))
        c.read_until(lambda: c.stream_done(1) and c.stream_done(3))
        assert c.data(3) == serving_msg(SERVING)
        c.close()
    still_fine(sc)


def test_unknown_grpc_methods(served):
    sc = served
    ch = sc.channel()
    with InFlight(sc):
        for method in ("/test.Echo/Unary", "/grpc.health.v1.Health/List", "/grpc.health.v1.Health/check",
                       "/flwr.proto.Fleet/PullMessages", "/grpc.health.v1.Health/Check/", "/", "/x"):
            e = raw_error(ch, method, HCQ(service=FLEET).SerializeToString())
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (method, e)
        # streaming calls to unknown methods
        try:
            list(ch.unary_stream("/test.Echo/ServerStream")(b"3,10", timeout=5))
            raise AssertionError("streaming call to an unknown method succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
        # the connection is still good for health
        assert check(ch) == SERVING
    still_fine(sc)


def test_corrupt_health_requests(served):
    sc = served
    ch = sc.channel()
    with InFlight(sc):
        for bad in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a", b"\x0a\xff\xff\xff\xff\x0f",
                    b"\x0b", HCQ(service="x" * 5000).SerializeToString()):
            for method in (CHECK, WATCH):
                if method == CHECK:
                    e = raw_error(ch, method, bad)
                else:
                    try:
                        got = list(ch.unary_stream(method)(bad, timeout=5))
                        raise AssertionError(f"Watch with {bad[:20]!r} answered {got!r}")
                    except grpc.RpcError as err:
                        e = err
                assert e.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), (bad[:20], e)
        # invalid UTF-8 in the service name: refused, or an unknown service
        bad = b"\x0a\x02\xc3\x28"
        e = raw_error(ch, CHECK, bad)
        assert e.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), e
        w = ch.unary_stream(WATCH)(bad, timeout=5)
        try:
            assert HCR.FromString(next(w)).status == SERVICE_UNKNOWN
            w.cancel()
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err
        # two messages in one Check
        try:
            ch.stream_unary(CHECK)(iter([b"", b""]), timeout=5)
            raise AssertionError("Check with two messages succeeded")
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), e
        # valid edge cases: an empty request is service "", unknown fields are skipped
        assert HCR.FromString(raw_call(ch, CHECK, b"")).status == SERVING
        assert HCR.FromString(raw_call(ch, CHECK, b"\x10\x07" + HCQ(service=FLEET).SerializeToString()
                                       + b"\x1a\x03abc")).status == SERVING
        # gzip-compressed request: answered or refused, never a crash or hang
        try:
            st = HCR.FromString(raw_call(ch, CHECK, HCQ(service=FLEET).SerializeToString(),
                                         compression=grpc.Compression.Gzip)).status
            assert st == SERVING
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), e
            print(f"NOTE gzip-compressed Check refused: {e.code()} {e.details()!r}")

        # framing errors by hand
        c = RawH2(sc.admin)
        cases = {
            1: b"",                                          # HEADERS only, no message
            3: b"\x00\x00\x00",                              # cut prefix
            5: b"\x00\x00\x00\x00\x64" + b"\x0a\x00",       # length says 100
            7: b"\x02\x00\x00\x00\x00",                      # flag 2
            9: b"\x00\xff\xff\xff\xff" + b"x" * 2000,       # length 4 GiB
            11: grpc_msg(b"") + b"\x00",                     # trailing byte
            15: grpc_msg(b"\x1f\x8b\x08\x00garbage", flag=1),  # "compressed", no grpc-encoding
        }
        for sid, body in cases.items():
            if sid == 1:
                c.request(sid, CHECK, None, end_on_headers=True)
            else:
                c.request(sid, CHECK, body)
        # a valid request split into 1-byte DATA frames
        msg = grpc_msg(HCQ(service=FLEET).SerializeToString())
        c.send(frame(HEADERS, END_HEADERS, 17, grpc_headers(CHECK)) +
               b"".join(frame(DATA, END_STREAM if i == len(msg) - 1 else 0, 17, msg[i:i + 1])
                        for i in range(len(msg))))
        c.read_until(lambda: all(c.stream_done(sid) for sid in (*cases, 17)))
        for sid in cases:
            assert c.data(sid) == b"", (sid, c.stream(sid))  # no HealthCheckResponse
        assert c.data(17) == serving_msg(SERVING)
        assert not c.closed
        c.close()
    still_fine(sc)


def test_many_admin_connections(served):
    """Idle gRPC connections, HTTP requests and Watch streams in bulk."""
    sc = served
    with InFlight(sc, 2.0):
        conns = [RawH2(sc.admin) for _ in range(100)]
        for i, c in enumerate(conns):
            c.request(1, CHECK if i % 2 else WATCH, grpc_msg(b""))
        for c in conns:
            c.read_until(lambda c=c: c.data(1).startswith(serving_msg(SERVING)))
        for c in conns:
            c.close(reset=True)
        for _ in range(100):
            assert http_get(sc.admin)[0] == 200
    still_fine(sc)


# ===========================================================================
# The READY_SCRIPT
# ===========================================================================


def appliance_env(admin: str, **extra: str) -> dict:
    """The environment one-context gives a READY_SCRIPT: the context variables
    exported, a system PATH without build/, a proxy for the outside world."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LANG": "C", "LC_ALL": "C",
        "REPORT_READY": "YES", "TOKEN": "YES", "READY_SCRIPT_PATH": str(READY_SCRIPT),
        "ONEGATE_ENDPOINT": "http://192.0.2.1:5030", "VMID": "42", "ETH0_IP": "192.0.2.10",
        "FL_TLS_ENABLED": "YES", "FL_LOG_FORMAT": "json", "FL_SUPERLINK_ADDRESS": "192.0.2.20:9092",
        "http_proxy": "http://192.0.2.99:3128", "https_proxy": "http://192.0.2.99:3128",
        "FL_SIDECAR_ADMIN": admin, "FLOWER_PROBE": PROBE,
    }
    env.update(extra)
    return env


def run_ready_script(env: dict, timeout: float, shell: Optional[str] = None) -> subprocess.Popen:
    argv = [shell, str(READY_SCRIPT)] if shell else [str(READY_SCRIPT)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=5)
        raise AssertionError(f"READY_SCRIPT still running after {timeout} s:\n{out}\n{err}")
    return p.returncode, out, err


def test_ready_script_is_valid_shell():
    assert READY_SCRIPT.exists() and os.access(READY_SCRIPT, os.X_OK), READY_SCRIPT
    for sh in ("/bin/sh", "/bin/bash", "/bin/dash"):
        if os.path.exists(sh):
            r = subprocess.run([sh, "-n", str(READY_SCRIPT)], capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, (sh, r.stderr)
    assert READY_SCRIPT.read_text().startswith("#!/bin/sh")
    if os.path.exists("/usr/bin/shellcheck"):
        r = subprocess.run(["/usr/bin/shellcheck", "-s", "sh", str(READY_SCRIPT)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("shell", [None, "/bin/dash", "/bin/bash"])
def test_ready_script_waits_for_the_upstream(h, shell):
    if shell and not os.path.exists(shell):
        pytest.skip(f"{shell} not installed")
    up = h.upstream(start=False)
    sc = h.sidecar("link", up)
    env = appliance_env(sc.admin, READY_TIMEOUT="60", READY_INTERVAL="1")
    p = run_ready_script(env, 60, shell)
    h.popens.append(p)
    time.sleep(2.5)
    assert p.poll() is None, f"READY_SCRIPT ended early: {p.communicate()}"
    up.start()
    t_up = up.connectable_at
    rc, out, err = finish(p, 20 * SLOW)
    t_done = time.monotonic()
    assert rc == 0, (out, err)
    lines = out.strip().splitlines()
    assert len(lines) >= 3, out  # at least two NOT_SERVING attempts, then SERVING
    for line in lines[:-1]:
        assert "NOT_SERVING" in line or "not ready" in line.lower(), line
    assert "SERVING" in lines[-1] and "NOT_SERVING" not in lines[-1], lines[-1]
    latency("READY_SCRIPT exit 0 after the upstream became connectable", t_done - t_up)
    assert t_done - t_up <= 1.0 + 1.0 + 3.0 * SLOW  # interval + a probe


def test_ready_script_gives_up(h):
    up = h.upstream(start=False)
    sc = h.sidecar("node", up)
    env = appliance_env(sc.admin, READY_TIMEOUT="3", READY_INTERVAL="1")
    t0 = time.monotonic()
    rc, out, err = finish(run_ready_script(env, 30), 30)
    took = time.monotonic() - t0
    assert rc != 0, (out, err)
    lines = out.strip().splitlines()
    assert 2 <= len(lines) <= 6, out
    assert all("NOT_SERVING" in line for line in lines), out
    assert err.strip(), "no message on giving up"
    assert 3.0 <= took <= 3.0 + 1.0 + 5.0 * SLOW, took


def test_ready_script_without_sidecar(tmp_path):
    port = procs.free_port(HOST)  # nothing listens here
    env = appliance_env(f"{HOST}:{port}", READY_TIMEOUT="2", READY_INTERVAL="1")
    rc, out, err = finish(run_ready_script(env, 30), 30)
    assert rc != 0
    lines = out.strip().splitlines()
    assert lines and all(str(port) in line or "connect" in line.lower() for line in lines), out


def test_ready_script_configuration_errors(tmp_path):
    port = procs.free_port(HOST)
    for extra in ({"FLOWER_PROBE": "/nonexistent/flower-probe"}, {"READY_TIMEOUT": "soon"},
                  {"READY_INTERVAL": "-1"}, {"READY_INTERVAL": "0"},
                  {"FL_SIDECAR_ADMIN": "localhost"}, {"FL_SIDECAR_ADMIN": "127.0.0.1:http"}):
        env = appliance_env(f"{HOST}:{port}", **{"READY_TIMEOUT": "60", **extra})
        t0 = time.monotonic()
        rc, out, err = finish(run_ready_script(env, 30), 30)
        assert rc not in (0, None), (extra, out, err)
        assert time.monotonic() - t0 < 5, f"{extra}: a configuration error must not be retried"
        assert err.strip() and len(err.strip().splitlines()) == 1, (extra, err)


def test_ready_script_default_address_and_probe_on_path(h, tmp_path):
    """No FL_SIDECAR_ADMIN: 127.0.0.1:9099 (skipped if that port is taken);
    no FLOWER_PROBE: flower-probe from PATH, as `make install` puts it."""
    if listening(9099):
        pytest.skip("127.0.0.1:9099 is in use on this machine")
    up = h.upstream()
    sc = Sidecar(tmp_path, "default-admin", "link", up.address, [])
    sc.admin_port = 9099
    h.sidecars.append(sc)
    sc.start()
    wait_status(sc, SERVING, 5 * SLOW)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "flower-probe").symlink_to(PROBE)
    env = appliance_env("", READY_TIMEOUT="10")
    del env["FL_SIDECAR_ADMIN"], env["FLOWER_PROBE"]
    env["PATH"] = f"{bindir}:{env['PATH']}"
    rc, out, err = finish(run_ready_script(env, 30), 30)
    assert rc == 0, (out, err)
    assert len(out.strip().splitlines()) == 1 and "SERVING" in out, out


# --- --upstream-health: the SuperLink's own health server ----------------------


class SuperLinkHealth:
    """A python3-grpcio grpc.health.v1 server standing in for
    `flower-superlink --health-server-address`: Check answers |status| for
    any service name, as Flower's does."""

    def __init__(self):
        from concurrent import futures
        self.status = SERVING
        self.checks = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(
                self._check, request_deserializer=HCQ.FromString, response_serializer=HCR.SerializeToString)}),))
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.addr = f"{HOST}:{self.port}"
        self.server.start()

    def _check(self, request, context):
        self.checks += 1
        return HCR(status=self.status)

    def stop(self):
        self.server.stop(0).wait(5)


def test_upstream_health_is_required(h):
    """--upstream-health: SERVING needs the SuperLink's own health server to
    say SERVING too; each change shows within about a second (checks every
    500 ms, 1 s timeout), with the SuperLink's answer as the reason."""
    up = h.upstream()
    slh = SuperLinkHealth()
    try:
        sc = h.sidecar("link", up, "--upstream-health", slh.addr)
        ch = sc.channel()
        wait_for(lambda: check(ch) == SERVING, 5 * SLOW, "SERVING with a healthy SuperLink")
        assert slh.checks >= 1

        slh.status = NOT_SERVING
        t = time.monotonic()
        wait_for(lambda: check(ch) == NOT_SERVING, 3, "NOT_SERVING once the SuperLink says so")
        latency("upstream-health NOT_SERVING", time.monotonic() - t)
        status, _, body = http_get(sc.admin)
        assert status == 503 and b"SuperLink health" in body and b"NOT_SERVING" in body, body
        change = [c for c in sc.changes() if c["to"] == "NOT_SERVING"][-1]
        assert "SuperLink health" in change["reason"] and "answered NOT_SERVING" in change["reason"], change

        slh.status = SERVING
        wait_for(lambda: check(ch) == SERVING, 3, "SERVING again")

        slh.stop()  # its port now refuses connections
        wait_for(lambda: check(ch) == NOT_SERVING, 3, "NOT_SERVING when the health server is gone")
        change = [c for c in sc.changes() if c["to"] == "NOT_SERVING"][-1]
        assert "SuperLink health" in change["reason"], change
        # Fleet calls still flow: the verdict is about readiness, not a gate.
        assert raw_call(sc.fleet_channel(), "/test.Echo/Unary", b"still forwarding") == b"still forwarding"
    finally:
        slh.stop()


def test_upstream_health_bad_address_exits_2(tmp_path):
    r = subprocess.run([SIDECAR, "link", "--no-tls", "--upstream-health", "superlink:notaport"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "--upstream-health" in r.stderr and "superlink:notaport" in r.stderr, r
