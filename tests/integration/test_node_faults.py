"""`flower-sidecar node` on a real, impaired link (issue 5; /tmp/node-spec.md).

    make -s all && /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_node_faults.py
    FS_SIDECAR_BIN=build/flower-sidecar-asan /usr/bin/python3 -m pytest ...   (make build/flower-sidecar-asan)

Root only (network namespaces, nftables); skipped with a message otherwise.

Topology, built per test (tests/integration/netns.py):

    ns A (fsA-<pid>-<n>)                                ns B (fsB-<pid>-<n>)
    emulated SuperLink  h2c 127.0.0.1:9192              emulated SuperNodes --insecure
          ^                                                   |  h2c
    flower-sidecar link  TLS 10.213.x.1:9092  <--veth-->  flower-sidecar node 127.0.0.1:9092
    (auto CA in a tmp --tls-dir, --tls-san 10.213.x.1)    (--tls-ca that ca.pem, verifies the IP)

Both sidecars have their admin port on 127.0.0.1:9099 of their namespace;
health is read with build/flower-probe and /metrics with curl, both run in
namespace B.  Faults are nftables netdev ingress chains on both veth ends:
a silent blackhole (policy drop) or random loss (numgen random mod 100 < N);
latency comes from delay_relay.py, a TCP relay in ns B in front of the veth
(this kernel has no netem); a slow link is a tbf qdisc on both veth ends.

Small timings everywhere: --keepalive-time 1 --keepalive-timeout 1
--backoff-initial 0.5 --backoff-max 2 --connect-timeout 3 on the node
sidecar; the SuperNodes poll every 0.2 s and retry UNAVAILABLE after at most
0.5 s.  They announce a heartbeat interval of 60 s (a heartbeat every ~40 s):
the emulated SuperLink declares a node offline after 2 x 60 s without a call
from it, which even the 60 s outage (plus detection and reconnect) stays
under; in the short outages no 5 s-deadline heartbeat happens to fall (that
case has its own test, test_held_call_with_deadline_ends_unavailable; in the
60 s one they do, end UNAVAILABLE just before their deadline and are
retried).

Tests (each builds its own namespaces and processes):
  baseline ....................... 2 nodes x 3 rounds through both sidecars, one
                                   TLS connection, health SERVING, nothing retried
  keepalive (one silent call) .... PINGs only while a call is open, RTT gauge;
                                   silent blackhole -> upstream.down (keepalive
                                   reason) within KT+KTO+1 s, NOT_SERVING, the call
                                   UNAVAILABLE at once; backoff, upstream.up, SERVING
  keepalive bound after an ACK ... KT 1 / KTO 3: dead within 5 s of the last byte
  60 s blackhole (federation) .... 20 MB model in flight; detection, NOT_SERVING,
                                   in-flight PullMessages UNAVAILABLE (never
                                   repeated), held calls UNAVAILABLE after the
                                   default 20 s hold, reconnect within one delay,
                                   run completes, no duplicates; figures: detection
                                   and first answer after the return, through the
                                   node sidecar and for a plain grpcio client
  short outage ................... calls during an outage shorter than
                                   --hold-timeout are held and succeed
  outage > hold-timeout .......... held calls end UNAVAILABLE "flower-sidecar:
                                   upstream ... unreachable ..." after 2 s; run completes
  held call with a deadline ...... grpc-timeout < hold-timeout ends UNAVAILABLE,
                                   not DEADLINE_EXCEEDED
  random loss and delay .......... 20 % loss and 200 ms each way for a whole run
                                   (2 rounds):
                                   completes, exactly one reply per instruction
  backoff schedule ............... kill -9 of the link, back after 20 s: every
                                   delay x1.6 +-20 % capped,
                                   held calls cause no extra attempts, restart ->
                                   upstream.up + SERVING, schedule reset after SETTINGS
  strict upstream ................ grpcio TLS server: too_many_pings doubles the
                                   keepalive time, one reconnect
  slow link (500 kbit/s) ......... small calls during a 1.5 MiB download wait
                                   behind little more than the link's own queue
                                   (median < 3.5 s), none fails

Judged against the Fleet emulator's own counters (stats file of the
SuperLink, summary files of the SuperNodes) and logs: every round
completes, each instruction gets exactly one reply, and the SuperLink never
receives more side-effecting calls (PushMessages, PullMessages,
ConfirmMessageReceived, node register/activate/deactivate/unregister) than
the SuperNodes made: a surplus would be a repeat made by the sidecar.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

import netns
import procs
from conftest import FIGURES, IS_ASAN, SANITIZER_MARKERS, SIDECAR, SLOW, Events, make_ca, \
    make_server_cert, wait_for
from fleet_emulator import HEARTBEAT_DEADLINE

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = "/usr/bin/python3"
EMULATOR = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
ECHO = str(HERE / "echo_server.py")
RELAY = str(HERE / "delay_relay.py")
PROBE = str(ROOT / "build" / "flower-probe")
CURL = "/usr/bin/curl"

if not netns.is_root():
    pytest.skip("test_node_faults.py needs root (network namespaces, nftables): skipped",
                allow_module_level=True)

# --- the node sidecar's timings under test ----------------------------------
KT = 1.0                 # --keepalive-time
KTO = 1.0                # --keepalive-timeout
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 3.0
DETECT_BOUND = KT + KTO + 1.0   # issue 5: dead link declared within keepalive time + timeout + 1 s
# From the link's return to the connection being back: an attempt started
# during the outage can still be waiting for its SYN (connect timeout), then
# at most one backoff delay (capped at BACKOFF_MAX), plus the TLS handshake.
RECONNECT_BOUND = CONNECT_TIMEOUT + BACKOFF_MAX + 1.5
NODE_TIMINGS = {"--keepalive-time": KT, "--keepalive-timeout": KTO, "--backoff-initial": BACKOFF_INITIAL,
                "--backoff-max": BACKOFF_MAX, "--connect-timeout": CONNECT_TIMEOUT}

SUPERLINK_PORT = 9192    # emulator / echo / strict server, 127.0.0.1 in ns A (strict: veth)
LINK_PORT = 9092         # link sidecar on the veth address of ns A
NODE_PORT = 9092         # node sidecar, 127.0.0.1 in ns B
ADMIN_PORT = 9099        # both sidecars, 127.0.0.1 of their namespace
RELAY_PORT = 9093        # delay_relay.py, 127.0.0.1 in ns B, to the link sidecar
RELAY_DELAY = 0.2        # seconds it adds each way
LINK_DEAD = 20.0         # kill -9 of the link sidecar: restarted after this

# The 60 s blackhole (issue 5) with the node role's default --hold-timeout.
OUTAGE = 60.0
HOLD_TIMEOUT = 20.0
WAITED_RE = re.compile(r"; waited (\d+(?:\.\d+)?) s, ")
# Loop clients across that outage: an unknown method, which the emulated
# SuperLink answers UNIMPLEMENTED (no Fleet call, so no counter moves):
# that answer proves the call went all the way.
LOOP_METHOD = "/fs.test.Probe/Loop"
LOOP_ANSWER = "UNIMPLEMENTED"
LOOP_INTERVAL = 0.2
# A plain client's request stalled in the outage is retransmitted by TCP at
# RTO x (2^k - 1) after it was sent (RTO 0.2-0.3 s on the veth): each
# interval is the time so far plus one RTO, so the first retransmission after
# the link returns comes less than OUTAGE + one RTO after the return.
PLAIN_RECOVERY_BOUND = OUTAGE + 10.0

HEARTBEAT_INTERVAL = "60"
FAST_NODE = ["--poll-interval", "0.2", "--max-retry-wait", "0.5",
             "--heartbeat-interval", HEARTBEAT_INTERVAL]
RUN_TIMEOUT = 60 * SLOW  # one federation, impairments included

# Fleet methods the sidecar must never repeat (node/spec: they end UNAVAILABLE).
NEVER_REPEATED = ("PushMessages", "PullMessages", "ConfirmMessageReceived", "RegisterNode",
                  "ActivateNode", "DeactivateNode", "UnregisterNode")

SIDECAR_DOWN_RE = re.compile(r"^flower-sidecar: ")
# A held call that timed out.  It says when the next connection attempt is:
# "next attempt in N s", or, while an attempt is under way, that it is.
UNREACHABLE_RE = re.compile(r"^flower-sidecar: upstream (?P<up>\S+) unreachable\b.*"
                            r"(next attempt in (?P<n>\d+(?:\.\d+)?) ?s\b|attempt is in progress|"
                            r"link down, probing every \d+(?:\.\d+)? ?s\b)")
# The same between attempts (nothing under way): the delay must be given,
# or, when nothing reached the upstream, the probe interval.
NEXT_ATTEMPT_RE = re.compile(r"^flower-sidecar: upstream (?P<up>\S+) unreachable\b.*"
                             r"next attempt in (?P<n>\d+(?:\.\d+)?) ?s\b")
PROBING_RE = re.compile(r"^flower-sidecar: upstream (?P<up>\S+) unreachable\b.*link down, probing every "
                        r"(?P<n>\d+(?:\.\d+)?) ?s\b")
KEEPALIVE_REASON_RE = re.compile(r"^keepalive: no PING ACK within \d+(?:\.\d+)? ?s$")
# TCP_USER_TIMEOUT is the keepalive timeout too: when request bytes (or the
# PING itself) are unacknowledged, the kernel may give up on the socket at the
# same moment as the keepalive timer.  Either proves the silent link was seen.
SILENT_LINK_REASON_RE = re.compile(r"keepalive|timed out|timeout", re.I)


# ---------------------------------------------------------------- helpers


def ev_time(ev: dict) -> float:
    return dt.datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc).timestamp()


def figure(text: str) -> None:
    FIGURES.append(f"[{os.path.basename(SIDECAR)}] {text}")


def listening_in(pid: int, port: int) -> bool:
    """A LISTEN socket on |port| in the network namespace of process |pid|
    (read from /proc/PID/net: no connection is made)."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration):
            pass
    return False


