"""A crowd of node sidecars and one SuperLink that is down, then returns
(issue 16): while nothing listens each node probes about once per
--probe-interval (so the SuperLink's host sees about N SYNs a second), and
when the link sidecar listens again the nodes' TLS handshakes are spread
over about one probe interval by the probes' jitter, not all at once.

20 node sidecars on loopback (h2c clients, TLS upstream) and the link
sidecar in front of the grpcio echo upstream.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import procs
from conftest import HOST, SIDECAR, wait_for

NODES = 20
DOWN = 10.0  # seconds the SuperLink side is away


def ev_time(ev: dict) -> float:
    return dt.datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def events(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.startswith("{")]


def metric(admin: int, name: str) -> float:
    import urllib.request
    body = urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5).read().decode()
    for ln in body.splitlines():
        if ln.startswith(name + " "):
            return float(ln.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_crowd_probes_gently_and_returns_spread_out(echo, tmp_path):
    group = procs.ProcGroup(tmp_path)
    link_port, link_admin = procs.free_port(HOST), procs.free_port(HOST)
    tls = tmp_path / "tls"
    link_argv = [SIDECAR, "link", "--listen", f"{HOST}:{link_port}", "--admin", f"{HOST}:{link_admin}",
                 "--upstream", echo.address, "--tls-dir", str(tls)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    try:
        link = group.start("link0", link_argv, env=env)
        procs.wait_port(HOST, link_port, timeout=10, proc=link)
        nodes = []
        for i in range(NODES):
            admin = procs.free_port(HOST)
            p = group.start(f"node{i}", [SIDECAR, "node", "--listen", f"{HOST}:{procs.free_port(HOST)}",
                                         "--admin", f"{HOST}:{admin}", "--upstream", f"{HOST}:{link_port}",
                                         "--tls-ca", str(tls / "ca.pem"), "--tls-server-name", "localhost"], env=env)
            nodes.append((p, admin, Path(group.log_path(f"node{i}"))))
        for p, admin, log in nodes:
            wait_for(lambda: any(e["event"] == "upstream.up" for e in events(log)), 15, f"{log.name} up")
        probes0 = sum(metric(a, "flower_sidecar_upstream_probes_total") for _, a, _ in nodes)
        t_down = time.time()
        procs.stop(link, timeout=15)  # a drain: GOAWAY, then nothing listens (refused)
        time.sleep(DOWN)
        probes = sum(metric(a, "flower_sidecar_upstream_probes_total") for _, a, _ in nodes) - probes0
        rate = probes / (time.time() - t_down)
        link = group.start("link1", link_argv, env=env)
        procs.wait_port(HOST, link_port, timeout=10, proc=link)
        t_back = time.time()
        ups = []
        for p, admin, log in nodes:
            up = wait_for(lambda: [e for e in events(log) if e["event"] == "upstream.up" and ev_time(e) >= t_back - 0.1],
                          10, f"{log.name} up again")
            ups.append(ev_time(up[0]) - t_back)
        ups.sort()
        spread = ups[-1] - ups[0]
        print(f"FIGURE crowd of {NODES}: {rate:.1f} probes/s while the link was away ({rate / NODES:.2f} per node "
              f"per s); back after {ups[0]:.2f}..{ups[-1]:.2f} s (spread {spread:.2f} s, median {ups[NODES // 2]:.2f})")
        assert 0.6 * NODES <= rate <= 1.4 * NODES, f"{rate:.1f} probes/s from {NODES} nodes"
        assert ups[-1] <= 3.0, f"the last node was back {ups[-1]:.2f} s after the link listened"
        assert spread >= 0.3, f"all {NODES} nodes came back within {spread:.2f} s: no spread"
    finally:
        group.stop_all(timeout=15)
