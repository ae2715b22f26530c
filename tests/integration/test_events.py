"""Fleet events and metrics of `flower-sidecar link`, judged against what the
Fleet emulator (tests/emulator/fleet_emulator.py) sent and counted.

    make all build/flower-sidecar-asan
    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_events.py
    FS_SIDECAR_BIN=build/flower-sidecar-asan /usr/bin/python3 -m pytest ...

Three federations, each run once per module and judged by several tests:

- main: SuperLink --nodes 2 --rounds 3 (train and evaluate), one SuperNode
  answering train with Message.error (--error-reply), a GetRun and a
  PullObject failed once with UNAVAILABLE (--fail-method; the nodes retry).
  The nodes go through a chain of four sidecars, so that one federation
  shows the same calls as seen with four logging set-ups:
      nodes -> json INFO -> json DEBUG -> text INFO -> json WARNING -> SuperLink
  (all h2c; a link sidecar's upstream is h2c, so a sidecar can be another's).
- tls: nodes over TLS (the sidecar's auto-generated CA) to one sidecar;
  2 rounds; one node vanishes after 3 replies (--vanish-after, heartbeat
  interval 1 s): it is never handed its last instruction, node.offline.
  The PushObject that completes a reply is answered 0.3 s late
  (--slow-push-answer), after the other node has the next phase: the
  round's bytes_in must still count that object (a busy SuperLink did
  this once, and round.end came out 63 bytes short).
- fatal: 1 round; the first PushMessages fails with FAILED_PRECONDITION,
  which Flower (and the emulator) do not retry: that node dies holding an
  instruction it confirmed, goes offline, and the round ends with it
  missing.  The nodes poll every 4 s so that the sidecar (1 s tick) sees the
  node go offline before the SuperLink's next phase reaches it.

Expected events come from the emulator's stats file (SuperLink) and summary
files (SuperNodes): message ids, rounds, error replies, node ids (decimal
strings), object bytes, call counts and statuses.  Plus a JSON-escaping
test with a small grpcio stand-in upstream that answers Fleet calls with
crafted strings.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
import pytest

import procs
from conftest import HOST, PY, SLOW, Sidecar, check_clean_exit, wait_for

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import fleet_emulator as emu  # noqa: E402

# The federations are module fixtures: under pytest-xdist, one worker runs
# this whole module, each federation once.
pytestmark = pytest.mark.xdist_group("test_events")

FAST_NODE = ["--poll-interval", "0.1", "--max-retry-wait", "0.2"]
RUN_TIMEOUT = 60 * SLOW

# Events that belong to one node's story, in the order that node causes them.
NODE_SEQ = ("node.register", "node.activate", "message.dispatch", "message.confirm", "message.reply",
            "node.deactivate", "node.unregister")
FLEET_EVENTS = set(NODE_SEQ) | {"node.offline", "node.heartbeat", "run.fetch", "fab.fetch", "round.start",
                                "round.end", "object.pull", "object.push", "fleet.undecoded"}
OBJECT_TYPES = {"Message", "RecordDict", "ArrayRecord", "Array", "ArrayChunk", "ConfigRecord", "MetricRecord"}
FAB_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
ERROR_REASON = "<class 'RuntimeError'>:<'emulated ClientApp failure'>"
STATUS_CODE = {c.name: c.value[0] for c in grpc.StatusCode}


# ------------------------------------------------------------------ plumbing


def s(v) -> str:
    """Field values compared as text: the JSON and the text format agree on it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def norm(ev: dict) -> dict:
    return {k: s(v) for k, v in ev.items()}


TEXT_KV = re.compile(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ ]*)')


def parse_text(path: Path) -> list[dict]:
    """--log-format text lines -> dicts like the JSON events (values as text)."""
    out = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        line = raw.decode("utf-8")
        assert len(raw) + 1 <= 4096, line[:200]
        m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (debug|info|warn|error) +([a-z0-9_.]+)(.*)$", line)
        assert m, f"not a text event line: {line[:300]!r}"
        ev = {"ts": m.group(1), "level": m.group(2), "event": m.group(3)}
        rest = m.group(4)
        pos = 0
        for kv in TEXT_KV.finditer(rest):
            assert kv.start() == pos, f"cannot parse {rest[pos:pos + 80]!r} in {line[:300]!r}"
            v = kv.group(2)
            ev[kv.group(1)] = json.loads(v) if v.startswith('"') else v
            pos = kv.end()
        assert pos == len(rest), f"cannot parse {rest[pos:pos + 80]!r} in {line[:300]!r}"
        out.append(ev)
    return out


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet, reset, ...
        return 0, str(e)