class NsSidecar:
    """One flower-sidecar process inside a namespace; events on stdout (a
    file), stderr in another file."""

    def __init__(self, fed: "Fed", name: str, role: str, side: str, argv_tail: list[str],
                 listen_port: int):
        self.fed, self.name, self.role, self.side = fed, name, role, side
        self.argv_tail = argv_tail
        self.listen_port = listen_port
        self.events = Events(fed.tmp / f"{name}.events", role)
        self.stderr_path = fed.tmp / f"{name}.stderr"
        self.proc: Optional[subprocess.Popen] = None
        self.killed = False   # by the test (kill -9): no clean exit expected
        self.starts = 0

    def start(self, wait_up: bool = True) -> "NsSidecar":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
        if IS_ASAN:
            env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=16:detect_leaks=1"
            env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        since = len(self.events.all())
        with open(self.events.path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.fed.topo.argv(self.side, SIDECAR, self.role, *self.argv_tail),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True)
        self.starts += 1
        self.killed = False
        wait_for(lambda: self.proc.poll() is not None or listening_in(self.proc.pid, self.listen_port),
                 10 * SLOW, f"{self.name} listening on port {self.listen_port}")
        assert self.proc.poll() is None, \
            f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}"
        if wait_up:
            self.events.wait("upstream.up", timeout=15, since=since)
        return self

    def kill9(self) -> None:
        self.killed = True
        self.proc.kill()  # SIGKILL, by PID
        self.proc.wait(timeout=10)

    def stop(self) -> Optional[str]:
        """SIGTERM (SIGKILL after a while); a problem description or None."""
        if self.proc is None:
            return None
        rc = procs.stop(self.proc, timeout=15 * SLOW)
        problems = []
        if rc != 0 and not self.killed:
            problems.append(f"exit code {rc} (expected 0 after SIGTERM)")
        err = self.stderr()
        if any(m in err for m in SANITIZER_MARKERS):
            problems.append("sanitizer report:\n" + err[-6000:])
        try:
            self.events.all()
        except AssertionError as e:
            problems.append(str(e))
        return f"{self.name}: " + "; ".join(problems) if problems else None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self, lines: int = 60) -> str:
        return (f"--- {self.name} events (tail) ---\n{procs.tail(str(self.events.path), lines)}\n"
                f"--- {self.name} stderr (tail) ---\n{procs.tail(str(self.stderr_path), lines)}")


CLIENT_PY = r'''
import json, sys, time
import grpc
target, method, timeout, count, payload, ca, interval = sys.argv[1:8]
timeout = None if timeout == "none" else float(timeout)
# No keepalive, like a Flower SuperNode's channel; no grpcio retries.
opts = [("grpc.enable_retries", 0)]
if ca == "-":
    ch = grpc.insecure_channel(target, options=opts)
else:
    ch = grpc.secure_channel(target, grpc.ssl_channel_credentials(open(ca, "rb").read()), options=opts)
grpc.channel_ready_future(ch).result(timeout=10)
print("ready", flush=True)
sys.stdin.readline()
out = []
while int(count) == 0 or len(out) < int(count):
    t0 = time.time()
    try:
        ch.unary_unary(method)(payload.encode(), timeout=timeout)
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    out.append({"code": code, "details": details, "t0": t0, "t1": time.time()})
    print("call " + json.dumps(out[-1]), flush=True)
    time.sleep(float(interval))
print(json.dumps(out), flush=True)
'''


class NsClient:
    """A grpcio client (no retries, no keepalive) in ns B, calling the node
    sidecar (or |target| over TLS verified with |ca|): connects first, then
    makes |count| calls (0: until stopped), |interval| s apart, when go() is
    called.  Each call's {code, details, t0, t1} is in calls() as soon as it
    ends."""

    def __init__(self, fed: "Fed", method: str, timeout: Optional[float] = None, count: int = 1,
                 payload: str = "", target: str = f"127.0.0.1:{NODE_PORT}",
                 ca: Optional[Path] = None, interval: float = 0.0):
        script = fed.tmp / "nsclient.py"
        if not script.exists():
            script.write_text(CLIENT_PY)
        self.fed = fed
        self.stderr_path = fed.tmp / f"nsclient{len(fed.clients)}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                fed.topo.argv("b", PY, str(script), target, method,
                              "none" if timeout is None else f"{timeout:g}", str(count), payload,
                              str(ca) if ca else "-", f"{interval:g}"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)
        fed.clients.append(self)
        r, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if r else ""
        assert line.strip() == "ready", f"client did not get ready: {line!r} {self.stderr()}"
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.t_go = 0.0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stderr(self) -> str:
        return procs.tail(str(self.stderr_path), 30)

    def go(self) -> "NsClient":
        self.t_go = time.time()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self

    def calls(self) -> list[dict]:
        """The calls that have ended so far, in order."""
        return [json.loads(ln[5:]) for ln in list(self.lines) if ln.startswith("call ")]

    def result(self, timeout: float) -> list[dict]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"client call(s) still not answered after {timeout:.1f} s") from None
        self.reader.join(timeout=5)
        lines = [ln for ln in self.lines if ln.startswith("[")]
        assert lines, f"client printed no result: {''.join(self.lines)[-1000:]!r} {self.stderr()}"
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


SUPERNODE_UNAVAILABLE_RE = re.compile(
    r"^(?P<hms>\d\d:\d\d:\d\d\.\d{3}) supernode: (?P<method>\w+): UNAVAILABLE \((?P<details>.*)\); retry \d+ in")


