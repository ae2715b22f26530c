"""Shared helpers for the link-role integration suites (tests/integration/test_link_*.py).

Real peers only: the sidecar binary, the python3-grpcio upstream
echo_server.py, grpcio clients, raw sockets.  Everything listens on loopback
ports picked at run time, every process is started and stopped by PID, and
every wait is bounded.

    FS_SIDECAR_BIN=build/flower-sidecar-asan /usr/bin/python3 -m pytest -q \
        -p no:cacheprovider tests/integration/test_link_*.py

The fixtures here are opt-in (nothing is autouse), so the other suites in
this directory are not affected.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import procs  # noqa: E402  (free_port, wait_port, stop, tail: shared with the emulator suites)

PY = "/usr/bin/python3"
ECHO = str(HERE / "echo_server.py")
HOST = "127.0.0.1"

SIDECAR = os.environ.get("FS_SIDECAR_BIN", "build/flower-sidecar")
if not os.path.isabs(SIDECAR):
    SIDECAR = str(ROOT / SIDECAR)


def _is_asan(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return b"__asan_init" in data or b"libasan.so" in data
    except OSError:
        return False


IS_ASAN = _is_asan(SIDECAR)
# Everything takes longer under ASan: scale the time limits that are about
# "does not hang", not the ones a user would notice (those stay strict).
SLOW = 3.0 if IS_ASAN else 1.0

# The sidecar must stay under this however large the messages are: it
# buffers at most a stream window per stream and direction.
RSS_LIMIT_KIB = 64 * 1024

# Clients and upstream accept messages of any size, like Flower's.
GRPC_OPTS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer")


# Measured figures (e.g. VmHWM after 1 GiB), printed at the end of the run
# even without -s, so that `make test` logs show them.
FIGURES: list[str] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "big: moves 1 GiB through the sidecar (slow, but part of make test)")
    config.addinivalue_line(
        "markers", "long: takes 15 s or more (a 60 s outage, 1 GiB, a slow link): run first")


def pytest_collection_modifyitems(config, items):
    """The long tests first, in their usual order: with pytest-xdist (make
    integration) a run lasts at least as long as the test that starts last
    and runs longest."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", f"flower-sidecar figures ({os.path.basename(SIDECAR)})")
        for line in FIGURES:
            terminalreporter.write_line(line)


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Polls pred() until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def listening(port: int) -> bool:
    """True when some socket is in LISTEN state on |port| (IPv4 or IPv6).

    Read from /proc/net so that checking readiness makes no connection: a
    probe connection would show up as a tls.fail or conn.open event."""
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


def read_status(pid: int) -> dict:
    """VmRSS and VmHWM of |pid| in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


# --- events ----------------------------------------------------------------


TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Events:
    """The sidecar's NDJSON event stream (its stdout, written to a file).

    Every complete line must be one JSON object with the envelope fields;
    a line that is not fails the test that reads it."""

    def __init__(self, path: Path, role: str = "link"):
        self.path = path
        self.role = role

    def all(self) -> list[dict]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        out = []
        for raw in lines[:-1]:  # the last piece is an unfinished line (or b"")
            try:
                ev = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise AssertionError(f"event line is not JSON ({e}): {raw[:300]!r}") from None
            assert isinstance(ev, dict), raw
            for key in ("ts", "level", "event", "role"):
                assert key in ev, f"event without {key!r}: {raw[:300]!r}"
            assert TS_RE.match(ev["ts"]), f"ts not RFC 3339 UTC with microseconds: {raw[:300]!r}"
            assert ev["level"] in ("debug", "info", "warn", "error"), raw[:300]
            assert ev["role"] == self.role, raw[:300]
            out.append(ev)
        return out

    @staticmethod
    def _matches(ev: dict, event: str, match: dict) -> bool:
        if ev["event"] != event:
            return False
        for k, want in match.items():
            have = ev.get(k)
            if callable(want):
                if have is None or not want(have):
                    return False
            elif have != want:
                return False
        return True

    def find(self, event: str, since: int = 0, **match) -> list[dict]:
        """Events named |event| from index |since| on, whose fields equal
        |match| (a callable value is a predicate on the field)."""
        return [ev for ev in self.all()[since:] if self._matches(ev, event, match)]

    def mark(self) -> int:
        """Index to pass as since= to see only later events."""
        return len(self.all())

    def wait(self, event: str, timeout: float = 5.0, since: int = 0, count: int = 1, **match) -> dict:
        """The |count|-th matching event (from |since|), waiting up to |timeout| s."""
        def enough():
            found = self.find(event, since, **match)
            return found if len(found) >= count else None
        return wait_for(enough, timeout * SLOW, f"{count} x {event} {match} in {self.path}")[count - 1]


# --- processes -------------------------------------------------------------


class Upstream:
    """The python3-grpcio upstream (echo_server.py), started by PID."""

    def __init__(self, log_dir: Path, port: Optional[int] = None, host: str = HOST, args: tuple = ()):
        self.log_dir = log_dir
        self.args = list(args)
        self.host = host
        self.port = port or procs.free_port(host)
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.log = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> "Upstream":
        self.starts += 1
        self.log = self.log_dir / f"echo-{self.port}-{self.starts}.log"
        self.proc = procs.start([PY, ECHO, "--listen", self.address, *self.args], str(self.log))
        # echo_server prints "listening PORT" once it accepts connections.
        wait_for(lambda: self.proc.poll() is not None or "listening" in procs.tail(str(self.log)),
                 20, f"echo server on {self.address}")
        assert self.proc.poll() is None, f"echo server exited: {procs.tail(str(self.log))}"
        return self

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL, by PID
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop(self.proc, timeout=3)

    def stats(self) -> dict:
        """The upstream's own counters, asked directly (not through the sidecar)."""
        with grpc.insecure_channel(self.address) as ch:
            return json.loads(ch.unary_unary("/test.Echo/Stats")(b"", timeout=10))

    def count(self, method: str) -> int:
        return self.stats()["counts"].get(method, 0)

    def cancelled(self) -> int:
        return self.stats()["cancelled"]["Sleep"]