def parse_metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} of the sample lines."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"bad sample line {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def sample(metrics: dict, name: str, **labels) -> Optional[float]:
    return metrics.get((name, frozenset(labels.items())))


def stop_checked(sc: Sidecar, text: bool = False) -> None:
    if not text:
        check_clean_exit(sc)
        return
    rc = sc.stop()
    assert rc == 0, f"{sc.name}: exit code {rc}\n{sc.logs()}"
    assert not sc.sanitizer_report(), sc.sanitizer_report()[-6000:]


class Federation:
    """One emulator federation through a chain of sidecars, run to the end."""

    def __init__(self, tmp: Path, link_args: list[str], chain: list[tuple[str, list[str], bool]],
                 nodes: list[tuple[str, list[str]]]):
        self.tmp = tmp
        self.group = procs.ProcGroup(str(tmp))
        self.link_args = link_args
        self.chain_spec = chain
        self.node_spec = nodes
        self.sidecars: dict[str, Sidecar] = {}
        self.text_sidecars: set[str] = set()
        self.stats: dict = {}
        self.summaries: dict[str, dict] = {}
        self.codes: dict[str, int] = {}
        self.metrics: dict[str, str] = {}

    def start(self) -> "Federation":
        port = procs.free_port(HOST)
        self.stats_path = self.tmp / "superlink.json"
        link = self.group.start("superlink", [
            PY, EMULATOR, "superlink", "--listen", f"{HOST}:{port}", "--stats-file", str(self.stats_path),
            "--exit-when-done", "--done-grace", str(10 * SLOW), *self.link_args])
        procs.wait_port(HOST, port, timeout=20, proc=link)
        upstream = f"{HOST}:{port}"
        # From the SuperLink outwards: each sidecar's upstream is the next one.
        for name, flags, tls in reversed(self.chain_spec):
            sc = Sidecar(self.tmp, name, [*flags, "--upstream", upstream], tls=tls)
            self.sidecars[name] = sc
            if "text" in flags:
                self.text_sidecars.add(name)
            sc.start(wait_upstream=False)
            wait_for(lambda: http_get(sc.admin_port, "/healthz")[0] == 200, 10 * SLOW,
                     f"{name} SERVING")
            upstream = sc.listen
        first = self.sidecars[self.chain_spec[0][0]]
        for name, extra in self.node_spec:
            security = (["--root-cert", str(first.tls_dir / "ca.pem")] if first.tls else ["--insecure"])
            target = f"localhost:{first.port}" if first.tls else first.listen
            self.group.start(name, [
                PY, EMULATOR, "supernode", "--upstream", target, *security,
                "--summary-file", str(self.tmp / f"{name}.json"), *extra])
        return self

    def wait(self) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        for name, proc in self.group.procs.items():
            try:
                self.codes[name] = procs.wait_exit(proc, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"{name} did not finish in {RUN_TIMEOUT:.0f} s\n{self.logs()}") from None
        self.stats = json.loads(self.stats_path.read_text())
        for name, _ in self.node_spec:
            self.summaries[name] = json.loads((self.tmp / f"{name}.json").read_text())

    def collect_metrics(self) -> None:
        for name, sc in self.sidecars.items():
            status, body = http_get(sc.admin_port, "/metrics")
            assert status == 200, body
            self.metrics[name] = body

    def events(self, name: str) -> list[dict]:
        sc = self.sidecars[name]
        if name in self.text_sidecars:
            return [norm(e) for e in parse_text(sc.events.path)]
        evs = sc.events.all()
        for e in evs:  # 64-bit ids are decimal strings in JSON, never numbers
            for k in ("node_id", "run_id"):
                if k in e:
                    assert isinstance(e[k], str) and e[k].isdigit(), e
        return [norm(e) for e in evs]

    def logs(self) -> str:
        return self.group.logs(30) + "\n" + "\n".join(sc.logs(30) for sc in self.sidecars.values())

    def stop(self) -> None:
        self.group.stop_all()
        errors = []
        for name in [n for n, _, _ in self.chain_spec]:  # downstream first
            sc = self.sidecars.get(name)
            if sc is None or sc.proc is None:
                continue
            try:
                stop_checked(sc, name in self.text_sidecars)
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            raise AssertionError("\n\n".join(errors))


def run_federation(tmp: Path, link_args, chain, nodes, wait_events=()) -> Federation:
    fed = Federation(tmp, list(link_args), chain, nodes)
    try:
        fed.start()
        fed.wait()
        # Events the sidecar derives on its 1 s tick may trail the emulator.
        first = fed.chain_spec[0][0]
        for event, match in wait_events:
            fed.sidecars[first].events.wait(event, timeout=10, **match)
        fed.collect_metrics()
    except BaseException:
        try:
            fed.stop()
        except AssertionError:
            pass
        raise
    return fed


# ------------------------------------------------------------- expectations


class Expect:
    """What the sidecar must have said, from the emulator's own records."""

    def __init__(self, fed: Federation):
        st, sums = fed.stats, fed.summaries
        self.stats, self.summaries = st, sums
        self.run_id = st["run_id"]
        self.phases = [(r["round"], r["message_type"]) for r in st["rounds"]]
        replied_ids = {i["message_id"] for s_ in sums.values() for i in s_["instructions"]}
        # Instructions handed out but never answered: a node that died
        # between ConfirmMessageReceived and its reply.
        orphans = sorted(set(st["dispatch_by_message_id"]) - replied_ids)
        fatal = [n for n, s_ in sums.items() if s_["exit_reason"] == "fatal"]
        assert len(orphans) == len(fatal) <= 1, (orphans, fatal)
        self.per_node: dict[str, list[tuple[str, dict]]] = {}
        self.phase_nodes: dict[tuple, list] = {p: [] for p in self.phases}  # (node, instruction|None)
        self.undelivered: dict[tuple, int] = Counter()
        self.gone: list[str] = []  # nodes that left without DeactivateNode
        for name, sm in sums.items():
            nid = sm["node_id"]
            seq = [("node.register", {}), ("node.activate", {})]
            for ins in sm["instructions"]:
                p = (ins["round"], ins["message_type"])
                self.phase_nodes[p].append((nid, ins))
                seq += [("message.dispatch", {"message_id": ins["message_id"], "message_type": ins["message_type"],
                                              "round": s(ins["round"]), "objects": s(ins["objects"]),
                                              "group_id": "", "run_id": self.run_id}),
                        ("message.confirm", {"message_id": ins["message_id"], "run_id": self.run_id}),
                        ("message.reply", self._reply_fields(ins))]
            after = self.phases[len(sm["instructions"])] if len(sm["instructions"]) < len(self.phases) else None
            if sm["exit_reason"] == "fatal":
                # It had pulled its next instruction and confirmed it.
                assert after is not None and nid in st["rounds"][self.phases.index(after)]["missing_nodes"]
                self.phase_nodes[after].append((nid, None))
                seq += [("message.dispatch", {"message_id": orphans[0], "message_type": after[1],
                                              "round": s(after[0]), "run_id": self.run_id}),
                        ("message.confirm", {"message_id": orphans[0], "run_id": self.run_id})]
                self.gone.append(nid)
            elif sm["exit_reason"] == "vanished":
                # It never pulled the instruction the SuperLink queued for it.
                if after is not None:
                    assert nid in st["rounds"][self.phases.index(after)]["missing_nodes"]
                    self.undelivered[after] += 1
                self.gone.append(nid)
            else:
                assert sm["exit_reason"] == "done", sm
                seq += [("node.deactivate", {}), ("node.unregister", {})]
            self.per_node[nid] = seq
        assert st["expired_instructions"] == sum(self.undelivered.values())

    @staticmethod
    def _reply_fields(ins: dict) -> dict:
        f = {"message_id": ins["reply_id"], "reply_to": ins["message_id"], "message_type": ins["message_type"],
             "round": s(ins["round"])}
        # The emulator's replies: an error is the Message object alone; a
        # train reply Message, RecordDict, ArrayRecord, Array, ArrayChunk,
        # MetricRecord; an evaluate reply Message, RecordDict, MetricRecord.
        if ins["error"]:
            f.update(error_code="2", error_reason=ERROR_REASON, objects_to_push="1")
        else:
            f["objects_to_push"] = "6" if ins["message_type"] == "train" else "3"
        return f

    def round_end(self, p: tuple) -> dict:
        members = self.phase_nodes[p]
        replied = [ins for _, ins in members if ins is not None]
        missing = [n for n, ins in members if ins is None]
        pulled = sum(i["bytes_pulled"] for i in replied)
        if missing:  # a dead node pulled the same tree (same sizes) before dying
            pulled += len(missing) * replied[0]["bytes_pulled"]
        return {"nodes": s(len(members)), "replies": s(len(replied)),
                "errors": s(sum(i["error"] for i in replied)), "missing": s(len(missing)),
                "bytes_out": s(pulled), "bytes_in": s(sum(i["bytes_pushed"] for i in replied))}


def check_fields(ev: dict, want: dict, where: str) -> None:
    for k, v in want.items():
        assert ev.get(k) == v, f"{where}: {k} is {ev.get(k)!r}, want {v!r}\n{ev}"


def check_fleet_story(fed: Federation, evs: list[dict], *, debug: bool, peers: Optional[set] = None) -> None:
    """The exact Fleet events of one sidecar against the emulator's records."""
    x = Expect(fed)
    st = x.stats
    hb = {sm["node_id"]: 1.0 if "--heartbeat-interval" in dict(fed.node_spec)[name] else 30.0
          for name, sm in x.summaries.items()}
    index = {id(e): i for i, e in enumerate(evs)}

    # Per node: exactly its sequence, with the emulator's ids and rounds.
    for nid, seq in x.per_node.items():
        mine = [e for e in evs if e["event"] in NODE_SEQ and e.get("node_id") == nid]
        assert [e["event"] for e in mine] == [n for n, _ in seq], \
            f"node {nid}: events {[e['event'] for e in mine]}, want {[n for n, _ in seq]}"
        for e, (name, want) in zip(mine, seq):
            check_fields(e, want, f"node {nid} {name}")
            assert e["level"] == "info", e
            if name == "node.activate":
                assert float(e["heartbeat_interval"]) == hb[nid], e
            if name.startswith("node.") and peers is not None:
                assert e["peer"] in peers, (e, peers)
            if name == "message.reply":
                assert float(e["clientapp_runtime_s"]) >= 0, e
                if "error_code" not in want:
                    assert "error_code" not in e and "error_reason" not in e, e
    # Nothing about unknown nodes.
    all_nodes = set(x.per_node)
    for e in evs:
        if e["event"] in FLEET_EVENTS and "node_id" in e:
            assert e["node_id"] in all_nodes, e

    # Each message once: the ids the SuperLink handed out, confirmed and got.
    def ids(event):
        return Counter(e["message_id"] for e in evs if e["event"] == event)
    assert ids("message.dispatch") == Counter(st["dispatch_by_message_id"])
    assert ids("message.confirm") == Counter(st["confirm_by_message_id"])
    assert ids("message.reply") == Counter(st["push_messages_by_message_id"])

    # Rounds: start/end per (round, type), in the SuperLink's order.
    rounds = [e for e in evs if e["event"] in ("round.start", "round.end")]
    assert [(e["event"], e["round"], e["message_type"]) for e in rounds] == \
        [(ev, s(r), t) for r, t in x.phases for ev in ("round.start", "round.end")], \
        [(e["event"], e["round"], e["message_type"]) for e in rounds]
    for i, p in enumerate(x.phases):
        start, end = rounds[2 * i], rounds[2 * i + 1]
        emu_round = st["rounds"][i]
        assert start["run_id"] == end["run_id"] == x.run_id
        want = x.round_end(p)
        check_fields(end, want, f"round.end {p}")
        # ... which is what the SuperLink counted, less what it queued but
        # never handed out (a vanished node's instruction).
        lost = x.undelivered[p]
        assert (int(end["nodes"]), int(end["replies"]), int(end["errors"]), int(end["missing"])) == \
            (emu_round["dispatched"] - lost, emu_round["replies"], emu_round["error_replies"],
             emu_round["missing"] - lost), (end, emu_round)
        assert 0 <= int(end["duration_ms"]) <= emu_round["duration_ms"] + 2000 * SLOW, (end, emu_round)
        # Every dispatch and reply of the phase lies between its start and end.
        lo, hi = index[id(start)], index[id(end)]
        for e in evs:
            if e["event"] in ("message.dispatch", "message.reply") and (e.get("round"), e["message_type"]) == \
                    (s(p[0]), p[1]):
                assert lo < index[id(e)] < hi, (p, e)

    # GetRun / GetFab answered once per node (a failed attempt tells nothing).
    for name, sm in x.summaries.items():
        nid = sm["node_id"]
        for event, method in (("run.fetch", "GetRun"), ("fab.fetch", "GetFab")):
            got = [e for e in evs if e["event"] == event and e.get("node_id") == nid]
            assert len(got) == sm["statuses"][method]["OK"] == 1, (nid, event, got)
            e = got[0]
            assert e["run_id"] == x.run_id and FAB_HASH_RE.match(e["fab_hash"]) and int(e["bytes"]) > 0, e
            if event == "run.fetch":
                assert (e["fab_id"], e["fab_version"]) == ("flwrlabs/emulator-app", "1.0.0"), e
            # before the node confirmed its first instruction
            first_confirm = next(i for i, ev in enumerate(evs)
                                 if ev["event"] == "message.confirm" and ev["node_id"] == nid)
            assert index[id(e)] < first_confirm, e

    # node.offline: exactly the nodes that left without DeactivateNode.
    off = [e for e in evs if e["event"] == "node.offline"]
    assert sorted(e["node_id"] for e in off) == sorted(x.gone) == sorted(st["nodes"]["offline"]), off
    for e in off:
        assert e["level"] == "warn"
        limit = 2000 * hb[e["node_id"]]
        assert limit <= int(e["last_seen_ms"]) <= limit + 1000 + 1500 * SLOW, e

    # Debug events only at DEBUG; never an undecoded message from the emulator.
    assert not [e for e in evs if e["event"] == "fleet.undecoded"], \
        [e for e in evs if e["event"] == "fleet.undecoded"][:3]
    debug_events = [e for e in evs if e["level"] == "debug"]
    if not debug:
        assert not debug_events, debug_events[:3]
        return
    for e in debug_events:
        # upstream.probe: the emulated SuperLink exits at the end of the run,
        # and the link may probe for it before it is stopped itself.
        assert e["event"] in ("node.heartbeat", "object.pull", "object.push", "upstream.probe"), e
    for name, sm in x.summaries.items():
        nid = sm["node_id"]
        beats = [e for e in evs if e["event"] == "node.heartbeat" and e["node_id"] == nid]
        assert len(beats) == sm["statuses"]["SendNodeHeartbeat"]["OK"], (nid, len(beats))
        assert all(float(e["heartbeat_interval"]) == hb[nid] for e in beats)
    for event, key, method in (("object.pull", "pull_object_by_object_id", "PullObject"),
                               ("object.push", "push_object_by_object_id", "PushObject")):
        objs = [e for e in evs if e["event"] == event]
        assert Counter(e["object_id"] for e in objs) == Counter(st[key]), event
        assert len(objs) == st["statuses"][method]["OK"]
        assert {e["object_type"] for e in objs} <= OBJECT_TYPES, {e["object_type"] for e in objs}
        assert all(e["run_id"] == x.run_id for e in objs)
    pulled = [e for e in evs if e["event"] == "object.pull"]
    pushed = [e for e in evs if e["event"] == "object.push"]
    assert sum(int(e["bytes"]) for e in pulled) == st["object_bytes_sent"]
    assert sum(int(e["bytes"]) for e in pushed) == sum(sm["object_bytes_pushed"] for sm in x.summaries.values())
    # One ConfigRecord pulled per instruction handed out.
    assert sum(e["object_type"] == "ConfigRecord" for e in pulled) == sum(st["dispatch_by_message_id"].values())


def check_rpc_errors(fed: Federation, evs: list[dict]) -> list[dict]:
    """rpc.error for exactly the Fleet calls the SuperLink failed."""
    want = Counter()
    for method, per in fed.stats["statuses"].items():
        for status, n in per.items():
            if status != "OK":
                want[(f"/flwr.proto.Fleet/{method}", s(STATUS_CODE[status]),
                      f"fleet-emulator: injected {status} for {method}")] += n
    errs = [e for e in evs if e["event"] == "rpc.error"]
    assert Counter((e["method"], e["grpc_status"], e["grpc_message"]) for e in errs) == want, errs
    for e in errs:
        assert e["level"] == "warn" and int(e["duration_ms"]) >= 0, e
    return errs


def check_metrics(fed: Federation, name: str) -> dict:
    text = fed.metrics[name]
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"promtool check metrics: {r.stdout}{r.stderr}\n{text[:3000]}"
    m = parse_metrics(text)
    st = fed.stats
    calls = 0
    for method in emu.METHODS:
        per = st["statuses"].get(method, {})
        assert sample(m, "flower_sidecar_calls_total", method=method, status="OK") == per.get("OK", 0), method
        for status, n in per.items():
            assert sample(m, "flower_sidecar_calls_total", method=method, status=status) == n, (method, status)
        total = sum(v for (mn, lb), v in m.items()
                    if mn == "flower_sidecar_calls_total" and ("method", method) in lb)
        assert total == st["calls"].get(method, 0) == sum(per.values()), method
        assert sample(m, "flower_sidecar_call_duration_seconds_count", method=method) == total
        assert sample(m, "flower_sidecar_call_duration_seconds_bucket", method=method, le="+Inf") == total
        calls += total
    ok_calls = sum(per.get("OK", 0) for per in st["statuses"].values())
    # Every gRPC message is its protobuf plus a 5-byte prefix; failed calls
    # sent no response message.
    bytes_in = sum(v for (mn, lb), v in m.items() if mn == "flower_sidecar_bytes_total" and ("direction", "in") in lb)
    bytes_out = sum(v for (mn, lb), v in m.items() if mn == "flower_sidecar_bytes_total" and ("direction", "out") in lb)
    assert bytes_in == st["bytes_in"] + 5 * calls, (bytes_in, st["bytes_in"], calls)
    assert bytes_out == st["bytes_out"] + 5 * ok_calls, (bytes_out, st["bytes_out"], ok_calls)
    assert sample(m, "flower_sidecar_bytes_total", method="PushObject", direction="in") >= \
        sum(sm["object_bytes_pushed"] for sm in fed.summaries.values()) >= st["object_bytes_received"] > 0
    assert sample(m, "flower_sidecar_bytes_total", method="PullObject", direction="out") >= \
        st["object_bytes_sent"] > 0
    assert not [k for k in m if k[0] == "flower_sidecar_calls_total" and ("method", "other") in k[1]]
    assert sample(m, "flower_sidecar_event_lines_dropped_total") == 0
    return m


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def protos():
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True, timeout=120)
    emu.load_protos()