class Fed:
    """Everything one test starts, in its own pair of namespaces; teardown
    stops it all by PID and deletes the namespaces."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.topo = netns.Topology.create()
        self.group = procs.ProcGroup(tmp)
        self.sidecars: list[NsSidecar] = []
        self.clients: list[NsClient] = []
        self.link: Optional[NsSidecar] = None
        self.node: Optional[NsSidecar] = None
        self.superlink = None
        self.superlink_lingers = False
        self.stats_path = tmp / "superlink.json"
        self.nodes: list[tuple] = []
        self.tls_dir = tmp / "link-tls"

    @property
    def a(self) -> str:
        return self.topo.addr["a"]

    @property
    def link_addr(self) -> str:
        return f"{self.a}:{LINK_PORT}"

    # -- processes ------------------------------------------------------------

    def start_superlink(self, nodes: int = 2, rounds: int = 3, array_bytes: int = 65536, *extra,
                        linger: bool = False):
        """linger: keep serving after the run (until wait_federation stops
        it), for clients that still need an answer from it."""
        self.superlink_lingers = linger
        self.superlink = self.group.start("superlink", self.topo.argv(
            "a", PY, EMULATOR, "superlink", "--listen", f"127.0.0.1:{SUPERLINK_PORT}",
            "--nodes", str(nodes), "--rounds", str(rounds), "--array-bytes", str(array_bytes),
            "--stats-file", str(self.stats_path),
            *([] if linger else ["--exit-when-done", "--done-grace", "5"]), *extra))
        self._wait_listening(self.superlink, SUPERLINK_PORT, "superlink")
        return self.superlink

    def start_echo(self):
        self.superlink = self.group.start("echo", self.topo.argv(
            "a", PY, ECHO, "--listen", f"127.0.0.1:{SUPERLINK_PORT}"))
        self._wait_listening(self.superlink, SUPERLINK_PORT, "echo")
        return self.superlink

    def _wait_listening(self, proc, port, name):
        wait_for(lambda: proc.poll() is not None or listening_in(proc.pid, port), 20 * SLOW,
                 f"{name} listening on {port}")
        assert proc.poll() is None, f"{name} exited:\n{self.group.logs()}"

    def start_link(self, *extra: str, log_level: str = "INFO") -> NsSidecar:
        if self.link is None:
            self.link = NsSidecar(self, "link", "link", "a", [
                "--listen", self.link_addr, "--upstream", f"127.0.0.1:{SUPERLINK_PORT}",
                "--admin", f"127.0.0.1:{ADMIN_PORT}", "--tls-dir", str(self.tls_dir),
                "--tls-san", self.a, "--drain-timeout", "2", "--log-level", log_level, *extra],
                LINK_PORT)
            self.sidecars.append(self.link)
        return self.link.start()

    def start_node(self, *extra: str, upstream: Optional[str] = None, ca: Optional[Path] = None,
                   wait_up: bool = True, timings: Optional[dict] = None) -> NsSidecar:
        """timings: flags of NODE_TIMINGS to set to other values."""
        if self.node is None:
            t = {**NODE_TIMINGS, **(timings or {})}
            self.node = NsSidecar(self, "node", "node", "b", [
                "--upstream", upstream or self.link_addr,
                "--tls-ca", str(ca or (self.tls_dir / "ca.pem")),
                "--listen", f"127.0.0.1:{NODE_PORT}", "--admin", f"127.0.0.1:{ADMIN_PORT}",
                "--drain-timeout", "2", *(x for k, v in t.items() for x in (k, f"{v:g}")), *extra],
                NODE_PORT)
            self.sidecars.append(self.node)
        return self.node.start(wait_up=wait_up)

    def start_supernodes(self, n: int = 2, rounds: int = 3, *extra: str) -> None:
        for i in range(n):
            name = f"supernode{len(self.nodes)}"
            summary = self.tmp / f"{name}.json"
            p = self.group.start(name, self.topo.argv(
                "b", PY, EMULATOR, "supernode", "--upstream", f"127.0.0.1:{NODE_PORT}", "--insecure",
                *FAST_NODE, "--rounds", str(rounds), "--summary-file", str(summary), *extra))
            self.nodes.append((name, p, summary))

    def wait_federation(self, timeout: float = RUN_TIMEOUT) -> tuple[dict, list[dict]]:
        """Waits for the SuperNodes and the SuperLink to exit (a lingering
        one is stopped once the SuperNodes are gone); (stats, summaries)."""
        deadline = time.monotonic() + timeout
        for name, p, _ in self.nodes + [("superlink", self.superlink, None)]:
            try:
                if name == "superlink" and self.superlink_lingers:
                    wait_for(lambda: self.stats().get("done"), max(0.1, deadline - time.monotonic()),
                             "the SuperLink's stats saying done")
                    rc = procs.stop(p, timeout=10)
                else:
                    rc = procs.wait_exit(p, max(0.1, deadline - time.monotonic()))
            except (TimeoutError, AssertionError):
                raise AssertionError(
                    f"federation not finished after {timeout:.0f} s ({name} still running)\n"
                    f"{self.stats_digest()}\n{self.logs()}") from None
            assert rc == 0, f"{name} exited with {rc}\n{self.logs()}"
        return self.stats(), [json.loads(s.read_text()) for _, _, s in self.nodes]

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stats_digest(self) -> str:
        s = self.stats()
        keep = ("done", "rounds_completed", "rounds", "calls", "replies_total", "conflicting_replies",
                "auth_failures", "nodes")
        # An instruction handed out (PullMessages) but never confirmed: its
        # answer was lost on the way to the node.  Flower's SuperLink never
        # hands a message out twice, so that round cannot complete.
        lost = sorted(set(s.get("dispatch_by_message_id", {})) - set(s.get("confirm_by_message_id", {})))
        return ("superlink stats: " + json.dumps({k: s.get(k) for k in keep})[:3000] +
                f"\ndispatched but never confirmed: {lost}")

    def supernode_unavailable(self) -> list[dict]:
        """Every UNAVAILABLE the SuperNodes saw (from their logs): node, method,
        details, time (epoch s)."""
        out = []
        today = dt.datetime.now(dt.timezone.utc).date()
        for name, _, _ in self.nodes:
            for line in procs.tail(self.group.log_path(name), 100000).splitlines():
                m = SUPERNODE_UNAVAILABLE_RE.match(line)
                if m:
                    t = dt.datetime.combine(today, dt.time.fromisoformat(m["hms"]),
                                            tzinfo=dt.timezone.utc).timestamp()
                    out.append({"node": name, "method": m["method"], "details": m["details"], "t": t})
        return out

    def logs(self) -> str:
        parts = [self.group.logs(30)]
        parts += [sc.logs(40) for sc in self.sidecars if sc.proc is not None]
        return "\n".join(parts)

    # -- admin port of the node sidecar (ns B) --------------------------------

    def probe(self, side: str = "b") -> int:
        """flower-probe exit code: 0 SERVING, 4 NOT_SERVING, 2/3 no answer."""
        r = subprocess.run(self.topo.argv(side, PROBE, "-addr", f"127.0.0.1:{ADMIN_PORT}", "-service",
                                          "flwr.proto.Fleet", "-connect-timeout", "1s",
                                          "-rpc-timeout", "1s"),
                           capture_output=True, text=True, timeout=10)
        return r.returncode

    def wait_probe(self, code: int, timeout: float, side: str = "b") -> float:
        """Polls until flower-probe exits |code|; the time it first did."""
        last = []

        def check():
            rc = self.probe(side)
            last[:] = [rc]
            return time.time() if rc == code else None
        try:
            return wait_for(check, timeout, f"flower-probe exit {code}", interval=0.05)
        except AssertionError as e:
            raise AssertionError(f"{e} (last exit code {last})\n{self.logs()}") from None

    def healthz(self, side: str = "b") -> str:
        """GET /healthz's body (the verdict and its reason)."""
        r = subprocess.run(self.topo.argv(side, CURL, "-sS", "--max-time", "3",
                                          f"http://127.0.0.1:{ADMIN_PORT}/healthz"),
                           capture_output=True, text=True, timeout=10)
        return r.stdout

    def metrics(self, side: str = "b") -> dict:
        """{metric name: value summed over its series} from GET /metrics."""
        r = subprocess.run(self.topo.argv(side, CURL, "-sS", "--max-time", "3",
                                          f"http://127.0.0.1:{ADMIN_PORT}/metrics"),
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"GET /metrics failed: {r.stderr}"
        out: dict[str, float] = {}
        for line in r.stdout.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m:
                out[m[1]] = out.get(m[1], 0.0) + float(m[3])
        return out

    def metric(self, name: str, side: str = "b") -> float:
        m = self.metrics(side)
        assert name in m, f"metric {name} missing from /metrics of ns {side}: have {sorted(m)}"
        return m[name]

    # -- teardown -------------------------------------------------------------

    def teardown(self) -> list[str]:
        problems = []
        try:
            self.topo.clear()   # so that draining sidecars can finish quickly
        except Exception as e:  # noqa: BLE001 - teardown must go on
            problems.append(f"clearing faults: {e}")
        for c in self.clients:
            c.stop()
        for name, p, _ in self.nodes:
            procs.stop(p, timeout=3)
        for sc in reversed(self.sidecars):
            p = sc.stop()
            if p:
                problems.append(p + "\n" + sc.logs())
        self.group.stop_all(timeout=3)
        self.topo.destroy()
        return problems


@pytest.fixture(scope="module", autouse=True)
def prerequisites():
    for path in (SIDECAR, PROBE):
        assert os.access(path, os.X_OK), f"{path} missing: run make -s all"
    netns.cleanup_stale()
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True, timeout=120)


@pytest.fixture
def fed(tmp_path):
    f = Fed(tmp_path)
    try:
        yield f
    finally:
        problems = f.teardown()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def start_federation(fed: Fed, *node_flags: str, nodes: int = 2, rounds: int = 3,
                     array_bytes: int = 65536, link_log_level: str = "INFO",
                     linger: bool = False) -> None:
    fed.start_superlink(nodes, rounds, array_bytes, linger=linger)
    fed.start_link(log_level=link_log_level)
    fed.start_node(*node_flags)
    fed.start_supernodes(nodes, rounds)


def assert_federation(fed: Fed, stats: dict, summaries: list[dict], nodes: int = 2,
                      rounds: int = 3) -> None:
    """The run completed and nothing was lost, duplicated or altered."""
    ctx = f"{fed.stats_digest()}\n{fed.logs()}"
    assert stats.get("done"), ctx
    assert stats["rounds_completed"] == {"train": rounds, "evaluate": rounds}, ctx
    for r in stats["rounds"]:
        assert (r["dispatched"], r["replies"], r["missing"]) == (nodes, nodes, 0), (r, ctx)
    for key in ("auth_failures", "integrity_errors", "late_replies", "conflicting_replies",
                "handler_crashes", "driver_crashed", "injected_failures"):
        assert stats[key] == 0, (key, stats[key], ctx)
    assert stats["nodes"]["offline"] == [], ctx
    for s in summaries:
        assert s["exit_reason"] == "done" and s["fatal"] is None, (s["exit_reason"], s["fatal"], ctx)
        assert s["replies"] == 2 * rounds, ctx
        # Everything a SuperNode had to retry was UNAVAILABLE (Flower retries
        # nothing else).
        assert set(s["errors_by_status"]) <= {"UNAVAILABLE"}, (s["errors_by_status"], ctx)

    # Each instruction handed out once and answered exactly once.
    instr = [i["message_id"] for s in summaries for i in s["instructions"]]
    replies = [i["reply_id"] for s in summaries for i in s["instructions"]]
    assert len(set(instr)) == len(instr) == 2 * rounds * nodes, ctx
    assert len(set(replies)) == len(replies) == 2 * rounds * nodes, ctx
    assert stats["dispatch_by_message_id"] == {i: 1 for i in instr}, ctx
    assert stats["replies_total"] == 2 * rounds * nodes, ctx

    # No side-effecting call repeated by the sidecar: the SuperLink got at
    # most what the SuperNodes sent (their own retries included) ...
    for m in NEVER_REPEATED:
        sent = sum(s["calls"].get(m, 0) for s in summaries)
        got = stats["calls"].get(m, 0)
        assert got <= sent, f"SuperLink received {got} {m} calls, the SuperNodes made {sent}\n{ctx}"
    # ... and per message: once, plus at most that node's own retries.
    for s in summaries:
        push_retries = s["retries_by_method"].get("PushMessages", 0)
        confirm_retries = s["retries_by_method"].get("ConfirmMessageReceived", 0)
        for i in s["instructions"]:
            n = stats["push_messages_by_message_id"].get(i["reply_id"], 0)
            assert 1 <= n <= 1 + push_retries, (i["reply_id"], n, push_retries, ctx)
            n = stats["confirm_by_message_id"].get(i["message_id"], 0)
            assert 1 <= n <= 1 + confirm_retries, (i["message_id"], n, confirm_retries, ctx)
    # Every UNAVAILABLE a SuperNode saw was made up by the sidecar (and
    # retryable for Flower 1.26).
    for u in fed.supernode_unavailable():
        assert SIDECAR_DOWN_RE.match(u["details"]), (u, ctx)
        assert "handshake failed" not in u["details"], (u, ctx)


