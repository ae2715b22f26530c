"""The federation view of `flower-sidecar link`: GET /v1/federation, the
page at GET /, round.metrics / run.start, and the metrics added with them,
judged against what the Fleet emulator sent.

    make all && /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_fedview.py

One federation, run once for the module: an emulated SuperLink (3 nodes,
3 rounds of train + evaluate) behind a link sidecar with its auto-generated
TLS certificate; the nodes are emulated SuperNodes (real grpcio) whose
replies carry MetricRecord objects as Flower's do (`num-examples`, a loss,
for evaluate an accuracy and a list of per-class accuracies), with
num-examples differing per reply so that a weighted mean differs from a
plain one.  Node n2 dies after its 2nd reply (no DeactivateNode) with a
heartbeat interval of 2 s: the view must show it late, then offline.
While the federation runs, a thread polls /v1/federation every 0.2 s and
keeps every document; the page is fetched during the run too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

import procs
from conftest import HOST, PY, SLOW, Sidecar, check_clean_exit, wait_for

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import fleet_emulator as emu  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_fedview")

FAST_NODE = ["--poll-interval", "0.1", "--max-retry-wait", "0.2"]
RUN_TIMEOUT = 60 * SLOW
REL = 1e-12  # the sidecar's doubles against Python's


def http(port: int, path: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def view(port: int) -> dict:
    status, headers, body = http(port, "/v1/federation")
    assert status == 200, body[:500]
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


class Fed:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.group = procs.ProcGroup(str(tmp))
        self.snapshots: list[tuple[float, dict]] = []
        self.page_during_run: tuple[int, dict, bytes] | None = None
        self.stop_polling = threading.Event()
        self.poll_errors: list[str] = []

    def run(self) -> "Fed":
        port = procs.free_port(HOST)
        self.stats_path = self.tmp / "superlink.json"
        link = self.group.start("superlink", [
            PY, EMULATOR, "superlink", "--listen", f"{HOST}:{port}", "--stats-file", str(self.stats_path),
            "--exit-when-done", "--done-grace", str(10 * SLOW), "--nodes", "3", "--rounds", "3"])
        procs.wait_port(HOST, port, timeout=20, proc=link)
        self.sc = Sidecar(self.tmp, "link", ["--upstream", f"{HOST}:{port}"], tls=True)
        self.sc.start()
        poller = threading.Thread(target=self._poll, daemon=True)
        poller.start()
        ca = str(self.sc.tls_dir / "ca.pem")
        self.node_names = ["n0", "n1", "n2"]
        for name in self.node_names:
            extra = ["--vanish-after", "2", "--heartbeat-interval", "2"] if name == "n2" else []
            self.group.start(name, [
                PY, EMULATOR, "supernode", "--upstream", f"localhost:{self.sc.port}", "--root-cert", ca,
                "--summary-file", str(self.tmp / f"{name}.json"), *FAST_NODE, *extra])
        deadline = time.monotonic() + RUN_TIMEOUT
        for name, proc in self.group.procs.items():
            procs.wait_exit(proc, max(0.1, deadline - time.monotonic()))
        # The sidecar says offline on its 1 s tick, 2 x 2 s after n2's last
        # call: possibly after the SuperLink finished without it.
        self.sc.events.wait("node.offline", timeout=10 * SLOW)
        time.sleep(0.5)  # one more document polled after it
        self.stop_polling.set()
        poller.join(10)
        self.stats = json.loads(self.stats_path.read_text())
        self.summaries = {n: json.loads((self.tmp / f"{n}.json").read_text()) for n in self.node_names}
        return self

    def _poll(self) -> None:
        while not self.stop_polling.is_set():
            try:
                self.snapshots.append((time.monotonic(), view(self.sc.admin_port)))
                if self.page_during_run is None and any(r["rounds"] for r in self.snapshots[-1][1]["runs"]):
                    self.page_during_run = http(self.sc.admin_port, "/")
            except Exception as e:  # noqa: BLE001 - kept and reported by the tests
                self.poll_errors.append(repr(e))
            time.sleep(0.2)

    def logs(self) -> str:
        return self.group.logs(30) + "\n" + self.sc.logs(30)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True, timeout=120)
    emu.load_protos()
    f = Fed(tmp_path_factory.mktemp("fedview"))
    try:
        f.run()
        yield f
    finally:
        f.group.stop_all()
        if getattr(f, "sc", None) and f.sc.proc:
            check_clean_exit(f.sc)


# ------------------------------------------------------------ expectations


def expected_phases(fed: Fed) -> dict:
    """(round, type) -> what the replies' MetricRecords should aggregate to."""
    out: dict = defaultdict(lambda: {"records": 0, "examples": 0, "lists": 0, "values": defaultdict(list)})
    for sm in fed.summaries.values():
        for ins in sm["instructions"]:
            m = ins["metrics"]
            if m is None:
                continue
            p = out[(ins["round"], ins["message_type"])]
            p["records"] += 1
            p["examples"] += m["num-examples"]
            for k, v in m.items():
                if isinstance(v, list):
                    p["lists"] += 1
                else:
                    p["values"][k].append((v, m["num-examples"]))
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-15)