MAIN_CHAIN = [
    ("json", ["--no-tls"], False),
    ("debug", ["--no-tls", "--log-level", "DEBUG"], False),
    ("text", ["--no-tls", "--log-format", "text"], False),
    ("warning", ["--no-tls", "--log-level", "WARNING"], False),
]


@pytest.fixture(scope="module")
def main_fed(tmp_path_factory, protos):
    fed = run_federation(
        tmp_path_factory.mktemp("main"),
        ["--nodes", "2", "--rounds", "3", "--fail-method", "GetRun:UNAVAILABLE:1",
         "--fail-method", "PullObject:UNAVAILABLE:1"],
        MAIN_CHAIN,
        [("n0", FAST_NODE), ("n1", [*FAST_NODE, "--error-reply"])])
    yield fed
    fed.stop()


@pytest.fixture(scope="module")
def tls_fed(tmp_path_factory, protos):
    fed = run_federation(
        tmp_path_factory.mktemp("tls"),
        ["--nodes", "2", "--rounds", "2", "--slow-push-answer", "0.3"],
        [("tls", ["--log-level", "DEBUG"], True)],
        [("n0", [*FAST_NODE, "--rounds", "2"]), ("n1", [*FAST_NODE, "--rounds", "2", "--vanish-after", "3",
                                    "--heartbeat-interval", "1"])],
        wait_events=[("node.offline", {})])
    yield fed
    fed.stop()