def wait_first_dispatch(fed: Fed) -> None:
    """Waits for the first instruction handed to a node, seen in the node
    sidecar's events (written at once; the SuperLink's stats file is
    rewritten every 0.5 s, and a whole 64 KB run can be over by then)."""
    wait_for(lambda: fed.node.events.find("message.dispatch"), 30 * SLOW,
             "first instruction dispatched", interval=0.005)


def wait_down(fed: Fed, since: int, timeout: float) -> dict:
    try:
        return fed.node.events.wait("upstream.down", timeout=timeout, since=since)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fed.logs()}") from None


# ------------------------------------------------------------------ tests


def test_baseline_federation_through_node_and_link(fed):
    """2 SuperNodes, 3 rounds: node sidecar -> TLS over the veth -> link
    sidecar -> SuperLink, on one multiplexed connection, nothing retried."""
    t0 = time.monotonic()
    fed.start_superlink(2, 3)
    fed.start_link()
    # Hostname verification against the name instead of the IP (the auto
    # certificate has localhost too).
    fed.start_node("--tls-server-name", "localhost")
    assert fed.probe() == 0, fed.logs()
    assert fed.metric("flower_sidecar_upstream_up") == 1
    fed.start_supernodes(2, 3)
    stats, summaries = fed.wait_federation()
    assert_federation(fed, stats, summaries)
    for s in summaries:
        assert s["retries"] == 0 and s["errors_by_status"] == {}, s
    assert fed.probe() == 0, fed.logs()

    # The node sidecar carried both SuperNodes over ONE TLS connection.
    opens = fed.link.events.find("conn.open", peer=lambda p: p.startswith(fed.topo.addr["b"] + ":"))
    assert len(opens) == 1, opens
    assert opens[0]["tls_version"] in ("TLSv1.3", "TLSv1.2") and opens[0]["alpn"] == "h2", opens
    assert fed.node.events.find("upstream.down") == [], fed.node.logs()
    up = fed.node.events.find("upstream.up")
    assert len(up) == 1 and up[0]["upstream"] == fed.link_addr, up
    assert len(fed.node.events.find("conn.open")) == 2, fed.node.logs()  # one per SuperNode
    m = fed.metrics()
    assert m.get("flower_sidecar_upstream_connects_total") == 1, m
    # Requests went out at once: nothing had to wait for the upstream.
    assert m.get("flower_sidecar_calls_held_total", 0) == 0, m
    assert m.get("flower_sidecar_calls_failed_upstream_down_total", 0) == 0, m
    assert m.get("flower_sidecar_call_retries_total", 0) == 0, m
    figure(f"baseline federation (2 nodes, 3 rounds) via node+link sidecars: "
           f"{time.monotonic() - t0:.1f} s including start-up")


def test_keepalive_detects_silent_blackhole_with_call_in_flight(fed):
    """One long call in flight and nothing else: PINGs flow while it is open
    (RTT measured); a silent blackhole is declared dead within keepalive
    time + timeout (+1 s): upstream.down, NOT_SERVING, the call UNAVAILABLE
    at once (not after TCP's minutes); after the link returns the sidecar
    reconnects (backoff, then upstream.up) and is SERVING again."""
    fed.start_echo()
    fed.start_link()
    fed.start_node()
    m0 = fed.metrics()
    assert m0.get("flower_sidecar_keepalive_pings_total", 0) == 0, \
        "PINGs were sent while no call was open"
    # A 30 s call that stays silent: without keepalive nothing would notice.
    call = NsClient(fed, "/test.Echo/Sleep", payload="30").go()
    time.sleep(KT * 2.5)
    m1 = fed.metrics()
    pings = m1.get("flower_sidecar_keepalive_pings_total")
    assert pings is not None and pings >= 1, f"no keepalive PING during a silent call: {m1}"
    rtt = m1.get("flower_sidecar_upstream_ping_rtt_seconds")
    assert rtt is not None and 0 < rtt < 0.5, f"ping RTT gauge: {rtt}"
    assert fed.probe() == 0

    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    down = wait_down(fed, mark, DETECT_BOUND + 5)
    detect = ev_time(down) - t_bh
    figure(f"silent blackhole, one call open: upstream.down after {detect:.2f} s "
           f"(reason {down['reason']!r})")
    assert detect <= DETECT_BOUND, f"dead link declared after {detect:.2f} s: {down}"
    assert down["upstream"] == fed.link_addr, down
    assert SILENT_LINK_REASON_RE.search(down["reason"]), down
    assert KEEPALIVE_REASON_RE.match(down["reason"]), \
        f"upstream.down reason is not the keepalive one: {down['reason']!r}"
    assert down["level"] == "warn", down

    t_ns = fed.wait_probe(4, DETECT_BOUND + 2)
    assert t_ns - t_bh <= DETECT_BOUND + 0.5, f"health NOT_SERVING {t_ns - t_bh:.2f} s after the blackhole"
    hc = fed.node.events.find("health.change", since=mark, to="NOT_SERVING")
    assert hc and ev_time(hc[0]) - t_bh <= DETECT_BOUND, hc

    [r] = call.result(timeout=DETECT_BOUND + 5)
    assert r["code"] == "UNAVAILABLE", r
    assert SIDECAR_DOWN_RE.match(r["details"]), r
    assert "handshake failed" not in r["details"], r
    assert r["t1"] - t_bh <= DETECT_BOUND + 0.3, f"in-flight call ended {r['t1'] - t_bh:.2f} s after the blackhole"
    assert fed.metric("flower_sidecar_calls_failed_upstream_down_total") >= 1

    # Outage: nothing reaches the silent link, so probes (not backoff delays)
    # look for it.
    time.sleep(max(0.0, t_bh + 7 - time.time()))
    assert fed.metric("flower_sidecar_upstream_probes_total") >= 2, fed.node.logs()
    assert fed.probe() == 4
    restore_link(fed, mark, "link back")
    # And calls go through again.
    [r] = NsClient(fed, "/test.Echo/Unary", timeout=5, payload="hello").go().result(timeout=10)
    assert r["code"] == "OK", r


def restore_link(fed, mark: int, label: str) -> float:
    """Ends the blackhole; the node must reconnect within RECONNECT_BOUND and
    report SERVING again.  The time the link returned."""
    t_clear = time.time()
    fed.topo.clear()
    up = fed.node.events.wait("upstream.up", timeout=RECONNECT_BOUND + 5, since=mark)
    back = ev_time(up) - t_clear
    figure(f"{label} -> upstream.up after {back:.2f} s")
    assert back <= RECONNECT_BOUND, f"upstream.up {back:.2f} s after the link returned"
    fed.wait_probe(0, 3)
    return t_clear


def test_keepalive_detection_bound_right_after_ping_ack(fed):
    """The bound counts from the last byte received: with --keepalive-time 1
    --keepalive-timeout 3, a link that goes silent right after a PING ACK is
    declared dead within 1 + 3 (+1) s; the next PING is due 1 s after that
    ACK, not when the sidecar happens to look again."""
    kt, kto = 1.0, 3.0
    fed.start_echo()
    fed.start_link()
    fed.start_node(timings={"--keepalive-time": kt, "--keepalive-timeout": kto})
    call = NsClient(fed, "/test.Echo/Sleep", payload="30").go()

    # The first PING's ACK is back once the RTT gauge is set.
    def acked():
        m = fed.metrics()
        return m if m.get("flower_sidecar_upstream_ping_rtt_seconds", 0) > 0 else None
    m = wait_for(acked, kt + kto + 2, "the first PING ACK (ping RTT gauge)", interval=0.01)
    assert m.get("flower_sidecar_keepalive_pings_total") == 1, m
    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    bound = kt + kto + 1.0
    down = wait_down(fed, mark, bound + 6)
    detect = ev_time(down) - t_bh
    figure(f"keepalive {kt:g}/{kto:g} s, silent right after a PING ACK: upstream.down after "
           f"{detect:.2f} s (bound {bound:g} s), reason {down['reason']!r}")
    assert SILENT_LINK_REASON_RE.search(down["reason"]), down
    assert detect <= bound, f"dead link declared {detect:.2f} s after the last byte (bound {bound:g} s): {down}"
    [r] = call.result(timeout=10)
    assert r["code"] == "UNAVAILABLE" and r["t1"] - t_bh <= bound + 0.3, r


