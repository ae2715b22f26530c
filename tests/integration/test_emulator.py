"""The Fleet emulator against itself, without a proxy: proves the emulator
(and the protos) before other suites use it to judge flower-sidecar.

    make proto-py && /usr/bin/python3 -m pytest -q tests/integration/test_emulator.py
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import fleet_emulator as emu  # noqa: E402
import procs  # noqa: E402

PY = "/usr/bin/python3"
EMULATOR = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
HOST = "127.0.0.1"
RUN_TIMEOUT = 30  # seconds for a whole federation; each finishes in a few
FAST_NODE = ["--poll-interval", "0.1", "--max-retry-wait", "0.2"]


@pytest.fixture(scope="session", autouse=True)
def protos():
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True)
    emu.load_protos()


@pytest.fixture
def group(tmp_path):
    g = procs.ProcGroup(tmp_path)
    yield g
    g.stop_all()


def start_link(group, tmp_path, *extra, nodes=2, rounds=3):
    """A SuperLink on a free port; returns (proc, 'host:port', stats path)."""
    port = procs.free_port(HOST)
    stats = tmp_path / "superlink.json"
    proc = group.start("superlink", [
        PY, EMULATOR, "superlink", "--listen", f"{HOST}:{port}", "--nodes", str(nodes),
        "--rounds", str(rounds), "--array-bytes", "65536", "--stats-file", str(stats),
        "--exit-when-done", *extra])
    procs.wait_port(HOST, port, timeout=10, proc=proc)
    return proc, f"{HOST}:{port}", stats


def start_node(group, tmp_path, name, upstream, *extra, rounds=3):
    """A SuperNode; returns (proc, summary path).  h2c unless extra says TLS."""
    summary = tmp_path / f"{name}.json"
    security = [] if "--root-cert" in extra else ["--insecure"]
    proc = group.start(name, [
        PY, EMULATOR, "supernode", "--upstream", upstream, *security, *FAST_NODE,
        "--rounds", str(rounds), "--summary-file", str(summary), *extra])
    return proc, summary


def wait_all(group, *ps, timeout=RUN_TIMEOUT):
    """Exit codes of ps, all waited for within one time budget."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in ps:
        try:
            codes.append(procs.wait_exit(p, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            pytest.fail(f"process {p.pid} did not finish in {timeout} s\n{group.logs()}")
    return codes


def load(path):
    with open(path) as f:
        return json.load(f)


def assert_clean_federation(group, stats, summaries, rounds, nodes):
    """What every proxy-free run must show: all rounds, each side-effecting
    call once per message, both sides agreeing on who did what."""
    logs = group.logs()
    assert stats["done"], logs
    assert stats["rounds_completed"] == {"train": rounds, "evaluate": rounds}, logs
    assert [(r["round"], r["message_type"]) for r in stats["rounds"]] == \
        [(r, t) for r in range(1, rounds + 1) for t in ("train", "evaluate")]
    for r in stats["rounds"]:
        assert (r["dispatched"], r["replies"], r["missing"]) == (nodes, nodes, 0), r

    instruction_ids = {i["message_id"] for s in summaries for i in s["instructions"]}
    reply_ids = {i["reply_id"] for s in summaries for i in s["instructions"]}
    assert len(instruction_ids) == len(reply_ids) == 2 * rounds * nodes
    # Exactly once, and exactly the messages the nodes saw and sent.
    for key, ids in (("dispatch_by_message_id", instruction_ids),
                     ("confirm_by_message_id", instruction_ids),
                     ("push_messages_by_message_id", reply_ids)):
        assert stats[key] == {i: 1 for i in ids}, key
    assert set(stats["push_object_by_object_id"].values()) == {1}
    assert stats["calls"]["PushMessages"] == len(reply_ids)
    assert stats["replies_total"] == len(reply_ids)

    node_ids = sorted(s["node_id"] for s in summaries)
    for event in ("registered", "activated", "deactivated", "unregistered"):
        assert sorted(stats["nodes"][event]) == node_ids, event
    assert stats["nodes"]["offline"] == []
    assert all(int(n) > 2**53 for n in node_ids)
    assert int(stats["run_id"]) > 2**53
    for key in ("auth_failures", "integrity_errors", "late_replies", "conflicting_replies",
                "injected_failures", "handler_crashes", "driver_crashed"):
        assert stats[key] == 0, key

    for s in summaries:
        assert s["exit_reason"] == "done" and s["fatal"] is None, s
        assert s["replies"] == 2 * rounds
        assert s["errors_by_status"] == {} and s["retries"] == 0
        assert sorted(i["round"] for i in s["instructions"]) == \
            sorted(list(range(1, rounds + 1)) * 2)
        assert s["calls"]["RegisterNode"] == s["calls"]["UnregisterNode"] == 1
        assert s["calls"]["GetRun"] == s["calls"]["GetFab"] == 1  # one run


def run_federation(group, tmp_path, link_extra=(), node_extra=((), ()), rounds=3):
    link, addr, stats_path = start_link(group, tmp_path, *link_extra, nodes=len(node_extra),
                                        rounds=rounds)
    nodes = [start_node(group, tmp_path, f"node{i}", addr, *extra, rounds=rounds)
             for i, extra in enumerate(node_extra)]
    codes = wait_all(group, *(p for p, _ in nodes), link)
    return codes, load(stats_path), [load(s) for _, s in nodes]


# ------------------------------------------------------------------ tests


def test_federation_h2c(group, tmp_path):
    codes, stats, summaries = run_federation(group, tmp_path)
    assert codes == [0, 0, 0], group.logs()
    assert_clean_federation(group, stats, summaries, rounds=3, nodes=2)
    assert stats["error_replies_total"] == 0
    # The model went down and came back up, in chunks of objects.
    assert all(i["bytes_pulled"] > 65536 for s in summaries for i in s["instructions"])
    assert all(i["bytes_pushed"] > 65536 for s in summaries for i in s["instructions"]
               if i["message_type"] == "train")


@pytest.fixture
def tls_files(tmp_path):
    """Throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    d = tmp_path / "tls"
    d.mkdir()

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=fleet-emulator test CA")
    ssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")
    return d


def test_federation_tls(group, tmp_path, tls_files):
    ca = str(tls_files / "ca.pem")
    codes, stats, summaries = run_federation(
        group, tmp_path,
        link_extra=("--tls-cert", str(tls_files / "server.pem"),
                    "--tls-key", str(tls_files / "server.key")),
        # One node checks the IP address it dials, the other a DNS name.
        node_extra=(("--root-cert", ca), ("--root-cert", ca, "--server-name", "localhost")))
    assert codes == [0, 0, 0], group.logs()
    assert_clean_federation(group, stats, summaries, rounds=3, nodes=2)


def test_tls_wrong_ca_gives_up_like_flower_126(group, tmp_path, tls_files):
    """A node that cannot verify the server gets UNAVAILABLE "... handshake
    failed ...": Flower 1.26 gives up at once, 1.25 retries.  Nothing
    reaches the SuperLink either way."""
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", "k.pem", "-out", "ca.pem",
                    "-days", "1", "-subj", "/CN=other CA"], cwd=other, check=True,
                   capture_output=True)
    link, addr, stats_path = start_link(group, tmp_path, "--tls-cert",
                                        str(tls_files / "server.pem"), "--tls-key",
                                        str(tls_files / "server.key"), nodes=1)
    wrong_ca = ("--root-cert", str(other / "ca.pem"))
    n126, sum126 = start_node(group, tmp_path, "node126", addr, *wrong_ca)
    n125, sum125 = start_node(group, tmp_path, "node125", addr, *wrong_ca,
                              "--retry-handshake-failure", "--max-retries", "2")
    assert wait_all(group, n126, n125) == [1, 1], group.logs()
    for path, retries in ((sum126, {}), (sum125, {"RegisterNode": 2})):
        s = load(path)
        assert s["exit_reason"] == "fatal", s
        assert "UNAVAILABLE" in s["fatal"] and "handshake failed" in s["fatal"], s
        assert s["retries_by_method"] == retries
    procs.stop(link)
    assert load(stats_path)["calls"] == {}


def test_error_replies_are_counted(group, tmp_path):
    rounds = 2
    codes, stats, summaries = run_federation(group, tmp_path, node_extra=((), ("--error-reply",)),
                                             rounds=rounds)
    assert codes == [0, 0, 0], group.logs()
    assert stats["rounds_completed"] == {"train": rounds, "evaluate": rounds}
    for r in stats["rounds"]:
        assert r["replies"] == 2
        assert r["error_replies"] == (1 if r["message_type"] == "train" else 0), r
    assert stats["error_replies_total"] == rounds
    assert [s["error_replies"] for s in summaries] == [0, rounds]
    assert set(stats["push_messages_by_message_id"].values()) == {1}


def test_vanished_node_is_detected(group, tmp_path):
    link, addr, stats_path = start_link(group, tmp_path, nodes=2, rounds=3)
    steady, steady_sum = start_node(group, tmp_path, "steady", addr)
    # Short heartbeat interval: the SuperLink gives up on it after 2 s.
    gone, gone_sum = start_node(group, tmp_path, "gone", addr, "--vanish-after", "2",
                                "--heartbeat-interval", "1")
    assert wait_all(group, steady, gone, link) == [0, 0, 0], group.logs()
    stats, s_ok, s_gone = load(stats_path), load(steady_sum), load(gone_sum)

    assert s_gone["exit_reason"] == "vanished" and s_gone["replies"] == 2
    assert s_ok["exit_reason"] == "done" and s_ok["replies"] == 6
    gone_id = s_gone["node_id"]
    assert stats["nodes"]["offline"] == [gone_id]
    assert gone_id not in stats["nodes"]["deactivated"]
    assert gone_id not in stats["nodes"]["unregistered"]
    assert stats["done"] and stats["rounds_completed"] == {"train": 3, "evaluate": 3}
    # Exactly one phase waited for it in vain; afterwards it got nothing.
    missed = [r for r in stats["rounds"] if r["missing"]]
    assert len(missed) == 1 and missed[0]["missing_nodes"] == [gone_id], stats["rounds"]
    later = stats["rounds"][stats["rounds"].index(missed[0]) + 1:]
    assert later and all(r["dispatched"] == 1 and r["replies"] == 1 for r in later)
    assert set(stats["push_messages_by_message_id"].values()) == {1}


def test_unavailable_is_retried(group, tmp_path):
    codes, stats, summaries = run_federation(
        group, tmp_path, link_extra=("--fail-method", "PushMessages:UNAVAILABLE:1"),
        node_extra=((),), rounds=1)
    assert codes == [0, 0], group.logs()
    (s,) = summaries
    assert s["exit_reason"] == "done" and s["replies"] == 2
    assert s["retries_by_method"] == {"PushMessages": 1}
    assert s["errors_by_status"] == {"UNAVAILABLE": 1}
    assert stats["injected_failures"] == 1
    assert stats["calls"]["PushMessages"] == 3  # 2 replies + the refused attempt
    assert set(stats["push_messages_by_message_id"].values()) == {1}


def test_other_status_is_fatal(group, tmp_path):
    link, addr, stats_path = start_link(group, tmp_path, "--fail-method", "GetRun:INTERNAL:0",
                                        nodes=1, rounds=1)
    node, summary = start_node(group, tmp_path, "node", addr, rounds=1)
    assert wait_all(group, node) == [1]
    s = load(summary)
    assert s["exit_reason"] == "fatal"
    assert "GetRun" in s["fatal"] and "INTERNAL" in s["fatal"]
    assert s["retries"] == 0 and s["calls"]["GetRun"] == 1
    assert "fatal: GetRun failed: INTERNAL" in procs.tail(group.log_path("node"))


def test_authentication_is_checked(group, tmp_path):
    """Flower's three headers: stale, future, badly signed or missing ones
    are UNAUTHENTICATED; a node cannot speak for another node id."""
    link, addr, stats_path = start_link(group, tmp_path, nodes=1)
    pb = emu.pb
    key = emu.NodeKey()
    now = dt.datetime.now(dt.timezone.utc)
    with grpc.insecure_channel(addr) as ch:
        def call(method, req, md):
            resp_cls = getattr(pb, emu.METHODS[method][1])
            stub = ch.unary_unary(f"/flwr.proto.Fleet/{method}",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=resp_cls.FromString)
            return stub(req, metadata=md, timeout=5)

        register = pb.RegisterNodeFleetRequest(public_key=key.public_pem)
        bad = [
            (key.metadata(now - dt.timedelta(seconds=301)), "Invalid timestamp"),
            (key.metadata(now + dt.timedelta(seconds=60)), "Invalid timestamp"),
            (key.metadata(sign_with=emu.NodeKey().private), "Invalid signature"),
            (key.metadata()[:2], "Public key, signature, or timestamp not provided"),
        ]
        for md, message in bad:
            with pytest.raises(grpc.RpcError) as e:
                call("RegisterNode", register, md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details() == message
        # Slightly old is fine: the window is 300 s.
        node_id = call("RegisterNode", register,
                       key.metadata(now - dt.timedelta(seconds=200))).node_id
        assert node_id > 2**53
        with pytest.raises(grpc.RpcError) as e:
            call("PullMessages", pb.PullMessagesRequest(node=pb.Node(node_id=node_id ^ 1)),
                 key.metadata())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # And a stranger's key is not a node at all.
        with pytest.raises(grpc.RpcError) as e:
            call("PullMessages", pb.PullMessagesRequest(node=pb.Node(node_id=node_id)),
                 emu.NodeKey().metadata())
        assert e.value.details() == "Public key not recognized"

    assert procs.stop(link) == 0  # SIGTERM: stats written, clean exit
    stats = load(stats_path)
    assert stats["auth_failures"] == 6
    assert stats["auth_failures_by_reason"] == {
        "Invalid timestamp": 2, "Invalid signature": 1,
        "Public key, signature, or timestamp not provided": 1, "Invalid node ID": 1,
        "Public key not recognized": 1}
    assert stats["nodes"]["registered"] == [str(node_id)]
    assert stats["calls"] == {"RegisterNode": 5, "PullMessages": 2}
    assert not stats["done"]


def test_big_model_travels_in_chunks(group, tmp_path):
    """Models above 5 MiB are split into several ArrayChunk objects."""
    array_bytes = 2 * emu.MAX_CHUNK + 4096
    n_floats = (array_bytes - 128) // 4  # how the SuperLink sizes its model
    npy_len = len(emu.npy(n_floats, b"")) + 4 * n_floats
    chunks = -(-npy_len // emu.MAX_CHUNK)
    assert chunks == 3
    link, addr, stats_path = start_link(group, tmp_path, "--array-bytes", str(array_bytes),
                                        nodes=1, rounds=1)
    node, summary = start_node(group, tmp_path, "node", addr, rounds=1)
    assert wait_all(group, node, link) == [0, 0], group.logs()
    s, stats = load(summary), load(stats_path)
    # Message, RecordDict, ArrayRecord, Array, ConfigRecord + the chunks.
    assert [i["objects"] for i in s["instructions"]] == [5 + chunks] * 2
    assert all(i["bytes_pulled"] > npy_len for i in s["instructions"])
    train = [i for i in s["instructions"] if i["message_type"] == "train"]
    assert train[0]["bytes_pushed"] > npy_len
    assert stats["rounds_completed"] == {"train": 1, "evaluate": 1}
    assert set(stats["pull_object_by_object_id"].values()) <= {1, 2}


def test_sigterm_node_says_goodbye(group, tmp_path):
    """SIGTERM: DeactivateNode then UnregisterNode, exit 0 (Flower's way)."""
    link, addr, stats_path = start_link(group, tmp_path, nodes=1, rounds=1000)
    node, summary = start_node(group, tmp_path, "node", addr, rounds=1000)
    deadline = time.monotonic() + 10
    while True:  # let it work through a few rounds first
        try:
            if load(stats_path)["rounds_completed"]["evaluate"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, group.logs()
        time.sleep(0.1)
    assert procs.stop(node, timeout=10) == 0, group.logs()
    assert procs.stop(link) == 0
    s, stats = load(summary), load(stats_path)
    assert s["exit_reason"] == "signal" and s["fatal"] is None
    assert stats["nodes"]["deactivated"] == stats["nodes"]["unregistered"] == [s["node_id"]]
    assert not stats["done"]