class Sidecar:
    """One `flower-sidecar link` process: events on stdout (a file), stderr
    in another file, so that sanitizer reports never mix with events."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: Optional[dict] = None,
                 tls: bool = True, listen_host: str = HOST, port: Optional[int] = None,
                 tls_dir: Optional[Path] = None):
        self.tmp = tmp
        self.name = name
        self.tls = tls
        self.listen_host = listen_host
        self.port = port or procs.free_port(listen_host)
        self.tls_dir = tls_dir or (tmp / f"{name}-tls")
        self.admin_port = procs.free_port(HOST)
        self.extra = list(args)
        self.env = env or {}
        self.proc: Optional[subprocess.Popen] = None
        self.rc: Optional[int] = None
        self.channels: list[grpc.Channel] = []
        self.events = Events(tmp / f"{name}.events")
        self.stderr_path = tmp / f"{name}.stderr"

    @property
    def listen(self) -> str:
        return f"[{self.listen_host}]:{self.port}" if ":" in self.listen_host else f"{self.listen_host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.tls_dir / "ca.pem").read_bytes()

    def argv(self) -> list[str]:
        a = [SIDECAR, "link", "--listen", self.listen, "--admin", f"{HOST}:{self.admin_port}"]
        if self.tls:
            a += ["--tls-dir", str(self.tls_dir)]
        else:
            a += ["--no-tls"]
        return a + self.extra

    def start(self, wait_upstream: bool = True) -> "Sidecar":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
        if IS_ASAN:
            # A small quarantine keeps RSS meaningful; leaks and errors abort
            # with a non-zero exit code, checked at teardown.
            env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=16:detect_leaks=1"
            env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        env.update(self.env)
        with open(self.events.path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=env, start_new_session=True)
        self.rc = None
        wait_for(lambda: self.proc.poll() is not None or listening(self.port), 10 * SLOW,
                 f"sidecar listening on {self.listen}")
        assert self.proc.poll() is None, f"sidecar exited with {self.proc.returncode}:\n{self.logs()}"
        if wait_upstream:
            self.events.wait("upstream.up", timeout=10, since=self.last_start_index())
        return self

    def last_start_index(self) -> int:
        evs = self.events.all()
        starts = [i for i, e in enumerate(evs) if e["event"] == "sidecar.start"]
        return starts[-1] if starts else 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> dict:
        return read_status(self.proc.pid)

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        self.rc = procs.wait_exit(self.proc, timeout)
        return self.rc

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after |timeout|; the exit code (-9 if killed)."""
        self.close_channels()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.rc = procs.stop(self.proc, timeout=timeout * SLOW)
        else:
            self.rc = self.proc.returncode
        return self.rc

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sanitizer_report(self) -> str:
        err = self.stderr()
        return err if any(m in err for m in SANITIZER_MARKERS) else ""

    def logs(self, lines: int = 60) -> str:
        return (f"--- {self.name} events (tail) ---\n{procs.tail(str(self.events.path), lines)}\n"
                f"--- {self.name} stderr (tail) ---\n{procs.tail(str(self.stderr_path), lines)}")

    # -- clients --

    def target(self, host: str = "localhost") -> str:
        """host is a name, an IPv4 address or a gRPC target prefix such as 'ipv6:[::1]'."""
        return f"{host}:{self.port}"

    def channel(self, host: str = "localhost", own_connection: bool = True, root_ca: Optional[bytes] = None,
                options: Optional[list] = None) -> grpc.Channel:
        """A grpcio channel to the sidecar (TLS verified against ca.pem unless
        --no-tls).  own_connection: never share a TCP connection with another
        channel (grpcio pools subchannels process-wide otherwise)."""
        opts = list(GRPC_OPTS) + list(options or [])
        if own_connection:
            opts += [("grpc.use_local_subchannel_pool", 1), ("fs.test.channel", len(self.channels))]
        target = self.target(host)
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_ca or self.ca_pem)
            ch = grpc.secure_channel(target, creds, options=opts)
        else:
            ch = grpc.insecure_channel(target, options=opts)
        self.channels.append(ch)
        return ch

    def close_channels(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels.clear()


def check_clean_exit(sc: Sidecar) -> None:
    """Teardown check: exit code 0 after SIGTERM, no sanitizer report, and
    every line of the event log is JSON (the last one complete)."""
    rc = sc.stop()
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc} (expected 0 after SIGTERM)")
    rep = sc.sanitizer_report()
    if rep:
        problems.append("sanitizer report:\n" + rep[-6000:])
    try:
        sc.events.all()
        data = sc.events.path.read_bytes() if sc.events.path.exists() else b""
        if data and not data.endswith(b"\n"):
            problems.append("event log ends with an unfinished line")
    except AssertionError as e:
        problems.append(str(e))
    if problems:
        raise AssertionError(f"sidecar {sc.name} (pid {sc.pid}): " + "; ".join(problems) + "\n" + sc.logs())