def secs(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} s"


def full_hold(waited: float) -> bool:
    """|waited| (from a held call's grpc-message) is the whole --hold-timeout."""
    return HOLD_TIMEOUT - 0.05 <= waited <= HOLD_TIMEOUT + 0.3


def loop_figures(calls: list[dict], t_bh: float, t_clear: float) -> tuple[Optional[float], Optional[float]]:
    """For a client calling LOOP_METHOD in a loop across an outage: (seconds
    from the blackhole to the first call that ended without the SuperLink's
    answer, or None if none did before the link returned; seconds from the
    link's return to the first answer)."""
    failed = [c["t1"] for c in calls if c["t1"] >= t_bh and c["code"] != LOOP_ANSWER]
    answered = [c["t1"] for c in calls if c["t1"] >= t_clear and c["code"] == LOOP_ANSWER]
    detect = failed[0] - t_bh if failed and failed[0] < (answered or [float("inf")])[0] else None
    return detect, (answered[0] - t_clear if answered else None)


@pytest.mark.long
def test_blackhole_60s_during_federation(fed):
    """A silent blackhole of 60 s while object transfers of a 20 MB model are
    in flight, with the node role's default --hold-timeout (20 s): the link
    is declared dead within keepalive time + timeout (+1 s) and health goes
    NOT_SERVING; calls in flight end UNAVAILABLE at once (a non-repeatable
    one is never repeated); calls made during the outage are held 20 s (a
    heartbeat: until just before its 5 s deadline), then end UNAVAILABLE
    "flower-sidecar: upstream ... unreachable ...; waited 20.0 s, next attempt
    in N s" (or "a connection attempt is in progress"), which the SuperNodes
    retry; the connection is back within one backoff delay after the link
    returns and the run completes with no duplicated side-effecting call.

    The SuperNodes announce a heartbeat interval of 60 s: the emulated
    SuperLink declares a node offline after 2 x 60 s without any call from
    it, longer than the 60 s outage plus detection and reconnect (under
    70 s), so no node drops out of the run (assert_federation checks the
    offline list is empty).  Their heartbeats during the outage (5 s
    deadline) end UNAVAILABLE and are retried like every other call.

    Measured in the same outage, for the issue's comparison: a loop client
    through the node sidecar and a plain grpcio client (TLS straight to the
    link sidecar across the veth, no keepalive: a Flower SuperNode's
    channel), each calling LOOP_METHOD every LOOP_INTERVAL s without a
    deadline; when each noticed the blackhole and how long after the link's
    return each got its first answer.  Only the sidecar's side is asserted;
    the plain client is only required to recover at all (its stalled request
    waits for TCP's exponentially backed-off retransmission: the first one
    after the return comes less than OUTAGE + one RTO after it)."""
    # The SuperLink lingers after the run: the plain client needs its answer.
    start_federation(fed, array_bytes=20_000_000, link_log_level="DEBUG", linger=True)
    via_node = NsClient(fed, LOOP_METHOD, count=0, interval=LOOP_INTERVAL).go()
    plain = NsClient(fed, LOOP_METHOD, count=0, interval=LOOP_INTERVAL, target=fed.link_addr,
                     ca=fed.tls_dir / "ca.pem").go()
    # Trigger: the first model chunk handed to a node; the rest are in flight.
    wait_for(lambda: fed.link.events.find("object.pull", object_type="ArrayChunk"), 30 * SLOW,
             f"a model chunk pulled\n{fed.logs()}")
    for c in (via_node, plain):
        wait_for(lambda: any(x["code"] == LOOP_ANSWER for x in c.calls()), 5 * SLOW,
                 f"a first answer to the loop client: {c.calls()[-3:]} {c.stderr()}")
    # A PullMessages of our own (no Flower auth headers) put on the dead link
    # right away: in flight, never repeatable; if the sidecar ever repeated
    # it the SuperLink would count an auth failure.
    probe_call = NsClient(fed, "/flwr.proto.Fleet/PullMessages")
    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    probe_call.go()
    down = wait_down(fed, mark, DETECT_BOUND + 5)
    detect = ev_time(down) - t_bh
    figure(f"60 s blackhole during federation: upstream.down after {detect:.2f} s "
           f"(reason {down['reason']!r})")
    assert detect <= DETECT_BOUND, f"dead link declared after {detect:.2f} s: {down}"
    assert SILENT_LINK_REASON_RE.search(down["reason"]), down
    t_ns = fed.wait_probe(4, DETECT_BOUND + 2)
    assert t_ns - t_bh <= DETECT_BOUND + 0.5, f"NOT_SERVING {t_ns - t_bh:.2f} s after the blackhole"
    [r] = probe_call.result(timeout=DETECT_BOUND + 5)
    assert r["code"] == "UNAVAILABLE" and SIDECAR_DOWN_RE.match(r["details"]), r
    assert "unreachable" not in r["details"], \
        f"the in-flight call was held, not failed: {r}"
    assert r["t1"] - t_bh <= DETECT_BOUND + 0.3, f"in-flight call ended {r['t1'] - t_bh:.2f} s after the blackhole"

    time.sleep(max(0.0, t_bh + OUTAGE - time.time()))
    assert fed.metric("flower_sidecar_upstream_probes_total") >= OUTAGE / 2, "no probes during the outage"
    assert fed.probe() == 4
    t_clear = restore_link(fed, mark, "60 s blackhole: link back")

    # The loop client through the node sidecar: its call in flight ended at
    # the detection, the ones after it were held 20 s each.
    calls = via_node.calls()
    held = [c for c in calls if t_bh <= c["t1"] <= t_clear and c["code"] != LOOP_ANSWER]
    assert held and held[0]["t1"] - t_bh <= DETECT_BOUND + 0.3, \
        f"the loop client's call in flight ended late (or not): {held[:2]}"
    for c in held[1:]:
        assert c["code"] == "UNAVAILABLE", c
        m = UNREACHABLE_RE.match(c["details"])
        assert m and m["up"] == fed.link_addr, f"grpc-message of a held call: {c['details']!r}"
        assert HOLD_TIMEOUT - 0.2 <= c["t1"] - c["t0"] <= HOLD_TIMEOUT + 0.5, \
            f"held {c['t1'] - c['t0']:.2f} s with --hold-timeout {HOLD_TIMEOUT:g}: {c}"
        assert full_hold(float(WAITED_RE.search(c["details"])[1])), c
    # 60 s: at least two full holds after the first detection.
    assert len(held) >= 3, f"loop client calls during the outage: {held}"
    figure(f"60 s blackhole: held call ended after {held[1]['t1'] - held[1]['t0']:.2f} s: "
           f"{held[1]['details']!r}")

    # The comparison.  The node sidecar path is bounded by what the sidecar
    # promises (its held call goes out on the new connection; or, if its
    # hold ran out just before, the next one LOOP_INTERVAL later); the plain
    # client only has to come back at all.
    def wait_answer(client: NsClient, bound: float, who: str) -> None:
        wait_for(lambda: loop_figures(client.calls(), t_bh, t_clear)[1] is not None,
                 max(0.1, t_clear + bound - time.time()),
                 f"the {who}'s first answer within {bound:g} s of the link's return", interval=0.05)

    node_bound = RECONNECT_BOUND + LOOP_INTERVAL + 0.5
    try:
        wait_answer(via_node, node_bound, "node sidecar loop client")
        wait_answer(plain, PLAIN_RECOVERY_BOUND, "plain client")
    finally:
        node_detect, node_back = loop_figures(via_node.calls(), t_bh, t_clear)
        plain_detect, plain_ok = loop_figures(plain.calls(), t_bh, t_clear)
        stall = max((c["t1"] - c["t0"] for c in plain.calls() if c["t1"] >= t_bh), default=None)
        figure(f"60 s blackhole, detection: node sidecar {secs(node_detect)} (upstream.down "
               f"{detect:.2f} s); plain grpcio client (no keepalive) "
               + (secs(plain_detect) if plain_detect is not None else "never (no call failed)"))
        figure(f"60 s blackhole, link return -> first answer: node sidecar {secs(node_back)}; "
               "plain grpcio client "
               + (f"{secs(plain_ok)} (its call stalled {secs(stall)})" if plain_ok is not None else
                  f"none within {PLAIN_RECOVERY_BOUND:g} s"))
    assert node_back <= node_bound, \
        f"first answer through the node sidecar {node_back:.2f} s after the return"

    stats, summaries = fed.wait_federation()
    assert_federation(fed, stats, summaries)
    # What the SuperNodes saw: calls in flight failed at the detection (not
    # after TCP's minutes), the others after their hold.
    seen = [u for u in fed.supernode_unavailable() if u["t"] >= t_bh - 0.5]
    waits = []
    for u in seen:
        assert u["t"] <= t_clear + RECONNECT_BOUND + 0.5, f"UNAVAILABLE after the link was back: {u}"
        if u["t"] - t_bh <= DETECT_BOUND + 0.5:
            continue
        m = UNREACHABLE_RE.match(u["details"])
        w = WAITED_RE.search(u["details"])
        assert m and w and m["up"] == fed.link_addr, f"a SuperNode call ended UNAVAILABLE late: {u}"
        waited = float(w[1])
        waits.append(waited)
        if u["method"] == "SendNodeHeartbeat":
            assert waited < HEARTBEAT_DEADLINE, u
        else:
            assert full_hold(waited), u
    assert any(map(full_hold, waits)), f"no SuperNode call was held {HOLD_TIMEOUT:g} s: {seen}"
    assert stats["nodes"]["offline"] == [] and not stats["nodes"]["back_online"], stats["nodes"]
    figure(f"60 s blackhole: SuperNodes saw {len(seen)} UNAVAILABLE ({len(waits)} after a hold, "
           f"waited {sorted(set(waits))} s), retries {[s['retries_by_method'] for s in summaries]}")