@pytest.fixture(scope="module")
def fatal_fed(tmp_path_factory, protos):
    slow_poll = ["--poll-interval", "4", "--max-retry-wait", "0.2", "--heartbeat-interval", "1", "--rounds", "1"]
    fed = run_federation(
        tmp_path_factory.mktemp("fatal"),
        ["--nodes", "2", "--rounds", "1", "--fail-method", "PushMessages:FAILED_PRECONDITION:1"],
        [("json", ["--no-tls"], False)],
        [("n0", slow_poll), ("n1", slow_poll)],
        wait_events=[("node.offline", {})])
    yield fed
    fed.stop()


def conn_peers(evs: list[dict]) -> set:
    return {e["peer"] for e in evs if e["event"] == "conn.open"}


# --------------------------------------------------------------------- tests


def test_main_federation_ran_as_planned(main_fed):
    st, sums = main_fed.stats, main_fed.summaries
    assert main_fed.codes == {"superlink": 0, "n0": 0, "n1": 0}, main_fed.logs()
    assert st["done"] and st["rounds_completed"] == {"train": 3, "evaluate": 3}
    assert st["injected_failures"] == 2 and st["error_replies_total"] == 3
    assert sums["n0"]["retries"] + sums["n1"]["retries"] == 2
    for k in ("integrity_errors", "auth_failures", "handler_crashes", "driver_crashed", "late_replies"):
        assert st[k] == 0, k