# --------------------------------------------------------------------- tests


def test_federation_ran(fed):
    st = fed.stats
    assert st["done"], fed.logs()
    assert fed.summaries["n2"]["exit_reason"] == "vanished", fed.logs()
    assert not fed.poll_errors, fed.poll_errors[:3]
    assert len(fed.snapshots) > 10


def test_view_nodes_runs_rounds(fed):
    v = view(fed.sc.admin_port)
    st, sums = fed.stats, fed.summaries
    assert v["role"] == "link" and v["upstream"]["address"] == fed.sc.extra[1]
    # During the run the upstream was up; the SuperLink has exited since.
    assert any(d["upstream"]["up"] and d["health"]["status"] == "SERVING" for _, d in fed.snapshots)
    assert v["upstream"]["up"] is False and v["health"]["status"] == "NOT_SERVING"
    assert "upstream" in v["health"]["reason"], v["health"]
    assert v["limits"] == {"nodes": 16384, "runs": 8, "rounds_per_run": 2048, "rounds": 4096,
                           "metric_keys_per_run": 8, "metric_key_length": 64}
    # Nodes: exactly the emulator's, ids as decimal strings (above 2^53).
    nodes = {n["node_id"]: n for n in v["nodes"]}
    assert set(nodes) == {sm["node_id"] for sm in sums.values()}
    for name, sm in sums.items():
        n = nodes[sm["node_id"]]
        assert isinstance(n["node_id"], str) and int(n["node_id"]) > 2**53
        assert n["state"] == ("offline" if name == "n2" else "deactivated"), n
        assert re.fullmatch(r"127\.0\.0\.1:\d+", n["peer"]), n
        # Every attempt the node made went through the sidecar and named it.
        assert n["calls"] == sum(sm["calls"].values()), (name, n, sm["calls"])
        assert n["errors"] == sum(sm["errors_by_status"].values()) == 0
        assert n["bytes_in"] > sm["object_bytes_pushed"] and n["bytes_out"] > sm["object_bytes_pulled"]
        assert n["heartbeat_interval_s"] == (2 if name == "n2" else 30)
    assert v["node_counts"] == {"active": 0, "late": 0, "offline": 1, "deactivated": 2, "tracked": 3,
                                "untracked_calls": 0}
    # One run, its FAB, its rounds in the SuperLink's order with its counts.
    assert v["runs_dropped"] == 0 and len(v["runs"]) == 1
    run = v["runs"][0]
    assert run["run_id"] == st["run_id"]
    assert (run["fab_id"], run["fab_version"], run["status"]) == ("flwrlabs/emulator-app", "1.0.0", "running")
    assert run["ended"] is None and run["rounds_dropped"] == 0
    assert run["first_seen_ms"] <= run["last_seen_ms"] <= v["now_ms"]
    assert [(p["round"], p["message_type"]) for p in run["rounds"]] == \
        [(r["round"], r["message_type"]) for r in st["rounds"]]
    lost = 0
    for p, r in zip(run["rounds"], st["rounds"]):
        assert p["open"] is False and p["end_ms"] >= p["start_ms"], p
        assert p["duration_ms"] == p["end_ms"] - p["start_ms"]
        # a queued instruction of the vanished node was never handed out
        undelivered = r["dispatched"] - p["nodes"]
        assert undelivered in (0, 1)
        lost += undelivered
        assert (p["replies"], p["errors"]) == (r["replies"], r["error_replies"]), (p, r)
        assert p["missing"] == r["missing"] - undelivered, (p, r)
    assert lost == st["expired_instructions"]