def test_short_outage_calls_are_held_and_succeed(fed):
    """The upstream connection is already dropped (keepalive) and the link is
    silent for less than --hold-timeout: calls made meanwhile wait and go
    through after the reconnect; nobody sees UNAVAILABLE for them."""
    start_federation(fed, "--hold-timeout", "10")
    wait_first_dispatch(fed)
    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    down = wait_down(fed, mark, DETECT_BOUND + 5)
    t_down = ev_time(down)
    assert t_down - t_bh <= DETECT_BOUND, down
    fed.wait_probe(4, 3)
    # A call made while the upstream is down (the emulated SuperLink answers
    # an unknown method UNIMPLEMENTED: that it answers at all proves the
    # call was held and then sent).
    held = NsClient(fed, "/fs.test.Probe/Held")
    held.go()
    time.sleep(1.5)
    t_clear = time.time()
    fed.topo.clear()
    [r] = held.result(timeout=CONNECT_TIMEOUT + BACKOFF_MAX + 10)
    assert r["code"] == "UNIMPLEMENTED", f"held call: {r}\n{fed.node.logs()}"
    waited = r["t1"] - r["t0"]
    assert waited >= t_clear - held.t_go - 0.2, f"the call did not wait for the upstream: {r}"
    figure(f"short outage: call held {waited:.2f} s, answered after the link returned "
           f"({r['t1'] - t_clear:.2f} s after)")
    up = fed.node.events.wait("upstream.up", timeout=5, since=mark)
    assert ev_time(up) >= t_clear - 0.1
    assert fed.metric("flower_sidecar_calls_held_total") > 0
    fed.wait_probe(0, 3)

    stats, summaries = fed.wait_federation()
    assert_federation(fed, stats, summaries)
    # Only calls in flight when the connection died may have ended
    # UNAVAILABLE; none because a hold expired.
    for u in fed.supernode_unavailable():
        assert not UNREACHABLE_RE.match(u["details"]), u
        assert u["t"] <= t_down + 0.5, f"a SuperNode saw UNAVAILABLE after the drop: {u}"


def test_outage_longer_than_hold_timeout(fed):
    """Held calls end UNAVAILABLE after --hold-timeout (2 s) with
    "flower-sidecar: upstream HOST:PORT unreachable ...; next attempt in N s";
    the SuperNodes' own retries take over and the federation completes after
    the link returns."""
    start_federation(fed, "--hold-timeout", "2")
    wait_first_dispatch(fed)
    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    wait_down(fed, mark, DETECT_BOUND + 5)
    held = NsClient(fed, "/fs.test.Probe/Held").go()
    [r] = held.result(timeout=10)
    waited = r["t1"] - r["t0"]
    assert r["code"] == "UNAVAILABLE", r
    m = UNREACHABLE_RE.match(r["details"])
    assert m, f"grpc-message of a held call that timed out: {r['details']!r}"
    assert m["up"] == fed.link_addr, r
    assert m["n"] is None or float(m["n"]) <= BACKOFF_MAX + CONNECT_TIMEOUT, r
    assert 2.0 - 0.3 <= waited <= 2.0 + 1.0, f"held for {waited:.2f} s with --hold-timeout 2"
    figure(f"hold-timeout 2 s: held call ended after {waited:.2f} s: {r['details']!r}")

    time.sleep(max(0.0, t_bh + 9 - time.time()))
    unav = [u for u in fed.supernode_unavailable() if UNREACHABLE_RE.match(u["details"])]
    assert unav, f"no SuperNode call ended with the hold-timeout message\n{fed.logs()}"
    assert fed.metric("flower_sidecar_calls_failed_upstream_down_total") >= 2
    t_clear = time.time()
    fed.topo.clear()
    up = fed.node.events.wait("upstream.up", timeout=RECONNECT_BOUND + 5, since=mark)
    assert ev_time(up) - t_clear <= RECONNECT_BOUND, up
    stats, summaries = fed.wait_federation()
    assert_federation(fed, stats, summaries)
    assert sum(s["retries"] for s in summaries) >= len(unav), summaries


def test_held_call_with_deadline_ends_unavailable(fed):
    """A call with its own grpc-timeout shorter than --hold-timeout (like a
    SuperNode's 5 s heartbeat) that cannot reach the upstream must end
    UNAVAILABLE (Flower's SuperNode retries nothing else), not run into its
    deadline as DEADLINE_EXCEEDED."""
    fed.start_superlink(2, 3)
    fed.start_link()
    fed.start_node("--hold-timeout", "10")
    mark = len(fed.node.events.all())
    fed.link.kill9()
    wait_down(fed, mark, 5)
    fed.wait_probe(4, 3)
    [r] = NsClient(fed, "/flwr.proto.Fleet/SendNodeHeartbeat", timeout=2).go().result(timeout=10)
    assert r["code"] == "UNAVAILABLE", f"held call with a 2 s deadline: {r}"
    assert NEXT_ATTEMPT_RE.match(r["details"]) or PROBING_RE.match(r["details"]), r
    assert r["t1"] - r["t0"] <= 2.0 + 0.2, r


@pytest.mark.long
def test_random_loss_and_delay_federation_completes(fed):
    """20 % packet loss each way on the veth and 200 ms added each way (the
    delay relay in ns B, between the node sidecar and the veth) for a whole
    federation: it completes, each instruction gets exactly one reply,
    nothing duplicated.  Two rounds (train and evaluate each) rather than
    three: over this link a run takes 30 to 110 s with three (TCP stalls of
    10+ s happen), and the suite has to stay within a few minutes.

    Node timings for a ~400 ms RTT link whose segments are often
    retransmitted: --keepalive-time 2 (a PING after 2 s without a byte while
    a call is open: five RTTs, so PINGs do happen during the run) and
    --keepalive-timeout 10.  The PING and its ACK cross the relay in 0.4 s,
    but what bounds the silence is TCP's retransmission on the lossy veth: a
    segment or its ACK is lost 36 % of the time, the RTO starts at ~0.25 s
    (3 s on a connection whose SYN was retransmitted) and doubles at each
    loss, so 5 losses in a row of one segment are ~8 s of silence (2 after a
    lost SYN: 9 s; a PING answered after 9.0 s was seen).  With 5 s (silence
    limit 7 s) keepalive dropped the connection in about one run in seven;
    10 s (limit 12 s) makes that rarer (still seen once in ten runs), and a
    drop is survived: calls without side effects are repeated by the
    sidecar, the others retried by the SuperNodes.
    --connect-timeout 10: TCP connect, TLS and SETTINGS take ~3 RTTs (1.2 s)
    plus a lost SYN's retransmissions after 1 s and 3 s.  The node verifies
    the link's certificate for 127.0.0.1 (the relay's address), which the
    auto-generated certificate covers.

    Heartbeats run through the lossy link at Flower's default interval (30 s:
    one every ~20 s; a shorter one would let the SuperLink's 2 x interval
    offline rule fire during TCP's 10 s stalls), each with Flower's 5 s
    deadline: one forwarded onto the connection while TCP is stalled (alive,
    but seconds without a byte getting through) gets a PING probe halfway to
    its deadline and, unanswered, ends UNAVAILABLE, which the SuperNode
    retries, instead of DEADLINE_EXCEEDED, which would stop it.  The SuperLink
    lingers: over this link UnregisterNode can come more than a second after
    DeactivateNode, when an --exit-when-done SuperLink is already gone."""
    rounds = 2
    fed.start_superlink(2, rounds, linger=True)
    fed.start_link()
    relay = fed.group.start("relay", fed.topo.argv(
        "b", PY, RELAY, "--listen", f"127.0.0.1:{RELAY_PORT}", "--upstream", fed.link_addr,
        "--delay", f"{RELAY_DELAY:g}"))
    fed._wait_listening(relay, RELAY_PORT, "delay relay")
    fed.start_node("--log-level", "DEBUG", upstream=f"127.0.0.1:{RELAY_PORT}",
                   timings={"--keepalive-time": 2, "--keepalive-timeout": 10, "--connect-timeout": 10})
    mark = len(fed.node.events.all())
    fed.start_supernodes(2, rounds, "--heartbeat-interval", "30")
    wait_for(lambda: fed.stats().get("statuses", {}).get("SendNodeHeartbeat", {}).get("OK", 0) >= 2,
             20 * SLOW, f"the SuperNodes' first heartbeats\n{fed.logs()}")
    fed.topo.loss(20)
    t0 = time.monotonic()
    try:
        stats, summaries = fed.wait_federation(timeout=150 * SLOW)
    finally:
        fed.topo.clear()
    took = time.monotonic() - t0
    assert_federation(fed, stats, summaries, rounds=rounds)
    downs = fed.node.events.find("upstream.down", since=mark)
    # upstream.ping (DEBUG): the round trip of each PING that was answered.
    rtts = [round(e["rtt_ms"] / 1000, 2) for e in fed.node.events.find("upstream.ping", since=mark)]
    figure(f"20% loss + {RELAY_DELAY * 1000:.0f} ms each way: federation ({rounds} rounds) "
           f"in {took:.1f} s, "
           f"{len(downs)} upstream drops {[d['reason'] for d in downs][:5]}, "
           f"SuperNode retries {sum(s['retries'] for s in summaries)}, "
           f"{fed.metric('flower_sidecar_keepalive_pings_total'):.0f} keepalive PINGs, "
           f"answered after {rtts} s")