def test_main_exact_events(main_fed):
    evs = main_fed.events("json")
    check_fleet_story(main_fed, evs, debug=False, peers=conn_peers(evs))
    check_rpc_errors(main_fed, evs)


def test_rpc_error_names_the_node(main_fed):
    # README.md, "Events": rpc.error carries method, grpc_status, grpc_message,
    # node_id, duration_ms.  The retried GetRun came from a known node.
    evs = main_fed.events("json")
    errs = check_rpc_errors(main_fed, evs)
    retried = {sm["node_id"]: sm["retries_by_method"] for sm in main_fed.summaries.values()}
    for e in errs:
        method = e["method"].rsplit("/", 1)[1]
        want = [n for n, r in retried.items() if r.get(method)]
        assert len(want) == 1
        assert e.get("node_id") == want[0], f"rpc.error without the node's id: {e}"


def test_debug_level_adds_objects_and_heartbeats(main_fed):
    evs = main_fed.events("debug")
    check_fleet_story(main_fed, evs, debug=True)
    check_rpc_errors(main_fed, evs)
    # The same Fleet story as the INFO sidecar next to it, plus debug events.
    info = [(e["event"], e.get("message_id"), e.get("node_id")) for e in main_fed.events("json")
            if e["event"] in FLEET_EVENTS and e["level"] != "debug"]
    dbg = [(e["event"], e.get("message_id"), e.get("node_id")) for e in evs
           if e["event"] in FLEET_EVENTS and e["level"] != "debug"]
    assert Counter(info) == Counter(dbg)