def test_view_metrics_are_the_replies_aggregated(fed):
    run = view(fed.sc.admin_port)["runs"][0]
    want = expected_phases(fed)
    assert run["metric_keys"] == ["num-examples", "train_loss", "eval_loss", "eval_acc"]
    weighted_differs = False
    for p in run["rounds"]:
        w = want[(p["round"], p["message_type"])]
        assert p["metric_records"] == w["records"] > 0, p
        assert p["examples"] == w["examples"]
        assert p["list_values"] == w["lists"] == (w["records"] if p["message_type"] == "evaluate" else 0)
        assert p["skipped_values"] == 0
        assert set(p["metrics"]) == set(w["values"])
        for key, vals in w["values"].items():
            got = p["metrics"][key]
            xs = [x for x, _ in vals]
            assert got["count"] == len(vals)
            assert got["min"] == min(xs) and got["max"] == max(xs)
            if key == "num-examples":
                assert got["weighted"] is False and close(got["mean"], sum(xs) / len(xs)), (key, got)
            else:
                wmean = sum(x * n for x, n in vals) / sum(n for _, n in vals)
                assert got["weighted"] is True and close(got["mean"], wmean), (key, got, wmean)
                weighted_differs |= not close(wmean, sum(xs) / len(xs))
    assert weighted_differs  # the test can tell a weighted mean from a plain one


def test_round_metrics_and_run_start_events(fed):
    evs = fed.sc.events.all()
    want = expected_phases(fed)
    starts = [e for e in evs if e["event"] == "run.start"]
    assert [e["run_id"] for e in starts] == [fed.stats["run_id"]]
    first_dispatch = next(i for i, e in enumerate(evs) if e["event"] == "message.dispatch")
    assert evs.index(starts[0]) < first_dispatch
    rm = [e for e in evs if e["event"] == "round.metrics"]
    assert [(e["round"], e["message_type"]) for e in rm] == \
        [(r["round"], r["message_type"]) for r in fed.stats["rounds"]]
    for e in rm:
        w = want[(e["round"], e["message_type"])]
        assert e["run_id"] == fed.stats["run_id"] and e["level"] == "info"
        assert e["replies"] == w["records"] and e["examples"] == w["examples"]
        for key, vals in w["values"].items():
            if key == "num-examples":
                continue
            wmean = sum(x * n for x, n in vals) / sum(n for _, n in vals)
            assert abs(e["metric_" + key.replace("-", "_")] - wmean) < 1e-9, (e, key, wmean)
        # right after its round.end
        i = evs.index(e)
        assert evs[i - 1]["event"] == "round.end" and evs[i - 1]["round"] == e["round"]
    assert not [e for e in evs if e["event"] == "run.end"]  # the run did not end within 10 min


def test_view_was_live_during_the_run(fed):
    """The rounds and the curve grew while the federation ran; the dead node
    went late, then offline."""
    n2 = fed.summaries["n2"]["node_id"]
    states, rounds_seen, curve_points = [], [], []
    for _, doc in fed.snapshots:
        st = {n["node_id"]: n["state"] for n in doc["nodes"]}.get(n2)
        if st and (not states or states[-1] != st):
            states.append(st)
        if doc["runs"]:
            r = doc["runs"][0]
            rounds_seen.append(len(r["rounds"]))
            curve_points.append(sum(1 for p in r["rounds"] if "train_loss" in p["metrics"]))
    assert states[:1] == ["active"] and "late" in states and states[-1] == "offline", states
    assert states.index("late") < states.index("offline"), states
    assert rounds_seen == sorted(rounds_seen) and rounds_seen[0] < rounds_seen[-1] == 6, rounds_seen
    assert len(set(curve_points)) >= 3, curve_points  # the training curve moved: 1, 2, 3 points seen
    # Some document showed a round open, with its live counters.
    opened = [p for _, d in fed.snapshots for r in d["runs"] for p in r["rounds"] if p["open"]]
    assert opened and all(p["end_ms"] is None for p in opened)


def test_page_is_self_contained(fed):
    assert fed.page_during_run is not None
    status, headers, body = fed.page_during_run
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = body.decode()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external asset of any kind: no URL with a scheme or protocol-relative.
    assert not re.search(r"(?i)(https?:|ftp:|wss?:)//|(src|href)\s*=\s*[\"']?//|@import|url\(", page)
    assert not re.search(r"(?i)<(link|img|iframe|object|embed)\b", page)
    assert re.search(r"<script>", page) and not re.search(r"<script[^>]+src", page)
    assert 'fetch("v1/federation"' in page
    assert "prefers-color-scheme:dark" in page and 'name="viewport"' in page
    # The same page now, and HEAD gives the headers only.
    assert http(fed.sc.admin_port, "/")[2] == body
    req = urllib.request.Request(f"http://{HOST}:{fed.sc.admin_port}/", method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) == len(body)