def backoff_bounds(attempt: int) -> tuple[float, float]:
    """delay_ms bounds of upstream.backoff number |attempt| (2 = first delay):
    initial x 1.6^(attempt-2), +-20 %, never above the cap."""
    base = min(BACKOFF_INITIAL * 1.6 ** (attempt - 2), BACKOFF_MAX) * 1000
    return 0.8 * base - 2, min(1.2 * base, BACKOFF_MAX * 1000) + 2


@pytest.mark.long
def test_link_killed_probes_then_back_within_3s(fed):
    """kill -9 of the link sidecar, restarted after LINK_DEAD (20 s).  Its
    host answers the node's SYNs with RST (nothing listens): nothing reached
    the link's process, so no backoff delay runs; bare TCP probes every
    --probe-interval (1 s, +-20 %) look for it, held calls meanwhile cause no
    extra attempts, and the first successful call comes at most 3 s after the
    link listens again."""
    fed.start_echo()
    fed.start_link()
    fed.start_node("--hold-timeout", "1")
    mark = len(fed.node.events.all())
    probes0 = fed.metric("flower_sidecar_upstream_probes_total")
    connects0 = fed.metric("flower_sidecar_upstream_connects_total")
    t_kill = time.time()
    fed.link.kill9()
    down = wait_down(fed, mark, 5)
    assert ev_time(down) - t_kill <= 1.0, down
    fed.wait_probe(4, 3)
    held = NsClient(fed, "/fs.test.Probe/Held", count=4).go()
    for r in held.result(timeout=15):
        assert r["code"] == "UNAVAILABLE" and "probing every 1 s" in r["details"], r
    time.sleep(max(0.0, t_kill + LINK_DEAD - time.time()))
    # At most one delay, right at the kill: the first attempt may still
    # complete a TCP handshake with the dying process's listening socket.
    bo = fed.node.events.find("upstream.backoff", since=mark)
    assert len(bo) <= 1 and all(ev_time(e) - t_kill < 1.5 for e in bo), f"backoff while nothing was reached: {bo}"
    probes = fed.metric("flower_sidecar_upstream_probes_total") - probes0
    connects = fed.metric("flower_sidecar_upstream_connects_total") - connects0
    figure(f"link killed {LINK_DEAD:g} s: {probes:g} probes, {connects:g} real attempts")
    assert 0.7 * (LINK_DEAD - 2) <= probes <= 1.3 * LINK_DEAD + 2, f"{probes} probes in {LINK_DEAD:g} s"
    assert connects <= 2, f"{connects} real connection attempts while the link was dead"

    loop = NsClient(fed, "/test.Echo/Unary", count=0, interval=0.1).go()
    fed.link.start(wait_up=False)
    t_listen = time.time()  # start() returns once the link listens
    wait_for(lambda: [c for c in loop.calls() if c["code"] == "OK"], 10, "a call after the restart")
    first = min(c["t1"] for c in loop.calls() if c["code"] == "OK") - t_listen
    up = fed.node.events.wait("upstream.up", timeout=5, since=mark)
    reach = fed.node.events.find("upstream.reachable", since=mark)
    figure(f"link restarted after kill -9: first call {first:.2f} s after it listens "
           f"(upstream.up {ev_time(up) - t_listen:.2f} s)")
    assert reach and first <= EDGE_RETURN_BOUND, (first, reach)


ACCEPT_AND_CLOSE_PY = r"""
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()  # the TCP handshake completed: the attempt reached a process, which failed it
"""


def test_backoff_governs_attempts_that_reach_a_failing_upstream(fed):
    """The link's address answered by a process that accepts and closes
    (an overloaded or broken server): every attempt reaches it, so the gRPC
    backoff governs: each delay is initial x1.6^k +-20 %, capped, the
    attempts come that far apart, held calls cause no extra attempts, and
    no probe runs.  When the real link is back the schedule brings it up
    within one delay and starts over."""
    fed.start_echo()
    fed.start_link()
    fed.start_node("--hold-timeout", "1")
    mark = len(fed.node.events.all())
    probes0 = fed.metric("flower_sidecar_upstream_probes_total")
    connects0 = fed.metric("flower_sidecar_upstream_connects_total")
    fed.link.kill9()
    script = fed.tmp / "accept_and_close.py"
    script.write_text(ACCEPT_AND_CLOSE_PY)
    failing = fed.group.start("failing", fed.topo.argv("a", PY, str(script), fed.link_addr))
    fed._wait_listening(failing, LINK_PORT, "accept-and-close")
    t0 = time.time()
    wait_down(fed, mark, 5)
    # (between the kill and the listener, one attempt may have been refused: a probe)
    fed.node.events.wait("upstream.backoff", timeout=5, since=mark)
    probes0 = fed.metric("flower_sidecar_upstream_probes_total")
    held = NsClient(fed, "/fs.test.Probe/Held", count=4).go()
    time.sleep(max(0.0, t0 + LINK_DEAD - time.time()))
    evs = fed.node.events.find("upstream.backoff", since=mark)
    assert len(evs) >= 8 and ev_time(evs[-1]) >= time.time() - BACKOFF_MAX - 0.5 * SLOW, \
        f"{len(evs)} upstream.backoff in {LINK_DEAD:g} s: {evs}"
    for r in held.result(timeout=15):
        assert r["code"] == "UNAVAILABLE", r
        m = NEXT_ATTEMPT_RE.match(r["details"])
        assert m and m["up"] == fed.link_addr and float(m["n"]) <= BACKOFF_MAX, r
    attempts = [e["attempt"] for e in evs]
    delays = [e["delay_ms"] for e in evs]
    figure(f"backoff against an accept-and-close upstream for {LINK_DEAD:g} s (initial {BACKOFF_INITIAL}, "
           f"max {BACKOFF_MAX}): attempts {attempts} delays_ms {delays}")
    assert attempts == list(range(2, 2 + len(evs))), evs
    for e in evs:
        lo, hi = backoff_bounds(e["attempt"])
        assert lo <= e["delay_ms"] <= hi, f"attempt {e['attempt']}: {e['delay_ms']} ms not in [{lo:.0f}, {hi:.0f}]\n{evs}"
    exact = [abs(e["delay_ms"] - (backoff_bounds(e["attempt"])[0] + 2) / 0.8) < 5 for e in evs[:3]]
    assert not all(exact), f"no jitter: {delays}"
    for prev, nxt in zip(evs, evs[1:]):
        gap = (ev_time(nxt) - ev_time(prev)) * 1000
        assert prev["delay_ms"] - 20 <= gap <= prev["delay_ms"] + 400 * SLOW, \
            f"attempt {nxt['attempt']} came {gap:.0f} ms after the previous, delay was {prev['delay_ms']}\n{evs}"
    connects = fed.metric("flower_sidecar_upstream_connects_total") - connects0
    assert connects <= len(evs) + 2, f"{connects} connection attempts for {len(evs)} backoff delays"
    assert fed.metric("flower_sidecar_upstream_probes_total") == probes0, "probes ran although attempts reached"

    procs.stop(failing)
    t_restart = time.time()
    mark2 = len(fed.node.events.all())
    fed.link.start(wait_up=False)
    up = fed.node.events.wait("upstream.up", timeout=BACKOFF_MAX + 5, since=mark2)
    back = ev_time(up) - t_restart
    figure(f"failing upstream replaced by the link -> node upstream.up after {back:.2f} s")
    assert back <= BACKOFF_MAX + 1.0, f"upstream.up {back:.2f} s after the restart"


STRICT_PY = r'''
import sys, time
from concurrent import futures
import grpc
listen, cert, key = sys.argv[1:4]

def sleep(req, ctx):
    end = time.time() + float(req.decode() or "1")
    while time.time() < end and ctx.is_active():
        time.sleep(0.05)
    return b"slept"

# Like a stock gRPC server (Flower's SuperLink): PINGs more often than every
# 5 minutes without data are strikes; after 2, GOAWAY ENHANCE_YOUR_CALM.
server = grpc.server(futures.ThreadPoolExecutor(8), options=[
    ("grpc.http2.min_ping_interval_without_data_ms", 300000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.so_reuseport", 0)])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "fs.test.Strict", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})])
creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
assert server.add_secure_port(listen, creds)
server.start()
print("listening", flush=True)
server.wait_for_termination()
'''