def test_text_format_shows_the_same_events(main_fed):
    evs = main_fed.events("text")
    check_fleet_story(main_fed, evs, debug=False)
    check_rpc_errors(main_fed, evs)
    keys = ("event", "level", "node_id", "run_id", "message_id", "reply_to", "message_type", "round", "objects",
            "group_id", "nodes", "replies", "errors", "missing", "bytes_in", "bytes_out", "error_code",
            "error_reason", "objects_to_push", "fab_id", "fab_version", "fab_hash", "bytes", "grpc_status",
            "grpc_message", "method", "heartbeat_interval")
    def story(events):
        return Counter(tuple((k, e.get(k)) for k in keys) for e in events
                       if e["event"] in FLEET_EVENTS or e["event"] == "rpc.error")
    assert story(evs) == story(main_fed.events("json"))
    # One line per event, nothing else on stdout.
    raw = main_fed.sidecars["text"].events.path.read_bytes()
    assert raw.count(b"\n") == len(evs) and not raw.startswith(b"{")


def test_warning_level_hides_info_events(main_fed):
    evs = main_fed.events("warning")
    assert evs, "no events at all"
    assert {e["level"] for e in evs} <= {"warn", "error"}, {e["level"] for e in evs}
    assert not [e for e in evs if e["event"] in FLEET_EVENTS], [e for e in evs if e["event"] in FLEET_EVENTS][:3]
    assert len(check_rpc_errors(main_fed, evs)) == 2


def test_main_metrics(main_fed):
    m = check_metrics(main_fed, "json")
    assert sample(m, "flower_sidecar_nodes_active") == 0  # both deactivated
    assert sample(m, "flower_sidecar_connections_total") == 2  # one per SuperNode
    assert sample(m, "flower_sidecar_calls_total", method="GetRun", status="UNAVAILABLE") == 1
    assert sample(m, "flower_sidecar_calls_total", method="PullObject", status="UNAVAILABLE") == 1
    # Per run: the latest round and the messages the SuperLink counted.
    st, run = main_fed.stats, main_fed.stats["run_id"]
    assert sample(m, "flower_sidecar_run_round", run_id=run) == max(r["round"] for r in st["rounds"])
    assert sample(m, "flower_sidecar_run_messages_total", run_id=run, kind="instruction") == \
        sum(r["dispatched"] for r in st["rounds"])
    assert sample(m, "flower_sidecar_run_messages_total", run_id=run, kind="reply") == st["replies_total"]
    assert sample(m, "flower_sidecar_run_messages_total", run_id=run, kind="error_reply") == \
        st["error_replies_total"] > 0
    # The sidecar next to the SuperLink counted the same calls.
    m2 = check_metrics(main_fed, "warning")
    assert {k: v for k, v in m.items() if k[0] in ("flower_sidecar_calls_total", "flower_sidecar_bytes_total")} == \
        {k: v for k, v in m2.items() if k[0] in ("flower_sidecar_calls_total", "flower_sidecar_bytes_total")}


def test_tls_vanished_node(tls_fed):
    fed = tls_fed
    st, sums = fed.stats, fed.summaries
    assert fed.codes == {"superlink": 0, "n0": 0, "n1": 0}, fed.logs()
    assert sums["n1"]["exit_reason"] == "vanished" and sums["n1"]["replies"] == 3
    assert st["nodes"]["offline"] == [sums["n1"]["node_id"]]
    assert st["rounds"][-1]["missing_nodes"] == [sums["n1"]["node_id"]]
    # The last phase ends when its last waited-for node goes offline: the
    # sidecar may say so up to a tick later than the SuperLink.
    wait_for(lambda: len(fed.sidecars["tls"].events.find("round.end")) >= 4, 5 * SLOW,
             "round.end of all 4 phases")
    evs = fed.events("tls")
    opened = [e for e in evs if e["event"] == "conn.open"]
    assert opened and all(e["alpn"] == "h2" and e["tls_version"].startswith("TLS") for e in opened), opened
    check_fleet_story(fed, evs, debug=True, peers=conn_peers(evs))
    check_rpc_errors(fed, evs)
    off = [e for e in evs if e["event"] == "node.offline"]
    assert [e["node_id"] for e in off] == [sums["n1"]["node_id"]]
    assert not [e for e in evs if e["event"] in ("node.deactivate", "node.unregister")
                and e["node_id"] == sums["n1"]["node_id"]]