@pytest.mark.skipif(not shutil.which("node"), reason="node (Debian nodejs) not installed: script syntax not checked")
def test_page_script_parses(fed, tmp_path):
    page = fed.page_during_run[2].decode()
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    path = tmp_path / "page.js"
    path.write_text(script)
    r = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"bad sample line {line!r}"
        out[(m.group(1), frozenset(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or "")))] = float(m.group(3))
    return out


def test_new_metrics(fed):
    from cryptography import x509
    status, _, body = http(fed.sc.admin_port, "/metrics")
    assert status == 200
    text = body.decode()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    m = parse_metrics(text)
    st = fed.stats

    def get(name, **labels):
        return m.get((name, frozenset(labels.items())))

    version = subprocess.run([fed.sc.argv()[0], "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert get("flower_sidecar_build_info", version=version) == 1
    # The auto-generated server certificate's notAfter, read independently.
    cert = x509.load_pem_x509_certificate((fed.sc.tls_dir / "server.pem").read_bytes())
    not_after = get("flower_sidecar_tls_cert_not_after_seconds", cert="server")
    assert not_after == int(cert.not_valid_after.replace(tzinfo=dt.timezone.utc).timestamp()), \
        (not_after, cert.not_valid_after)
    assert not_after > time.time() + 86400
    assert get("flower_sidecar_nodes", state="offline") == 1
    assert get("flower_sidecar_nodes", state="deactivated") == 2
    # grpc-ecosystem names: the same counts as the emulator's.
    eco = {"OK": "OK", "UNAVAILABLE": "Unavailable"}
    total = 0
    for method in emu.METHODS:
        labels = dict(grpc_type="unary", grpc_service="flwr.proto.Fleet", grpc_method=method)
        for status_name, n in st["statuses"].get(method, {}).items():
            assert get("grpc_server_handled_total", grpc_code=eco[status_name], **labels) == n, (method, status_name)
            total += n
        count = get("grpc_server_handling_seconds_count", **labels)
        assert count == get("flower_sidecar_call_duration_seconds_count", method=method)
        assert count == sum(st["statuses"].get(method, {}).values())
    # Sub-millisecond buckets exist and loopback heartbeats/polls land below 1 ms sometimes
    # or not, but the bucket series is complete and monotonic.
    les = sorted(float(dict(k[1])["le"]) for k in m if k[0] == "grpc_server_handling_seconds_bucket"
                 and ("grpc_method", "PullMessages") in k[1] and dict(k[1])["le"] != "+Inf")
    assert les[0] == 0.0001 and les[-1] == 30
    assert total == sum(sum(v.values()) for v in st["statuses"].values())
    # Every metric the operator kit queries is one this sidecar exports.
    names = {k[0] for k in m}
    kit = (ROOT / "deploy" / "prometheus" / "flower-sidecar.rules.yml").read_text() + \
        (ROOT / "deploy" / "grafana" / "flower-sidecar.json").read_text()
    for used in set(re.findall(r"\b((?:flower_sidecar|grpc_server)_[a-z_]+)", kit)):
        if used == "flower_sidecar_run_round_open_seconds":
            continue  # only while a round is open: checked below from a live scrape
        assert used in names, f"deploy/ queries {used}, /metrics has no such series"


def test_round_open_seconds_while_running(tmp_path):
    """flower_sidecar_run_round_open_seconds appears while a round is open:
    a SuperLink with one node and a second that never comes keeps round 1
    open."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True, timeout=120)
    group = procs.ProcGroup(str(tmp_path))
    port = procs.free_port(HOST)
    try:
        link = group.start("superlink", [PY, EMULATOR, "superlink", "--listen", f"{HOST}:{port}",
                                         "--nodes", "1", "--rounds", "1", "--slow-push-answer", "3"])
        procs.wait_port(HOST, port, timeout=20, proc=link)
        sc = Sidecar(tmp_path, "open", ["--upstream", f"{HOST}:{port}"], tls=False)
        sc.start()
        group.start("n0", [PY, EMULATOR, "supernode", "--upstream", sc.listen, "--insecure", *FAST_NODE,
                           "--rounds", "1"])

        def open_seconds():
            text = http(sc.admin_port, "/metrics")[2].decode()
            got = re.findall(r'^flower_sidecar_run_round_open_seconds\{run_id="(\d+)"\} (\S+)$', text, re.M)
            return got or None
        got = wait_for(open_seconds, 20 * SLOW, "an open round in /metrics")
        assert float(got[0][1]) >= 0
        doc = view(sc.admin_port)
        assert doc["runs"][0]["run_id"] == got[0][0]
    finally:
        group.stop_all()
        if "sc" in locals() and sc.proc:
            check_clean_exit(sc)