def test_strict_upstream_too_many_pings_doubles_keepalive(fed):
    """A stock grpcio TLS server (no link sidecar) that punishes frequent
    PINGs: GOAWAY too_many_pings -> event upstream.too_many_pings with the
    doubled keepalive_time_s, one reconnect (no storm), and the next
    connection waits the doubled time before its first PING; a 7 s silent
    call then passes without another GOAWAY."""
    tls = fed.tmp / "strict-tls"
    ca = make_ca(tls)
    cert, key = make_server_cert(tls, ca, sans=f"IP:{fed.a},DNS:localhost")
    script = fed.tmp / "strict.py"
    script.write_text(STRICT_PY)
    addr = f"{fed.a}:{SUPERLINK_PORT}"
    fed.superlink = fed.group.start("strict", fed.topo.argv("a", PY, str(script), addr, str(cert), str(key)))
    fed._wait_listening(fed.superlink, SUPERLINK_PORT, "strict server")
    fed.start_node(upstream=addr, ca=ca[0])
    mark = len(fed.node.events.all())

    # keepalive 1 s: PINGs every second or so of this silent call; after a
    # few strikes the server sends GOAWAY too_many_pings (grpcio 1.51: at
    # the 5th PING).
    [r] = NsClient(fed, "/fs.test.Strict/Sleep", payload="12").go().result(timeout=25)
    tmp_ev = fed.node.events.find("upstream.too_many_pings", since=mark)
    assert len(tmp_ev) == 1, f"too_many_pings events: {tmp_ev}\n{fed.logs()}"
    assert tmp_ev[0]["level"] == "warn" and tmp_ev[0]["keepalive_time_s"] == 2 * KT, tmp_ev
    assert r["code"] == "UNAVAILABLE", f"the call on the connection the server closed: {r}"
    fed.node.events.wait("upstream.up", timeout=BACKOFF_MAX + 5, since=mark)

    # keepalive 2 s now: no PING in the first 1.5 s of silence, and a 7 s
    # call (PINGs at ~2, 4, 6 s: two strikes) passes.
    pings0 = fed.metric("flower_sidecar_keepalive_pings_total")
    second = NsClient(fed, "/fs.test.Strict/Sleep", payload="7").go()
    time.sleep(max(0.0, second.t_go + 1.5 - time.time()))
    assert fed.metric("flower_sidecar_keepalive_pings_total") == pings0, \
        "a PING within 1.5 s of silence after too_many_pings doubled the keepalive time to 2 s"
    [r] = second.result(timeout=20)
    assert r["code"] == "OK", f"second call with the doubled keepalive time: {r}\n{fed.node.logs()}"
    assert len(fed.node.events.find("upstream.too_many_pings", since=mark)) == 1
    connects = fed.metric("flower_sidecar_upstream_connects_total")
    assert connects <= 3, f"{connects} connection attempts: a reconnect storm"
    assert len(fed.node.events.find("upstream.up", since=mark)) == 1, fed.node.logs()




@pytest.mark.long
def test_slow_link_small_calls_are_not_stuck_behind_a_download(fed):
    """A 500 kbit/s edge link (tbf on both veth ends with 500 ms of queue:
    real TCP round trips, unlike the delay relay) carrying a 1.5 MiB
    download; meanwhile a small call every 0.5 s over the same node ->
    link connection.  Everything serialized ahead of a small call goes out
    before it, and a heartbeat has 5 s: the sidecars pace connections to
    non-loopback peers (proxy/pacing.h: TCP_NOTSENT_LOWAT 16 KiB in the
    kernel, at most 64 KiB queued in user space, about one congestion window
    once the round trip is long) so the call waits behind little more than
    the link's own queue.  Measured in development: median
    1.4-2.6 s paced (15 runs of three pacing variants), 3.98-4.13 s with the
    sidecars and the kernel queueing freely (3 runs, which this test's 3.5 s
    bound rejects); the download took 26.1-27.8 s either way."""
    fed.start_echo()
    fed.start_link()
    fed.start_node(timings={"--keepalive-time": 30, "--keepalive-timeout": 10, "--connect-timeout": 20})
    fed.topo.rate(500, 500)
    small = NsClient(fed, "/test.Echo/Unary", timeout=20, count=0, payload="x", interval=0.5)
    big = NsClient(fed, "/test.Echo/Sized", timeout=120, count=1, payload=str(1536 * 1024))
    small.go()
    time.sleep(2)
    big.go()
    try:
        res = big.result(timeout=150 * SLOW)
    finally:
        small.stop()
        fed.topo.clear()
    assert res[0]["code"] == "OK", res
    t0, t1 = res[0]["t0"], res[0]["t1"]
    calls = small.calls()
    bad = [c for c in calls if c["code"] != "OK"]
    assert not bad, f"small calls failed: {bad}\n{fed.logs()}"
    # The calls made once the download had filled the queues, until it ended.
    lat = sorted(c["t1"] - c["t0"] for c in calls if t0 + 3 <= c["t0"] <= t1 - 1)
    n = len(lat)
    assert n >= 3, f"only {n} small calls during the download ({t1 - t0:.1f} s)"
    figure(f"500 kbit/s link (500 ms queue): 1.5 MiB download in {t1 - t0:.1f} s; {n} small calls meanwhile: "
           f"median {lat[n // 2]:.2f} s, max {lat[-1]:.2f} s")
    assert lat[n // 2] < 3.5, f"small calls waited behind the download: {[round(x, 2) for x in lat]}"



# --- issue 16: traffic back within 3 s of the link's return -------------------
EDGE_RETURN_BOUND = 3.0
# The node role's own defaults for everything but keepalive (short here so
# the outage is detected quickly): backoff 10..300 s, connect timeout 20 s,
# --probe-interval 1 s, --probe-timeout 2 s.
EDGE_TIMINGS = {"--backoff-initial": 10, "--backoff-max": 300, "--connect-timeout": 20}
# FS_LONG_OUTAGES=1 adds the 60 s and 180 s blackholes (4 more minutes).
EDGE_OUTAGES = [20.0] + ([60.0, 180.0] if os.environ.get("FS_LONG_OUTAGES") == "1" else [])


@pytest.mark.parametrize("outage", EDGE_OUTAGES)
def test_edge_traffic_back_within_3s_of_the_link_return(fed, outage):
    """A silent blackhole: the keepalive declares the link dead, the
    immediate attempt's SYN goes unanswered for --probe-timeout, then bare
    TCP probes every --probe-interval (+-20 %) look for the link; the first
    that connects is followed at once by the real attempt.  From the link's
    return to the first successful call through the node sidecar: at most
    3 s.  Probes do not advance the backoff (no upstream.backoff while the
    link is silent) and the health reason names the phase."""
    fed.start_echo()
    fed.start_link()
    fed.start_node(timings=EDGE_TIMINGS)
    loop = NsClient(fed, "/test.Echo/Unary", count=0, interval=0.1).go()
    wait_for(lambda: any(c["code"] == "OK" for c in loop.calls()), 10, f"a first answer {loop.stderr()}")
    mark = len(fed.node.events.all())
    t_bh = time.time()
    fed.topo.blackhole()
    wait_down(fed, mark, DETECT_BOUND + 5)
    time.sleep(min(5.0, outage / 2))
    health = fed.healthz()
    time.sleep(max(0.0, t_bh + outage - time.time()))
    t_clear = time.time()
    fed.topo.clear()
    up = fed.node.events.wait("upstream.up", timeout=EDGE_RETURN_BOUND + 10, since=mark)
    reach = fed.node.events.find("upstream.reachable", since=mark)
    wait_for(lambda: [c for c in loop.calls() if c["code"] == "OK" and c["t1"] >= t_clear], EDGE_RETURN_BOUND + 10,
             "a call through the node sidecar after the return")
    first_ok = min(c["t1"] for c in loop.calls() if c["code"] == "OK" and c["t1"] >= t_clear) - t_clear
    back = ev_time(up) - t_clear
    m = fed.metrics()
    figure(f"edge {outage:g} s blackhole: link return -> upstream.reachable "
           f"{(ev_time(reach[0]) - t_clear) if reach else float('nan'):.2f} s, upstream.up {back:.2f} s, "
           f"first call {first_ok:.2f} s; probes {m.get('flower_sidecar_upstream_probes_total')}")
    assert reach, "no upstream.reachable: the return was not found by a probe"
    assert not fed.node.events.find("upstream.backoff", since=mark), \
        "the backoff ran while nothing reached the upstream"
    assert first_ok <= EDGE_RETURN_BOUND, f"first successful call {first_ok:.2f} s after the link returned"
    probes = m.get("flower_sidecar_upstream_probes_total", 0)
    assert 0.7 * (outage - DETECT_BOUND - 2) <= probes <= 1.3 * outage + 2, f"{probes} probes in a {outage:g} s outage"
    assert m.get("flower_sidecar_upstream_outages_total") == 1, m
    assert "link down, probing every 1 s" in health, health