def test_tls_metrics(tls_fed):
    m = check_metrics(tls_fed, "tls")
    assert sample(m, "flower_sidecar_tls_handshake_failures_total") == 0
    assert sample(m, "flower_sidecar_nodes_active") == 1  # the vanished node never deactivated


def test_node_dies_mid_round(fatal_fed):
    fed = fatal_fed
    st, sums = fed.stats, fed.summaries
    dead = [n for n, sm in sums.items() if sm["exit_reason"] == "fatal"]
    assert len(dead) == 1, fed.logs()
    live = "n1" if dead == ["n0"] else "n0"
    assert fed.codes == {"superlink": 0, dead[0]: 1, live: 0}, fed.logs()
    dead_id = sums[dead[0]]["node_id"]
    assert st["rounds"][0]["missing_nodes"] == [dead_id] and st["nodes"]["offline"] == [dead_id]
    evs = fed.events("json")
    check_fleet_story(fed, evs, debug=False, peers=conn_peers(evs))
    errs = check_rpc_errors(fed, evs)
    assert [(e["method"], e["grpc_status"]) for e in errs] == [("/flwr.proto.Fleet/PushMessages", "9")]
    # node.offline of the dead node, then the end of its round with it missing.
    i_off = next(i for i, e in enumerate(evs) if e["event"] == "node.offline")
    i_end = next(i for i, e in enumerate(evs) if e["event"] == "round.end")
    assert i_off < i_end
    check_fields(evs[i_end], {"round": "1", "message_type": "train", "nodes": "2", "replies": "1",
                              "missing": "1"}, "round.end")
    check_metrics(fed, "json")


# ------------------------------------------------------------ JSON escaping


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def f_varint(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v)


def f_bytes(num: int, b: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(b)) + b


def f_double(num: int, d: float) -> bytes:
    return _varint(num << 3 | 1) + struct.pack("<d", d)


NODE = 2**63 + 77
RUN = 2**64 - 3
# <= 23 bytes: fedstate keeps a tracked message's type in 24 bytes
WEIRD_TYPE = 'tr"ai\\n\n\t\r\x01\x1f\x7f\u2028é'.encode()
INVALID = b"ok \xff\xfe \xc3( \xed\xa0\x80 \xf4\x90\x80\x80 \xc0\xaf \xe2\x82 end"
LONG = ("L" * 5000 + "tail").encode()
LONG_R = ("R" * 5000).encode()
LONG_T = ("T" * 3000).encode()
QUOTY_ID = b'"quoted\\id"'


def fake_fleet_responses() -> dict[str, bytes]:
    run = (f_varint(1, RUN) + f_bytes(2, b'flwr/app"\\\x1b[31m\x08\x0c') + f_bytes(3, LONG) +
           f_bytes(5, INVALID) + f_bytes(10, f_bytes(1, b"running")))
    message = (f_bytes(1, f_varint(1, RUN) + f_bytes(2, QUOTY_ID) + f_varint(3, 1) + f_varint(4, NODE) +
                       f_bytes(6, INVALID) + f_double(7, 10.0) + f_bytes(8, WEIRD_TYPE)) + f_bytes(2, b""))
    tree = f_bytes(1, QUOTY_ID)
    return {
        "GetRun": f_bytes(1, run),
        "PullMessages": f_bytes(1, f_varint(1, 5)) + f_bytes(2, message) + f_bytes(3, tree),
        "ConfirmMessageReceived": b"",
        "PushMessages": f_bytes(1, f_varint(1, 5)) + f_bytes(3, LONG),
        "ActivateNode": f_varint(1, NODE),
    }


class FakeFleet:
    """A grpcio upstream answering Fleet calls with fixed raw responses."""

    def __init__(self, responses: dict[str, bytes]):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        handlers = {m: grpc.unary_unary_rpc_method_handler(lambda req, ctx, m=m: responses[m])
                    for m in responses}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("flwr.proto.Fleet", handlers)])
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def stop(self):
        self.server.stop(0).wait(5)


