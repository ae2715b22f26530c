"""OneGate publication and discovery, against the OneGate emulator
(tests/emulator/onegate_emulator.py, which follows ../shared/onegate.md with
its quirks) and the Fleet emulator, with real TLS between the sidecars.

The SuperLink VM (id 41) runs the link sidecar; the SuperNode VM (id 42)
runs the node sidecar given nothing but the OneGate environment (endpoint,
VMID, token file): it must discover the SuperLink's endpoint and CA.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import procs
from conftest import HOST, ROOT, SIDECAR, wait_for

PY = "/usr/bin/python3"
OG = str(ROOT / "tests" / "emulator" / "onegate_emulator.py")
FLEET = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
FAST_NODE = ["--poll-interval", "0.1", "--max-retry-wait", "0.5"]
TOKENS = {41: "dG9rZW4tb2YtdGhlLXN1cGVybGluaw==", 42: "dG9rZW4tb2YtdGhlLXN1cGVybm9kZQ=="}


class OneGate:
    def __init__(self, group, tmp: Path):
        self.port, self.ctl = procs.free_port(HOST), procs.free_port(HOST)
        self.proc = group.start("onegate", [PY, OG, "--listen", f"{HOST}:{self.port}",
                                            "--control", f"{HOST}:{self.ctl}"])
        procs.wait_port(HOST, self.ctl, timeout=10, proc=self.proc)
        self.tmp = tmp

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def control(self, path: str, doc: dict | None = None) -> dict:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(f"http://{HOST}:{self.ctl}{path}", data=data,
                                     method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def add_vm(self, vmid: int, role: str, **kw) -> dict:
        self.control("/vm", {"id": vmid, "token": TOKENS[vmid], "role": role, **kw})
        token = self.tmp / f"token-{vmid}.txt"
        token.write_text(TOKENS[vmid] + "\n")
        return {"ONEGATE_ENDPOINT": self.endpoint, "VMID": str(vmid), "ONEGATE_TOKEN_FILE": str(token)}

    def template(self, vmid: int) -> dict:
        return self.control("/state")["vms"].get(str(vmid), {})

    def log(self) -> list[dict]:
        return self.control("/state")["log"]


class Events:
    def __init__(self, path: str):
        self.path = path

    def all(self) -> list[dict]:
        out = []
        for ln in Path(self.path).read_text().splitlines():
            if ln.startswith("{"):
                out.append(json.loads(ln))
        return out

    def find(self, name: str, **match) -> list[dict]:
        return [e for e in self.all() if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def group(tmp_path):
    g = procs.ProcGroup(tmp_path)
    yield g
    g.stop_all(timeout=15)


def start_fleet_superlink(group, rounds=2, nodes=1):
    port = procs.free_port(HOST)
    proc = group.start("superlink", [PY, FLEET, "superlink", "--listen", f"{HOST}:{port}", "--nodes", str(nodes),
                                     "--rounds", str(rounds), "--array-bytes", "4096", "--exit-when-done"])
    procs.wait_port(HOST, port, timeout=10, proc=proc)
    return proc, f"{HOST}:{port}"


def start_link(group, tmp_path, name, upstream, env, *extra):
    port, admin = procs.free_port(HOST), procs.free_port(HOST)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "ONEGATE", "VMID"))}
    e.update(env)
    argv = [SIDECAR, "link", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}", "--upstream", upstream,
            "--tls-dir", str(tmp_path / f"{name}-tls"), "--advertise", f"{HOST}:{port}", "--backoff-initial", "0.2",
            "--backoff-max", "1", *extra]
    p = procs.start(argv, str(tmp_path / f"{name}.log"), env=e)
    group.procs[name] = p
    procs.wait_port(HOST, port, timeout=10, proc=p)
    return p, port, Events(str(tmp_path / f"{name}.log"))


def start_node(group, tmp_path, env, *extra, name="node"):
    port, admin = procs.free_port(HOST), procs.free_port(HOST)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "ONEGATE", "VMID"))}
    e.update(env)
    argv = [SIDECAR, "node", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}", "--backoff-initial", "0.5",
            "--backoff-max", "2", *extra]
    p = procs.start(argv, str(tmp_path / f"{name}.log"), env=e)
    group.procs[name] = p
    procs.wait_port(HOST, port, timeout=10, proc=p)
    return p, port, Events(str(tmp_path / f"{name}.log"))


def start_supernode(group, tmp_path, node_port, rounds=2, name="supernode"):
    summary = tmp_path / f"{name}.json"
    p = group.start(name, [PY, FLEET, "supernode", "--upstream", f"{HOST}:{node_port}", "--insecure", *FAST_NODE,
                           "--rounds", str(rounds), "--summary-file", str(summary)])
    return p, summary


def node_admin(tmp_path) -> int:
    start = [e for e in Events(str(tmp_path / "node.log")).all() if e["event"] == "sidecar.start"][0]
    return int(start["admin"].rsplit(":", 1)[1])


def ts(ev: dict) -> float:
    from datetime import datetime
    return datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def b64_file(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def test_link_publishes_endpoint_ca_and_readiness(group, tmp_path):
    og = OneGate(group, tmp_path)
    env = og.add_vm(41, "superlink")
    superlink, up = start_fleet_superlink(group, rounds=1000)
    link, port, ev = start_link(group, tmp_path, "link", up, env, "--onegate-ready-grace", "1")
    wait_for(lambda: og.template(41).get("FL_READY") == "YES", 15, "FL_READY = YES")
    t = og.template(41)
    assert t == {"FL_ROLE": "superlink", "FL_ENDPOINT": f"{HOST}:{port}", "FL_READY": "YES",
                 "FL_CA_CERT": b64_file(tmp_path / "link-tls" / "ca.pem")}, t
    # template text, one attribute a line (a form-encoded body would have
    # stored a single attribute holding '&')
    puts = [r for r in og.log() if r["method"] == "PUT"]
    assert puts and all(r["status"] == 200 for r in puts), puts
    assert all(all(ln.split(" = ", 1)[0].isupper() for ln in r["body"].splitlines()) for r in puts), puts
    assert puts[0]["body"].endswith('FL_READY = "NO"\n'), "the first publication must clear a stale YES"
    pub = ev.find("onegate.publish")[-1]
    assert pub["ca_sha256"].count(":") == 31 and pub["endpoint"] == f"{HOST}:{port}"
    # the SuperLink goes away longer than the grace: NO; back: YES
    procs.stop(superlink)
    wait_for(lambda: og.template(41).get("FL_READY") == "NO", 15, "FL_READY = NO after the grace")
    superlink2 = group.start("superlink2", [PY, FLEET, "superlink", "--listen", up, "--nodes", "1", "--rounds", "1000"])
    wait_for(lambda: og.template(41).get("FL_READY") == "YES", 20, "FL_READY = YES again")
    # drain: NO before the process exits
    assert procs.stop(link, timeout=20) == 0
    assert og.template(41).get("FL_READY") == "NO", og.template(41)
    out = Path(tmp_path / "link.log").read_text()
    assert TOKENS[41] not in out and TOKENS[41][:12] not in out, "the token was logged"
    procs.stop(superlink2)


def test_node_discovers_the_superlink_and_the_federation_runs(group, tmp_path):
    og = OneGate(group, tmp_path)
    link_env = og.add_vm(41, "superlink")
    node_env = og.add_vm(42, "supernode")
    superlink, up = start_fleet_superlink(group, rounds=2)
    link, lport, lev = start_link(group, tmp_path, "link", up, link_env)
    node, nport, nev = start_node(group, tmp_path, node_env)  # no --upstream, no CA: OneGate only
    sn, summary = start_supernode(group, tmp_path, nport, rounds=2)
    assert procs.wait_exit(sn, 60) == 0, group.logs()
    assert procs.wait_exit(superlink, 30) == 0, group.logs()
    disc = nev.find("onegate.discover")
    assert len(disc) == 1 and disc[0]["endpoint"] == f"{HOST}:{lport}", disc
    pub = lev.find("onegate.publish")[-1]
    assert disc[0]["ca_sha256"] == pub["ca_sha256"] and disc[0]["ca"] == "FL_CA_CERT"
    wait_for(lambda: og.template(42).get("FL_NODE_READY") == "YES", 10, "FL_NODE_READY = YES")
    metrics = urllib.request.urlopen(f"http://{HOST}:{node_admin(tmp_path)}/metrics", timeout=5).read().decode()
    assert 'flower_sidecar_onegate_requests_total{request="discover",result="ok"} 1' in metrics, metrics
    assert 'flower_sidecar_onegate_requests_total{request="publish",result="ok"} 1' in metrics, metrics
    serving = [e for e in lev.find("health.change", to="SERVING")][0]
    first_call = min(ts(e) for e in nev.all() if e["event"].startswith(("node.", "run.", "message.")))
    print(f"FIGURE first node call {first_call - ts(serving):.2f} s after the link's first SERVING")


def test_node_waits_through_a_onegate_outage(group, tmp_path):
    """OneGate refuses connections for the first 30 s: the node retries with
    backoff, its health says it is discovering, the SuperNode's calls wait
    (held, then UNAVAILABLE, retried by the SuperNode), and the run
    completes once OneGate answers."""
    og = OneGate(group, tmp_path)
    link_env = og.add_vm(41, "superlink")
    node_env = og.add_vm(42, "supernode")
    og.control("/fault", {"mode": "refuse", "seconds": 30})
    superlink, up = start_fleet_superlink(group, rounds=2)
    link, lport, lev = start_link(group, tmp_path, "link", up, link_env)
    node, nport, nev = start_node(group, tmp_path, node_env, "--hold-timeout", "5")
    sn, summary = start_supernode(group, tmp_path, nport, rounds=2)
    time.sleep(3)
    admin_health = [e for e in nev.find("health.change")][-1]
    assert "discovering the SuperLink via OneGate" in admin_health["reason"], admin_health
    assert procs.wait_exit(sn, 90) == 0, group.logs()
    errors = nev.find("onegate.error", request="discover")
    assert len(errors) >= 3, errors
    delays = [e["delay_ms"] for e in errors]
    assert max(delays) <= 2000 * 1.2 + 1, delays  # --backoff-max 2
    t_ok = ts(nev.find("onegate.discover")[0])
    t_first = ts(errors[0])
    assert t_ok - t_first >= 25, "discovered before OneGate came back"
    # requests on OneGate during the outage stayed bounded by the backoff
    assert len(errors) <= 30 / 0.5 + 2


def test_node_rediscovers_a_replaced_superlink(group, tmp_path):
    """The SuperLink VM is replaced mid-run: new address, new CA.  The node's
    upstream fails; after 3 attempts it asks OneGate again and follows."""
    og = OneGate(group, tmp_path)
    link_env = og.add_vm(41, "superlink")
    node_env = og.add_vm(42, "supernode")
    superlink, up = start_fleet_superlink(group, rounds=1000)
    link, lport, lev = start_link(group, tmp_path, "link", up, link_env)
    node, nport, nev = start_node(group, tmp_path, node_env)
    wait_for(lambda: nev.find("upstream.up"), 20, "node upstream up")
    ca1 = nev.find("onegate.discover")[0]["ca_sha256"]
    assert procs.stop(link, timeout=20) == 0
    link2, lport2, lev2 = start_link(group, tmp_path, "link2", up, link_env)  # new port, new tls dir: new CA
    wait_for(lambda: len(nev.find("onegate.discover")) >= 2, 40, "a second discovery")
    d2 = nev.find("onegate.discover")[-1]
    assert d2["endpoint"] == f"{HOST}:{lport2}" and d2["ca_sha256"] != ca1, d2
    wait_for(lambda: nev.find("upstream.up", upstream=f"{HOST}:{lport2}"), 20, "up on the new SuperLink")
    sn, summary = start_supernode(group, tmp_path, nport, rounds=1)
    wait_for(lambda: Path(summary).exists() or sn.poll() is not None, 60, "a SuperNode round on the new SuperLink")
    assert procs.wait_exit(sn, 30) == 0, group.logs()


def test_a_failing_onegate_never_touches_health_or_calls(group, tmp_path):
    """OneGate answers 500 for 3 s, then stalls every request for 6 s
    (--onegate-timeout 1): the link keeps serving calls and SERVING health
    throughout, retries with backoff (onegate.error with attempt and delay),
    and publishes FL_READY = YES once OneGate answers again."""
    import grpc
    og = OneGate(group, tmp_path)
    env = og.add_vm(41, "superlink")
    og.control("/fault", {"mode": "500", "seconds": 3, "then": {"mode": "stall", "seconds": 6}})
    superlink, up = start_fleet_superlink(group, rounds=1000)
    link, port, ev = start_link(group, tmp_path, "link", up, env, "--onegate-timeout", "1")
    wait_for(lambda: ev.find("health.change", to="SERVING"), 10, "link SERVING")
    ca = (tmp_path / "link-tls" / "ca.pem").read_bytes()
    health = f"{HOST}:{int([e for e in ev.all() if e['event'] == 'sidecar.start'][0]['admin'].rsplit(':', 1)[1])}"
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        stub = ch.unary_unary("/flwr.proto.Fleet/GetRun")
        t_end = time.monotonic() + 9
        calls = 0
        while time.monotonic() < t_end:
            try:
                stub(b"", timeout=2)
            except grpc.RpcError as e:  # the emulated SuperLink refuses an empty GetRun: a real answer
                assert e.code() != grpc.StatusCode.UNAVAILABLE, e
            calls += 1
            r = urllib.request.urlopen(f"http://{health}/healthz", timeout=2)
            assert r.status == 200
            time.sleep(0.1)
    assert calls > 20
    errors = ev.find("onegate.error", request="publish")
    assert any(e.get("status") == 500 for e in errors), errors
    assert any("Timeout" in e["reason"] or "timed out" in e["reason"] for e in errors), errors
    assert all(e["delay_ms"] <= 1000 * 1.2 + 1 for e in errors), errors  # --backoff-max 1
    wait_for(lambda: og.template(41).get("FL_READY") == "YES", 20, "FL_READY = YES after the faults")


def test_a_renewed_ca_is_published_before_it_is_served(group, tmp_path):
    """The auto-generated CA is renewed while the daemon runs (lifetimes
    shortened by the test-only FS_TEST_*_LIFETIME_S): the new CA reaches
    OneGate's FL_CA_CERT first, and only then (the publication succeeded,
    well before --tls-ca-switch-delay 60) does the listener serve the
    certificate it signs; no restart."""
    import ssl as _ssl
    og = OneGate(group, tmp_path)
    env = dict(og.add_vm(41, "superlink"), FS_TEST_CERT_LIFETIME_S="9", FS_TEST_CA_LIFETIME_S="30")
    superlink, up = start_fleet_superlink(group, rounds=1000)
    link, port, ev = start_link(group, tmp_path, "link", up, env, "--tls-ca-switch-delay", "60")
    tls = tmp_path / "link-tls"
    wait_for(lambda: og.template(41).get("FL_READY") == "YES", 15, "FL_READY = YES")
    ca1 = og.template(41)["FL_CA_CERT"]
    ann = wait_for(lambda: ev.find("cert.renew", cert="ca"), 40, "the CA renewed")[0]
    wait_for(lambda: og.template(41).get("FL_CA_CERT") not in (None, ca1), 10, "the new CA published")
    ca2 = og.template(41)["FL_CA_CERT"]
    assert ca2 == b64_file(tls / "ca.pem"), "OneGate does not hold the CA in --tls-dir"
    pubs = [e for e in ev.find("onegate.publish") if ts(e) >= ts(ann)]
    assert pubs, "no publication after the CA renewal"

    def verifies(ca_b64: str) -> bool:
        ctx = _ssl.create_default_context(cadata=base64.b64decode(ca_b64).decode())
        ctx.set_alpn_protocols(["h2"])
        try:
            import socket as _socket
            with ctx.wrap_socket(_socket.create_connection((HOST, port), timeout=5), server_hostname="localhost"):
                return True
        except _ssl.SSLError:
            return False
    # served once published (not after the 60 s delay), and signed by the new CA
    wait_for(lambda: verifies(ca2), 10, "the new CA's certificate served")
    assert time.time() - ts(ann) < 30, "the switch waited for the delay, not for the publication"
    assert not verifies(ca1)
    assert link.poll() is None


def test_a_pinned_ca_wins_and_a_failed_verification_asks_again(group, tmp_path):
    """FL_SSL_CA_CERTFILE pins the trust: discovery supplies only the
    address.  A SuperLink that fails verification against the pinned CA is
    asked about again (it may have been replaced), at backoff pace; the
    right CA pinned connects."""
    from conftest import make_ca
    og = OneGate(group, tmp_path)
    link_env = og.add_vm(41, "superlink")
    node_env = og.add_vm(42, "supernode")
    superlink, up = start_fleet_superlink(group, rounds=1000)
    link, lport, lev = start_link(group, tmp_path, "link", up, link_env)
    wrong_ca, _ = make_ca(tmp_path / "wrong", cn="Not the SuperLink's CA")
    node, nport, nev = start_node(group, tmp_path, dict(node_env, FL_SSL_CA_CERTFILE=str(wrong_ca)))
    wait_for(lambda: nev.find("onegate.discover"), 15, "a discovery")
    assert nev.find("onegate.discover")[0]["ca"] == "pinned by --tls-ca"
    wait_for(lambda: len([r for r in og.log() if r["path"] == "/service" and r["vmid"] == "42"]) >= 2, 15,
             "a second GET /service after the verification failure")
    t0 = time.time()
    time.sleep(4)
    asks = [r for r in og.log() if r["path"] == "/service" and r["vmid"] == "42" and r["t"] >= t0]
    assert len(asks) <= 4, f"{len(asks)} GET /service in 4 s: not paced by the backoff"
    assert not nev.find("upstream.up")
    procs.stop(node, timeout=15)
    node2, nport2, nev2 = start_node(group, tmp_path, dict(node_env, FL_SSL_CA_CERTFILE=str(tmp_path / "link-tls" / "ca.pem")),
                                     name="node2")
    wait_for(lambda: nev2.find("upstream.up"), 15, "the node with the right pinned CA up")