# --- fixtures --------------------------------------------------------------


@pytest.fixture
def make_upstream(tmp_path):
    """Starts echo servers; every one is stopped at teardown."""
    started: list[Upstream] = []

    def make(*args: str, port: Optional[int] = None, start: bool = True, host: str = HOST) -> Upstream:
        up = Upstream(tmp_path, port, host=host, args=args)
        started.append(up)
        return up.start() if start else up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def echo(make_upstream) -> Upstream:
    return make_upstream()


@pytest.fixture
def make_sidecar(tmp_path):
    """Starts sidecars: make_sidecar(*flags, upstream=Upstream|'host:port', tls=True,
    env={}, wait_upstream=True).  Teardown: SIGTERM, exit code 0, no
    sanitizer report (see check_clean_exit)."""
    started: list[Sidecar] = []

    def make(*flags, upstream=None, tls=True, env=None, wait_upstream=True, listen_host=HOST,
             port=None, tls_dir=None, start=True) -> Sidecar:
        args = list(flags)
        if upstream is not None:
            args += ["--upstream", upstream if isinstance(upstream, str) else upstream.address]
        sc = Sidecar(tmp_path, f"sidecar{len(started)}", args, env=env, tls=tls, listen_host=listen_host,
                     port=port, tls_dir=tls_dir)
        started.append(sc)
        if start:
            sc.start(wait_upstream=wait_upstream and upstream is not None)
        return sc

    yield make
    check_all_clean_exits(started)


def check_all_clean_exits(started: list) -> None:
    """Fixture teardown: check_clean_exit on every sidecar that was started;
    one failure lists them all."""
    errors = []
    for sc in started:
        if sc.proc is None:
            continue
        try:
            check_clean_exit(sc)
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def link(echo, make_sidecar) -> Sidecar:
    """A TLS link sidecar in front of a fresh echo upstream, upstream up."""
    return make_sidecar(upstream=echo)


# --- client helpers --------------------------------------------------------


def unary(ch: grpc.Channel, method: str, req: bytes = b"", timeout: float = 10.0, **kw):
    return ch.unary_unary(f"/test.Echo/{method}")(req, timeout=timeout, **kw)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    """Calls fn and returns the grpc.RpcError it must raise."""
    try:
        r = fn(*args, **kw)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"expected an RPC error, got a response: {r!r:.200}")


class Bidi:
    """A bidirectional stream driven step by step: send(), recv(), done().

    The request iterator blocks on a queue (bounded waits) so the test
    decides when each message goes out."""

    _END = object()

    def __init__(self, ch: grpc.Channel, method: str = "/test.Echo/Bidi", timeout: Optional[float] = 60):
        self.q: "queue.Queue" = queue.Queue()
        self.call = ch.stream_stream(method)(self._requests(), timeout=timeout)

    def _requests(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                m = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            if m is self._END:
                return
            yield m

    def send(self, m: bytes) -> None:
        self.q.put(m)

    def recv(self) -> bytes:
        return next(self.call)

    def done(self) -> None:
        self.q.put(self._END)

    def cancel(self) -> None:
        self.done()
        self.call.cancel()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def openssl(*args: str, cwd: Optional[Path] = None) -> str:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"
    return r.stdout


def make_ca(d: Path, name: str = "ca", cn: str = "Test CA") -> tuple[Path, Path]:
    """A CA made with the openssl CLI (not by the sidecar): (cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_server_cert(d: Path, ca: tuple[Path, Path], name: str = "server",
                     sans: str = "DNS:localhost,IP:127.0.0.1,IP:::1", rsa: bool = False) -> tuple[Path, Path]:
    """A server certificate signed by |ca| with the openssl CLI: (cert, key)."""
    cert, key, csr, ext = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    keyopt = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl("req", *keyopt, "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key