def per_byte_replace(b: bytes) -> str:
    """Invalid UTF-8 as the logger writes it: U+FFFD per invalid byte."""
    out, i = [], 0
    while i < len(b):
        for n in (1, 2, 3, 4):
            try:
                out.append(b[i:i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def test_json_escaping_with_a_real_parser(tmp_path, protos):
    fake = FakeFleet(fake_fleet_responses())
    text_sc = Sidecar(tmp_path, "esc-text", ["--no-tls", "--log-format", "text", "--log-level", "DEBUG",
                                             "--upstream", f"{HOST}:{fake.port}"], tls=False)
    json_sc = None
    try:
        text_sc.start(wait_upstream=False)
        wait_for(lambda: http_get(text_sc.admin_port, "/healthz")[0] == 200, 10 * SLOW, "text sidecar SERVING")
        json_sc = Sidecar(tmp_path, "esc-json", ["--no-tls", "--log-level", "DEBUG", "--upstream", text_sc.listen],
                          tls=False).start()
        ch = grpc.insecure_channel(json_sc.listen)
        try:
            def call(method, req):
                return ch.unary_unary(f"/flwr.proto.Fleet/{method}")(req, timeout=10 * SLOW)
            call("ActivateNode", f_bytes(1, b"key") + f_double(2, 30.0))
            node = f_bytes(1, f_varint(1, NODE))
            call("GetRun", node + f_varint(2, RUN))
            call("PullMessages", node)
            call("ConfirmMessageReceived", node + f_varint(2, RUN) + f_bytes(3, QUOTY_ID))
            # Four values of 1 KiB+ each (cut to 1024 bytes) do not fit in one
            # 4096-byte line together with the rest.
            reply_md = (f_varint(1, RUN) + f_bytes(2, LONG) + f_varint(3, NODE) + f_varint(4, 1) +
                        f_bytes(5, LONG_R) + f_bytes(8, LONG_T))
            error = f_varint(1, 3) + f_bytes(2, INVALID + b"\x08\x0c" + LONG)  # code: sint64 -2
            push = (node + f_bytes(2, f_bytes(1, reply_md) + f_bytes(3, error)) +
                    f_bytes(3, f_bytes(1, LONG)) + f_bytes(4, struct.pack("<d", 0.5)))  # packed doubles
            call("PushMessages", push)
        finally:
            ch.close()
        wait_for(lambda: json_sc.events.find("message.reply"), 5 * SLOW, "message.reply")
        raw = json_sc.events.path.read_bytes()
        lines = raw.split(b"\n")
        assert lines[-1] == b""
        evs = []
        for line in lines[:-1]:
            assert len(line) + 1 <= 4096, f"line of {len(line) + 1} bytes"
            ev = json.loads(line.decode("utf-8"))  # strict: raw control characters fail
            assert isinstance(ev, dict)
            evs.append(ev)
        by = {e["event"]: e for e in evs}
        assert not [e for e in evs if e["event"] == "fleet.undecoded"], evs

        # run.fetch: quotes, backslash, NUL, ESC; a long value cut; invalid UTF-8.
        rf = by["run.fetch"]
        assert rf["fab_id"] == 'flwr/app"\\\x1b[31m\x08\x0c'
        assert rf["fab_version"].endswith("...") and rf["fab_version"].startswith("LLLL")
        assert len(rf["fab_version"].encode()) <= 1024 + 3
        assert rf["truncated"] is True
        assert rf["fab_hash"] == per_byte_replace(INVALID)
        assert rf["fab_hash"].replace("\ufffd", "") == INVALID.decode("utf-8", "ignore")
        assert rf["run_id"] == str(RUN) and rf["node_id"] == str(NODE)

        # message.dispatch (announced at the confirm: no ConfigRecord here):
        # control characters, U+2028, emoji; quotes in an id.
        d = by["message.dispatch"]
        assert d["message_type"] == WEIRD_TYPE.decode()
        assert d["message_id"] == QUOTY_ID.decode()
        assert d["group_id"] == per_byte_replace(INVALID)
        assert by["message.confirm"]["message_id"] == QUOTY_ID.decode()

        # message.reply: four long or odd strings cannot all fit in 4096
        # bytes; the line stays whole, valid and marked.
        r = by["message.reply"]
        assert r["truncated"] is True
        assert r["node_id"] == str(NODE) and r["run_id"] == str(RUN)
        assert r["message_id"] == "L" * 1024 + "..."
        for key, full in (("reply_to", LONG_R.decode()), ("message_type", LONG_T.decode()),
                          ("error_reason", (INVALID + b"\x08\x0c" + LONG).decode("utf-8", "replace"))):
            if key in r:  # what did not fit is left out, not cut mid-escape
                v = r[key]
                assert v.endswith("...") and len(v.encode()) <= 1024 + 3 + 3 * 8, (key, v[:80])
                assert v[:-3].replace("\ufffd", "") in full.replace("\ufffd", ""), key
        assert "reply_to" in r  # the first three fit: 3 x 1 KiB + envelope < 4 KiB
        if "error_reason" in r:
            assert r["error_reason"].startswith("ok \ufffd\ufffd \ufffd( ") and "\x08\x0c" in r["error_reason"]

        # The text format: the same events, one line each (no raw newline,
        # no control characters), at most 4096 bytes.
        text_raw = text_sc.events.path.read_bytes()
        for line in text_raw.split(b"\n")[:-1]:
            assert len(line) + 1 <= 4096
            assert not [c for c in line if c < 0x20], line[:200]
            line.decode("utf-8")
        tev = [e for e in parse_text(text_sc.events.path) if e["event"] in FLEET_EVENTS]
        jev = [e for e in evs if e["event"] in FLEET_EVENTS]
        assert [e["event"] for e in tev] == [e["event"] for e in jev]
        td = next(e for e in tev if e["event"] == "message.dispatch")
        assert td["message_type"] == WEIRD_TYPE.decode() and td["message_id"] == QUOTY_ID.decode()
    finally:
        if json_sc is not None:
            check_clean_exit(json_sc)
        stop_checked(text_sc, text=True)
        fake.stop()
