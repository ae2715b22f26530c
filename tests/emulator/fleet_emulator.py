#!/usr/bin/python3
"""Flower Fleet API emulator: a SuperLink or a SuperNode, without Flower.

    /usr/bin/python3 tests/emulator/fleet_emulator.py superlink [flags]
    /usr/bin/python3 tests/emulator/fleet_emulator.py supernode [flags]

Both speak flwr.proto.Fleet over gRPC the way Flower 1.25/1.26 does (see
shared/fleet-api.md): node authentication metadata on every call, model
data as content-addressed objects (PushObject/PullObject), at most one
message per PullMessages.  They count everything they see so that tests
can tell whether a proxy in between dropped, duplicated or altered a call.
`--help` on each mode lists its flags; the report files are described in
SuperLink.snapshot() and SuperNode.summary().

Generated protobuf modules come from build/py (`make proto-py`); they are
built on demand when missing or older than proto/fleet.proto.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[2]
PYGEN = ROOT / "build" / "py"

pb = None  # the fleet_pb2 module, set by load_protos()


def load_protos():
    """Import build/py/fleet_pb2, running `make proto-py` first if it is stale.

    Several emulators usually start at once; a lock file keeps them from
    running protoc over each other's output.
    """
    global pb
    if pb is not None:
        return pb
    target, source = PYGEN / "fleet_pb2.py", ROOT / "proto" / "fleet.proto"

    def stale():
        return not target.exists() or (source.exists() and
                                       target.stat().st_mtime < source.stat().st_mtime)

    if stale():
        (ROOT / "build").mkdir(exist_ok=True)
        with open(ROOT / "build" / ".proto-py.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if stale():
                r = subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if r.returncode != 0 or not target.exists():
                    raise RuntimeError(f"{target} is missing and `make proto-py` failed "
                                       f"(exit {r.returncode}):\n{r.stdout}")
    sys.path.insert(0, str(PYGEN))
    import fleet_pb2  # noqa: E402  (generated)
    pb = fleet_pb2
    return pb


# ------------------------------------------------------------------ constants

SERVICE = "flwr.proto.Fleet"
# method -> (request, response) message names in fleet.proto
METHODS = {
    "RegisterNode": ("RegisterNodeFleetRequest", "RegisterNodeFleetResponse"),
    "ActivateNode": ("ActivateNodeRequest", "ActivateNodeResponse"),
    "DeactivateNode": ("DeactivateNodeRequest", "DeactivateNodeResponse"),
    "UnregisterNode": ("UnregisterNodeFleetRequest", "UnregisterNodeFleetResponse"),
    "SendNodeHeartbeat": ("SendNodeHeartbeatRequest", "SendNodeHeartbeatResponse"),
    "PullMessages": ("PullMessagesRequest", "PullMessagesResponse"),
    "PushMessages": ("PushMessagesRequest", "PushMessagesResponse"),
    "GetRun": ("GetRunRequest", "GetRunResponse"),
    "GetFab": ("GetFabRequest", "GetFabResponse"),
    "PushObject": ("PushObjectRequest", "PushObjectResponse"),
    "PullObject": ("PullObjectRequest", "PullObjectResponse"),
    "ConfirmMessageReceived": ("ConfirmMessageReceivedRequest", "ConfirmMessageReceivedResponse"),
}

MAX_MESSAGE_LENGTH = 2_147_483_647  # Flower sets this on both sides
SUPERLINK_NODE_ID = 1                # Flower's src_node_id for instructions
MAX_CHUNK = 5 * 1024 * 1024          # Flower's ArrayChunk limit
MESSAGE_TTL = 43200.0                # Flower's default TTL, seconds
RECONNECT_S = 5                      # what the real SuperLink puts in Reconnect
TIMESTAMP_MAX_AGE = 300.0            # SuperLink's auth window, seconds
TIMESTAMP_MAX_SKEW = 5.0
HEARTBEAT_DEADLINE = 5.0             # the only call with a grpc-timeout
CLIENTAPP_RAISED_EXCEPTION = 2       # Flower's error code for a failing ClientApp
AUTH_KEYS = ("flwr-public-key-bin", "flwr-timestamp", "flwr-signature-bin")

STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def log(role: str, msg: str) -> None:
    ts = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    print(f"{ts} {role}: {msg}", file=sys.stderr, flush=True)


def write_json_atomic(path: str, data: dict) -> None:
    """Readers polling the file never see half a document."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def random_id64(taken) -> int:
    """A fresh 64-bit id with the top bit set: above 2^53 (JSON doubles lose
    it) and above 2^63 (a signed int64 in C turns it negative)."""
    while True:
        v = random.randrange(2**63, 2**64)
        if v not in taken:
            return v


# -------------------------------------------------------------------- objects
#
# An object is b"<Type> <child-id,child-id,...> <body-length>" 0x00 <body>;
# its id is the SHA-256 hex digest of all of it.


def make_object(type_name: str, body: bytes, children=()) -> tuple[str, bytes]:
    head = f"{type_name} {','.join(children)} {len(body)}".encode()
    content = head + b"\x00" + body
    return hashlib.sha256(content).hexdigest(), content


def parse_object(content: bytes) -> tuple[str, list[str], bytes]:
    """(type, children, body); ValueError on anything malformed."""
    head, sep, body = content.partition(b"\x00")
    if not sep:
        raise ValueError("object without head/body divider")
    parts = head.decode("utf-8").split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad object head {head[:80]!r}")
    type_name, children, length = parts
    if int(length) != len(body):
        raise ValueError(f"{type_name} object says {length} body bytes, has {len(body)}")
    return type_name, (children.split(",") if children else []), body


class ObjectSet:
    """Objects being built for one message, plus the tree they form."""

    def __init__(self):
        self.contents: dict[str, bytes] = {}
        self.children: dict[str, list[str]] = {}

    def add(self, type_name: str, body: bytes, children=()) -> str:
        oid, content = make_object(type_name, body, children)
        self.contents[oid] = content
        self.children[oid] = list(children)
        return oid

    def tree(self, root: str):
        return pb.ObjectTree(object_id=root,
                             children=[self.tree(c) for c in self.children[root]])


def tree_ids(tree) -> list[str]:
    """Object ids of a tree, parents first, each once."""
    out, seen, stack = [], set(), [tree]
    while stack:
        t = stack.pop()
        if t.object_id not in seen:
            seen.add(t.object_id)
            out.append(t.object_id)
        stack.extend(reversed(t.children))
    return out


def tree_nodes(tree):
    yield tree
    for c in tree.children:
        yield from tree_nodes(c)


def message_body(msg) -> bytes:
    """Body of a Message object: the protobuf without content and without its
    own message_id (which is the object's id)."""
    m = pb.Message()
    m.CopyFrom(msg)
    m.metadata.message_id = ""
    m.ClearField("content")
    return m.SerializeToString(deterministic=True)


def message_object(msg, children: list[str]) -> tuple[str, bytes]:
    """(id, content) of the Message object of a wire Message."""
    return make_object("Message", message_body(msg), children)


def npy(n_floats: int, data: bytes) -> bytes:
    """A .npy v1.0 file of a 1-D float32 array: what an ArrayChunk carries."""
    desc = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % n_floats
    pad = (64 - (10 + len(desc) + 1) % 64) % 64
    header = (desc + " " * pad + "\n").encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def add_array(objs: ObjectSet, n_floats: int, rng: random.Random) -> str:
    """Array object (JSON) over ArrayChunk objects of at most 5 MiB."""
    data = npy(n_floats, rng.randbytes(4 * n_floats))
    chunk_ids = [objs.add("ArrayChunk", data[i:i + MAX_CHUNK])
                 for i in range(0, len(data), MAX_CHUNK)]
    unique = list(dict.fromkeys(chunk_ids))
    body = json.dumps({"dtype": "float32", "shape": [n_floats], "stype": "numpy.ndarray",
                       "arraychunk_ids": chunk_ids}).encode()
    return objs.add("Array", body, unique)


def config_record_body(values: dict) -> bytes:
    items = []
    for k, v in values.items():
        if isinstance(v, bool):
            val = pb.ConfigRecordValue(bool=v)
        elif isinstance(v, int):
            val = pb.ConfigRecordValue(sint64=v)
        elif isinstance(v, float):
            val = pb.ConfigRecordValue(double=v)
        else:
            val = pb.ConfigRecordValue(string=str(v))
        items.append(pb.ConfigRecord.Item(key=k, value=val))
    return pb.ConfigRecord(items=items).SerializeToString(deterministic=True)


def metric_record_body(values: dict) -> bytes:
    """A MetricRecord as Flower writes it: ints as sint64, floats as double,
    lists of floats as DoubleList."""
    def value(v):
        if isinstance(v, list):
            return pb.MetricRecordValue(double_list=pb.DoubleList(vals=v))
        if isinstance(v, int):
            return pb.MetricRecordValue(sint64=v)
        return pb.MetricRecordValue(double=v)
    items = [pb.MetricRecord.Item(key=k, value=value(v)) for k, v in values.items()]
    return pb.MetricRecord(items=items).SerializeToString(deterministic=True)


def parse_config_record(body: bytes) -> dict:
    rec = pb.ConfigRecord.FromString(body)
    return {it.key: getattr(it.value, it.value.WhichOneof("value"))
            for it in rec.items if it.value.WhichOneof("value")}


# ----------------------------------------------------------------------- auth


class NodeKey:
    """A SuperNode's P-384 key and Flower's three authentication headers."""

    def __init__(self):
        self.private = ec.generate_private_key(ec.SECP384R1())
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def metadata(self, now: Optional[dt.datetime] = None, sign_with=None):
        """Fresh headers for one call attempt.  `now` and `sign_with` let
        tests forge stale or badly signed ones."""
        ts = (now or dt.datetime.now(dt.timezone.utc)).isoformat()
        sig = (sign_with or self.private).sign(ts.encode(), ec.ECDSA(hashes.SHA256()))
        return [("flwr-public-key-bin", self.public_pem), ("flwr-timestamp", ts),
                ("flwr-signature-bin", sig)]


class AuthError(Exception):
    pass


def verify_auth_metadata(metadata) -> bytes:
    """Check a call's authentication headers as the SuperLink does; return
    the public key PEM or raise AuthError(message for UNAUTHENTICATED)."""
    md = {}
    for k, v in metadata:
        if k in AUTH_KEYS:
            md[k] = v
    if len(md) != 3:
        raise AuthError("Public key, signature, or timestamp not provided")
    pem, ts, sig = (md["flwr-public-key-bin"], md["flwr-timestamp"], md["flwr-signature-bin"])
    if isinstance(ts, bytes):
        ts = ts.decode("utf-8", "replace")
    try:
        when = dt.datetime.fromisoformat(ts)
        if when.tzinfo is None:
            raise ValueError("no UTC offset")
    except ValueError:
        raise AuthError("Invalid timestamp") from None
    age = (dt.datetime.now(dt.timezone.utc) - when).total_seconds()
    if age > TIMESTAMP_MAX_AGE or age < -TIMESTAMP_MAX_SKEW:
        raise AuthError("Invalid timestamp")
    try:
        key = serialization.load_pem_public_key(bytes(pem))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an EC key")
        key.verify(bytes(sig), ts.encode(), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError("Invalid signature") from None
    return bytes(pem)


# ================================================================= SuperLink


@dataclass
class LinkNode:
    node_id: int
    public_key: bytes
    state: str = "registered"  # registered | active | inactive | unregistered
    heartbeat_interval: float = 30.0
    last_seen: float = field(default_factory=time.monotonic)
    offline: bool = False

    @property
    def online(self) -> bool:
        return self.state == "active" and not self.offline


@dataclass
class Instruction:
    message: object  # pb.Message as sent in PullMessages
    tree: object     # pb.ObjectTree
    object_ids: list
    node_id: int
    round: int
    message_type: str
    phase: "Phase"
    delivered: bool = False
    confirmed: bool = False
    reply_id: Optional[str] = None
    reply_complete: bool = False


@dataclass
class Reply:
    message_id: str
    instruction: Instruction
    tree: object
    error: bool
    pending: set
    late: bool


@dataclass
class Phase:
    round: int
    message_type: str
    started: float
    dispatched: dict = field(default_factory=dict)  # node_id -> Instruction
    replies: int = 0
    error_replies: int = 0
    ended: bool = False


class FailureInjector:
    """--fail-method NAME:CODE[:COUNT]: fail the first COUNT calls (0 = every
    call) of a method with a status, before any side effect."""

    def __init__(self, specs):
        self.rules = {}
        for spec in specs or ():
            parts = spec.split(":")
            if len(parts) not in (2, 3) or parts[0] not in METHODS:
                raise ValueError(f"--fail-method {spec!r}: want METHOD:CODE[:COUNT] "
                                 f"with METHOD one of {', '.join(METHODS)}")
            code = (STATUS_BY_NUMBER.get(int(parts[1])) if parts[1].isdigit()
                    else grpc.StatusCode.__members__.get(parts[1].upper()))
            if code is None or code == grpc.StatusCode.OK:
                raise ValueError(f"--fail-method {spec!r}: bad status code {parts[1]!r}")
            count = int(parts[2]) if len(parts) == 3 else 1
            self.rules[parts[0]] = [code, count]

    def check(self, method: str) -> Optional[grpc.StatusCode]:
        rule = self.rules.get(method)
        if rule is None:
            return None
        code, left = rule
        if left == 0:
            return code
        if left > 0:
            rule[1] = left - 1
            if left - 1 == 0:
                del self.rules[method]
            return code
        return None


class Abort(Exception):
    """A handler's non-OK answer; raised under the state lock, turned into
    context.abort() outside it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SuperLink:
    ROLE = "superlink"

    def __init__(self, args):
        self.args = args
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stop_event = threading.Event()
        self.injector = FailureInjector(args.fail_method)

        self.nodes: dict[int, LinkNode] = {}
        self.nodes_by_key: dict[bytes, LinkNode] = {}
        self.instructions: dict[str, Instruction] = {}
        self.pending_by_node: dict[int, list] = defaultdict(list)
        self.replies: dict[str, Reply] = {}
        # Instruction objects, refcounted because the same model objects go
        # to every node and ConfirmMessageReceived deletes one message's.
        self.objects: dict[str, bytes] = {}
        self.refs: dict[str, int] = defaultdict(int)
        # Reply objects: expected id -> reply ids waiting for it; heads of
        # received ones for the tree check; ids already received.
        self.expected: dict[str, set] = defaultdict(set)
        self.reply_heads: dict[str, tuple] = {}
        self.received: dict[str, bytes] = {}

        self.run_id = random_id64(())
        self.fab_content = self._make_fab()
        self.fab_hash = hashlib.sha256(self.fab_content).hexdigest()
        self.done = False
        self.started = time.time()
        self.listen = args.listen

        # Counters for the stats file.
        self.calls = defaultdict(int)
        self.statuses = defaultdict(lambda: defaultdict(int))
        self.by_id = {k: defaultdict(int) for k in (
            "push_messages_by_message_id", "confirm_by_message_id",
            "dispatch_by_message_id", "push_object_by_object_id", "pull_object_by_object_id")}
        self.node_events = {k: [] for k in (
            "registered", "activated", "deactivated", "unregistered", "offline", "back_online")}
        self.rounds: list[dict] = []
        self.rounds_completed = {"train": 0, "evaluate": 0}
        self.counters = defaultdict(int)
        self.auth_failures_by_reason = defaultdict(int)
        self.dirty = True
        self.replies_completed = 0  # for --slow-push-answer

    # ------------------------------------------------------------ plumbing

    @staticmethod
    def _make_fab() -> bytes:
        """A small but real FAB (a zip), so GetFab moves a plausible body."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("pyproject.toml", '[project]\nname = "emulator-app"\nversion = "1.0.0"\n'
                       '[tool.flwr.app]\npublisher = "flwrlabs"\n')
            z.writestr("emulator_app/__init__.py", "# emulated Flower app\n" * 64)
        return buf.getvalue()

    def handler(self):
        def make(name):
            req_cls = getattr(pb, METHODS[name][0])
            resp_name = METHODS[name][1]

            def deserialize(b):
                with self.lock:
                    self.counters["bytes_in"] += len(b)
                return req_cls.FromString(b)

            def serialize(m):
                b = m.SerializeToString()
                with self.lock:
                    self.counters["bytes_out"] += len(b)
                return b

            impl = getattr(self, f"_{name}")

            def unary(req, context):
                try:
                    with self.lock:
                        self.calls[name] += 1
                        self.dirty = True
                        code = self.injector.check(name)
                        if code is not None:
                            self.counters["injected_failures"] += 1
                            raise Abort(code, f"fleet-emulator: injected {code.name} for {name}")
                        node = self._authenticate(name, req, context)
                        completed = self.replies_completed
                        resp = impl(req, node)
                        assert type(resp).__name__ == resp_name
                        self.statuses[name]["OK"] += 1
                        late = self.replies_completed > completed and self.args.slow_push_answer
                    if late:  # the round has moved on already; the answer comes later
                        time.sleep(late)
                    return resp
                except Abort as a:
                    with self.lock:
                        self.statuses[name][a.code.name] += 1
                    context.abort(a.code, a.message)
                except Exception as e:  # an emulator bug: make it loud
                    with self.lock:
                        self.statuses[name]["UNKNOWN"] += 1
                        self.counters["handler_crashes"] += 1
                    log(self.ROLE, f"{name} handler crashed: {e!r}")
                    raise

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserialize, response_serializer=serialize)

        return grpc.method_handlers_generic_handler(SERVICE, {n: make(n) for n in METHODS})

    def _authenticate(self, name, req, context) -> Optional[LinkNode]:
        """Flower's SuperLink interceptor: valid signed timestamp on every
        call; then the key must belong to a node (except RegisterNode), and
        a node id in the request must be that node's."""
        try:
            pem = verify_auth_metadata(context.invocation_metadata())
            node = self.nodes_by_key.get(pem)
            if name == "RegisterNode":
                if req.public_key != pem:
                    raise AuthError("Public key in request does not match metadata")
                return None
            if node is None:
                raise AuthError("Public key not recognized")
            if name == "ActivateNode" and req.public_key != pem:
                raise AuthError("Public key in request does not match metadata")
            claimed = (req.node_id if name in ("DeactivateNode", "UnregisterNode")
                       else req.node.node_id if hasattr(req, "node") else node.node_id)
            if claimed != node.node_id:
                raise AuthError("Invalid node ID")
        except AuthError as e:
            self.counters["auth_failures"] += 1
            self.auth_failures_by_reason[str(e)] += 1
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        self._seen(node)
        return node

    def _seen(self, node: LinkNode) -> None:
        node.last_seen = time.monotonic()
        if node.offline and node.state == "active":
            node.offline = False
            self.node_events["back_online"].append(str(node.node_id))
            log(self.ROLE, f"node {node.node_id} back online")

    def check_offline(self) -> None:
        """A node is offline after 2 x its heartbeat interval without a call."""
        now = time.monotonic()
        with self.lock:
            for node in self.nodes.values():
                if node.online and now - node.last_seen > 2 * node.heartbeat_interval:
                    node.offline = True
                    self.node_events["offline"].append(str(node.node_id))
                    self.dirty = True
                    log(self.ROLE, f"node {node.node_id} offline (silent for "
                                   f"{now - node.last_seen:.1f} s)")
                    self.cond.notify_all()

    def _check_run(self, run_id: int) -> None:
        if run_id != self.run_id:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"Run {run_id} not found")

    # ----------------------------------------------------- node life cycle

    def _RegisterNode(self, req, node):
        if req.public_key in self.nodes_by_key:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, "Public key already in use")
        n = LinkNode(node_id=random_id64(self.nodes), public_key=req.public_key)
        self.nodes[n.node_id] = n
        self.nodes_by_key[n.public_key] = n
        self.node_events["registered"].append(str(n.node_id))
        log(self.ROLE, f"node {n.node_id} registered")
        return pb.RegisterNodeFleetResponse(node_id=n.node_id)

    def _ActivateNode(self, req, node):
        if req.heartbeat_interval <= 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "heartbeat_interval must be > 0")
        node.state, node.offline = "active", False
        node.heartbeat_interval = req.heartbeat_interval
        self.node_events["activated"].append(str(node.node_id))
        log(self.ROLE, f"node {node.node_id} activated (heartbeat {req.heartbeat_interval:g} s)")
        self.cond.notify_all()
        return pb.ActivateNodeResponse(node_id=node.node_id)

    def _DeactivateNode(self, req, node):
        node.state = "inactive"
        self.node_events["deactivated"].append(str(node.node_id))
        log(self.ROLE, f"node {node.node_id} deactivated")
        self.cond.notify_all()
        return pb.DeactivateNodeResponse()

    def _UnregisterNode(self, req, node):
        node.state = "unregistered"
        del self.nodes_by_key[node.public_key]
        self.node_events["unregistered"].append(str(node.node_id))
        log(self.ROLE, f"node {node.node_id} unregistered")
        self.cond.notify_all()
        return pb.UnregisterNodeFleetResponse()

    def _SendNodeHeartbeat(self, req, node):
        if node.state != "active":
            return pb.SendNodeHeartbeatResponse(success=False)
        if req.heartbeat_interval > 0:
            node.heartbeat_interval = req.heartbeat_interval
        return pb.SendNodeHeartbeatResponse(success=True)

    # ------------------------------------------------------------- run, fab

    def _GetRun(self, req, node):
        self._check_run(req.run_id)
        started = dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat()
        run = pb.Run(run_id=self.run_id, fab_id="flwrlabs/emulator-app", fab_version="1.0.0",
                     fab_hash=self.fab_hash, pending_at=started, starting_at=started,
                     running_at=started, status=pb.RunStatus(status="running"),
                     federation="default")
        run.override_config["local-epochs"].sint64 = 1
        return pb.GetRunResponse(run=run)

    def _GetFab(self, req, node):
        self._check_run(req.run_id)
        if req.hash_str != self.fab_hash:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"FAB {req.hash_str!r} not found")
        return pb.GetFabResponse(fab=pb.Fab(hash_str=self.fab_hash, content=self.fab_content))

    # ------------------------------------------------------------- messages

    def _PullMessages(self, req, node):
        resp = pb.PullMessagesResponse(reconnect=pb.Reconnect(reconnect=RECONNECT_S))
        queue = self.pending_by_node[node.node_id]
        if node.state == "active" and queue:
            ins = queue.pop(0)
            ins.delivered = True
            mid = ins.message.metadata.message_id
            self.by_id["dispatch_by_message_id"][mid] += 1
            resp.messages_list.append(ins.message)
            resp.message_object_trees.append(ins.tree)
        return resp

    def _ConfirmMessageReceived(self, req, node):
        self._check_run(req.run_id)
        mid = req.message_object_id
        self.by_id["confirm_by_message_id"][mid] += 1
        ins = self.instructions.get(mid)
        if ins is None or ins.node_id != node.node_id:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"Message {mid} not found")
        if not ins.confirmed:
            ins.confirmed = True
            self._release(ins.object_ids)
        return pb.ConfirmMessageReceivedResponse()

    def _release(self, ids) -> None:
        for oid in ids:
            self.refs[oid] -= 1
            if self.refs[oid] <= 0:
                self.objects.pop(oid, None)
                del self.refs[oid]

    def _PushMessages(self, req, node):
        if len(req.messages_list) != len(req.message_object_trees):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "messages_list and message_object_trees differ in length")
        resp = pb.PushMessagesResponse(reconnect=pb.Reconnect(reconnect=RECONNECT_S))
        to_push = []
        for msg, tree in zip(req.messages_list, req.message_object_trees):
            md = msg.metadata
            self.by_id["push_messages_by_message_id"][md.message_id] += 1
            if md.src_node_id != node.node_id:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid source node ID")
            oid, _ = message_object(msg, [c.object_id for c in tree.children])
            if oid != md.message_id or oid != tree.object_id:
                self.counters["integrity_errors"] += 1
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "message_id does not match the message and its object tree")
            ins = self.instructions.get(md.reply_to_message_id)
            if ins is None or ins.node_id != node.node_id:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"Reply to unknown message {md.reply_to_message_id!r}")
            resp.results[md.message_id] = 0
            if ins.reply_id is not None:
                if ins.reply_id != md.message_id:
                    self.counters["conflicting_replies"] += 1
                    log(self.ROLE, f"second, different reply to {ins.message.metadata.message_id}")
                    continue
                reply = self.replies[md.message_id]  # a repeat: answer as before
            else:
                reply = self._new_reply(msg, tree, ins)
            to_push.extend(i for i in tree_ids(tree) if i in reply.pending)
        resp.objects_to_push.extend(dict.fromkeys(to_push))
        return resp

    def _new_reply(self, msg, tree, ins: Instruction) -> Reply:
        mid = msg.metadata.message_id
        ids = tree_ids(tree)
        pending = {i for i in ids if i not in self.received}
        late = ins.phase.ended
        reply = Reply(mid, ins, tree, msg.HasField("error"), pending, late)
        self.replies[mid] = reply
        ins.reply_id = mid
        for i in pending:
            self.expected[i].add(mid)
        self.counters["replies_total"] += 1
        if reply.error:
            self.counters["error_replies_total"] += 1
        if late:
            self.counters["late_replies"] += 1
        else:
            ins.phase.replies += 1
            ins.phase.error_replies += int(reply.error)
        if not pending:
            self._complete(reply)
        return reply

    def _complete(self, reply: Reply) -> None:
        """All objects of a reply are here: check the tree against the heads
        the objects declare, then let the round move on."""
        for t in tree_nodes(reply.tree):
            head = self.reply_heads.get(t.object_id)
            if head is None or head[1] != [c.object_id for c in t.children]:
                self.counters["integrity_errors"] += 1
                log(self.ROLE, f"reply {reply.message_id}: object {t.object_id} does not "
                               f"match its tree")
        reply.instruction.reply_complete = True
        self.replies_completed += 1
        self.cond.notify_all()

    # -------------------------------------------------------------- objects

    def _PushObject(self, req, node):
        self._check_run(req.run_id)
        oid = req.object_id
        self.by_id["push_object_by_object_id"][oid] += 1
        if hashlib.sha256(req.object_content).hexdigest() != oid:
            self.counters["integrity_errors"] += 1
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "object_id does not match object_content")
        if oid in self.received:
            return pb.PushObjectResponse(stored=True)  # content-addressed: nothing to do
        waiting = self.expected.pop(oid, None)
        if not waiting:
            return pb.PushObjectResponse(stored=False)  # nobody announced it
        try:
            type_name, children, body = parse_object(req.object_content)
        except ValueError as e:
            self.counters["integrity_errors"] += 1
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad object: {e}") from None
        self.reply_heads[oid] = (type_name, children)
        self.counters["object_bytes_received"] += len(req.object_content)
        # The "ServerApp" has no use for the bytes; keep only small objects so
        # that a long run with big models does not pile up memory.
        self.received[oid] = req.object_content if type_name != "ArrayChunk" else b""
        for mid in waiting:
            reply = self.replies[mid]
            reply.pending.discard(oid)
            if not reply.pending:
                self._complete(reply)
        return pb.PushObjectResponse(stored=True)

    def _PullObject(self, req, node):
        self._check_run(req.run_id)
        oid = req.object_id
        self.by_id["pull_object_by_object_id"][oid] += 1
        content = self.objects.get(oid)
        if content is not None:
            self.counters["object_bytes_sent"] += len(content)
            return pb.PullObjectResponse(object_found=True, object_available=True,
                                         object_content=content)
        if oid in self.expected:
            return pb.PullObjectResponse(object_found=True, object_available=False)
        return pb.PullObjectResponse(object_found=False, object_available=False)

    # --------------------------------------------------------------- rounds

    def _phase_content(self, rnd: int, mtype: str) -> tuple[ObjectSet, str]:
        """The RecordDict objects of one phase and the RecordDict's id: the
        same model for every node (as FedAvg sends), a new one each phase,
        and the round number in a ConfigRecord."""
        objs = ObjectSet()
        n_floats = max(1, (self.args.array_bytes - 128) // 4)
        array = add_array(objs, n_floats, random.Random(f"{self.run_id}/{rnd}/{mtype}"))
        arrays = objs.add("ArrayRecord", json.dumps({"model": array}).encode(), [array])
        config = objs.add("ConfigRecord", config_record_body({"server-round": rnd}))
        content = objs.add("RecordDict", json.dumps({"arrays": arrays, "config": config}).encode(),
                           [arrays, config])
        return objs, content

    def _instruction(self, node: LinkNode, phase: Phase, shared: ObjectSet,
                     content: str) -> Instruction:
        objs = ObjectSet()
        objs.contents.update(shared.contents)
        objs.children.update(shared.children)
        msg = pb.Message(metadata=pb.Metadata(
            run_id=self.run_id, src_node_id=SUPERLINK_NODE_ID, dst_node_id=node.node_id,
            group_id="", ttl=MESSAGE_TTL, message_type=phase.message_type,
            created_at=time.time()))
        mid = objs.add("Message", message_body(msg), [content])
        msg.metadata.message_id = mid
        msg.content.SetInParent()  # travels as the empty RecordDict, bytes 12 00
        for oid, c in objs.contents.items():
            self.objects[oid] = c
            self.refs[oid] += 1
        ins = Instruction(msg, objs.tree(mid), list(objs.contents), node.node_id, phase.round,
                          phase.message_type, phase)
        self.instructions[mid] = ins
        return ins

    def _wait(self, predicate) -> bool:
        """Wait under the lock for predicate(), checking liveness meanwhile;
        False when asked to stop."""
        while not predicate():
            if self.stop_event.is_set():
                return False
            self.cond.wait(0.1)
            self.check_offline()
        return True

    def drive(self) -> None:
        """The ServerApp: R rounds of train then evaluate over the online nodes."""
        try:
            self._drive()
        except Exception as e:  # a bug here must not leave tests waiting silently
            log(self.ROLE, f"driver crashed: {e!r}")
            self.counters["driver_crashed"] += 1
            raise

    def _drive(self) -> None:
        def online():
            return sum(n.online for n in self.nodes.values())

        log(self.ROLE, f"waiting for {self.args.nodes} node(s)")
        with self.cond:
            if not self._wait(lambda: online() >= self.args.nodes):
                return
        for rnd in range(1, self.args.rounds + 1):
            for mtype in ("train", "evaluate"):
                # Outside the lock: hashing a big model takes a while and
                # must not hold up the nodes' calls.
                shared, content = self._phase_content(rnd, mtype)
                with self.cond:
                    # Later phases go on with whoever is left, but need someone.
                    if not self._wait(lambda: online() >= 1):
                        return
                    phase = Phase(rnd, mtype, time.monotonic())
                    for node in self.nodes.values():
                        if node.online:
                            ins = self._instruction(node, phase, shared, content)
                            phase.dispatched[node.node_id] = ins
                            self.pending_by_node[node.node_id].append(ins)
                    log(self.ROLE, f"round {rnd} {mtype}: dispatched to {len(phase.dispatched)}")
                    self.dirty = True

                    def finished():
                        return all(ins.reply_complete or not self.nodes[nid].online
                                   for nid, ins in phase.dispatched.items())
                    if not self._wait(finished):
                        return
                    self._end_phase(phase)
        with self.lock:
            self.done = True
            self.dirty = True
        log(self.ROLE, "all rounds done")

    def _end_phase(self, phase: Phase) -> None:
        phase.ended = True
        missing = [nid for nid, ins in phase.dispatched.items() if not ins.reply_complete]
        for nid, ins in phase.dispatched.items():
            if not ins.delivered:  # never handed out: withdraw it
                self.pending_by_node[nid].remove(ins)
                self.counters["expired_instructions"] += 1
        ms = (time.monotonic() - phase.started) * 1000
        self.rounds.append({
            "round": phase.round, "message_type": phase.message_type,
            "dispatched": len(phase.dispatched), "replies": phase.replies,
            "error_replies": phase.error_replies, "missing": len(missing),
            "missing_nodes": [str(n) for n in missing], "duration_ms": round(ms, 1)})
        self.rounds_completed[phase.message_type] += 1
        self.dirty = True
        log(self.ROLE, f"round {phase.round} {phase.message_type}: done, {phase.replies} "
                       f"replies ({phase.error_replies} errors), {len(missing)} missing, {ms:.0f} ms")

    # ---------------------------------------------------------------- stats

    def snapshot(self) -> dict:
        """The --stats-file document.  Ids (node, run) are decimal strings.

        done              bool: every round of train and evaluate ended
        listen, run_id, rounds_requested, nodes_expected
        calls             {method: calls received, failed ones included}
        statuses          {method: {status name: count}}
        push_messages_by_message_id, confirm_by_message_id,
        dispatch_by_message_id (PullMessages hand-outs)
                          {message id: count}  -- 1 each in a clean run
        push_object_by_object_id, pull_object_by_object_id
                          {object id: count}
        rounds_completed  {"train": n, "evaluate": n}
        rounds            [{round, message_type, dispatched, replies,
                            error_replies, missing, missing_nodes, duration_ms}]
        nodes             {registered|activated|deactivated|unregistered|
                           offline|back_online: [node id, ...]}  (in order)
        auth_failures, auth_failures_by_reason {message: count}
        replies_total, error_replies_total, late_replies, conflicting_replies,
        integrity_errors, injected_failures, expired_instructions,
        driver_crashed, handler_crashes (emulator bugs: 0),
        bytes_in, bytes_out (serialized requests/responses),
        object_bytes_sent, object_bytes_received
        """
        with self.lock:
            c = self.counters
            return {
                "done": self.done, "listen": self.listen, "run_id": str(self.run_id),
                "rounds_requested": self.args.rounds, "nodes_expected": self.args.nodes,
                "calls": dict(self.calls),
                "statuses": {m: dict(s) for m, s in self.statuses.items()},
                **{k: dict(v) for k, v in self.by_id.items()},
                "rounds_completed": dict(self.rounds_completed),
                "rounds": list(self.rounds),
                "nodes": {k: list(v) for k, v in self.node_events.items()},
                "auth_failures": c["auth_failures"],
                "auth_failures_by_reason": dict(self.auth_failures_by_reason),
                **{k: c[k] for k in ("replies_total", "error_replies_total", "late_replies",
                                     "conflicting_replies", "integrity_errors",
                                     "injected_failures", "expired_instructions", "bytes_in",
                                     "bytes_out", "object_bytes_sent", "object_bytes_received",
                                     "driver_crashed", "handler_crashes")},
            }

    def write_stats(self) -> None:
        if self.args.stats_file:
            with self.lock:
                self.dirty = False
            write_json_atomic(self.args.stats_file, self.snapshot())

    def nodes_settled(self) -> bool:
        """Every node has left: unregistered, gone silent, or deactivated and
        quiet for a second (UnregisterNode follows DeactivateNode at once
        when it comes at all)."""
        now = time.monotonic()
        with self.lock:
            return all(n.state == "unregistered" or n.offline or
                       (n.state != "active" and now - n.last_seen > 1.0)
                       for n in self.nodes.values())


def run_superlink(args) -> int:
    link = SuperLink(args)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=32),
        handlers=[link.handler()],
        options=[
            # Flower's SuperLink options.
            ("grpc.max_concurrent_streams", 1000),
            ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
            ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
            ("grpc.keepalive_time_ms", 210_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # Not Flower's: gRPC's default SO_REUSEPORT would let two test
            # servers share a port silently; a clash must fail loudly.
            ("grpc.so_reuseport", 0),
        ])
    if args.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(),
                                              Path(args.tls_cert).read_bytes())])
        port = server.add_secure_port(args.listen, creds)
    else:
        port = server.add_insecure_port(args.listen)
    if not port:
        log(link.ROLE, f"cannot listen on {args.listen}")
        return 1
    link.listen = f"{args.listen.rpartition(':')[0]}:{port}"
    server.start()
    log(link.ROLE, f"listening on {link.listen} ({'TLS' if args.tls_cert else 'h2c'}), "
                   f"run {link.run_id}")

    def on_signal(signum, frame):
        link.stop_event.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    driver = threading.Thread(target=link.drive, name="driver", daemon=True)
    driver.start()
    done_at = None
    last_write = 0.0
    while not link.stop_event.wait(0.1):
        link.check_offline()
        now = time.monotonic()
        if link.dirty and now - last_write >= 0.5:
            link.write_stats()
            last_write = now
        if args.exit_when_done and link.done:
            # Give the nodes time to deactivate: exiting under them would
            # turn their goodbye calls into endless UNAVAILABLE retries.
            done_at = done_at or now
            if link.nodes_settled() or now - done_at > args.done_grace:
                break
    link.stop_event.set()
    with link.cond:
        link.cond.notify_all()
    link.write_stats()
    server.stop(grace=1).wait(2)
    log(link.ROLE, "stopped" + (" (done)" if link.done else ""))
    return 0


# ================================================================= SuperNode


class Fatal(Exception):
    pass


class SuperNode:
    ROLE = "supernode"

    def __init__(self, args):
        self.args = args
        self.key = NodeKey()
        self.node_id = 0
        self.stop_event = threading.Event()
        self.hb_stop = threading.Event()
        self.lock = threading.Lock()
        self.fatal: Optional[str] = None
        self.exit_reason = "running"
        self.runs: dict[int, object] = {}
        self.pool = ThreadPoolExecutor(max_workers=2)  # Flower: 2 object transfers at a time

        self.calls = defaultdict(int)
        self.statuses = defaultdict(lambda: defaultdict(int))
        self.retries = defaultdict(int)
        self.replies = 0
        self.error_replies = 0
        self.instructions: list[dict] = []
        self.counters = defaultdict(int)

        options = [("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH)]
        if args.insecure:
            self.channel = grpc.insecure_channel(args.upstream, options=options)
        else:
            if args.server_name:
                options.append(("grpc.ssl_target_name_override", args.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=Path(args.root_cert).read_bytes())
            self.channel = grpc.secure_channel(args.upstream, creds, options=options)

        self.stubs = {}
        for name, (req, resp) in METHODS.items():
            self.stubs[name] = self.channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=self._serializer(),
                response_deserializer=self._deserializer(getattr(pb, resp)))

    def _serializer(self):
        def ser(m):
            b = m.SerializeToString()
            with self.lock:
                self.counters["bytes_sent"] += len(b)
            return b
        return ser

    def _deserializer(self, cls):
        def de(b):
            with self.lock:
                self.counters["bytes_received"] += len(b)
            return cls.FromString(b)
        return de

    # ---------------------------------------------------------------- calls

    def call(self, name: str, req, timeout: Optional[float] = None):
        """One Fleet call with Flower's retry policy: only UNAVAILABLE is
        retried (exponential backoff, base 1 s, x2, at most 20 s, full
        jitter); anything else is fatal.  Headers are signed anew for each
        attempt, as Flower's interceptor does."""
        attempt = 0
        while True:
            with self.lock:
                self.calls[name] += 1
            try:
                resp = self.stubs[name](req, metadata=self.key.metadata(), timeout=timeout)
                with self.lock:
                    self.statuses[name]["OK"] += 1
                return resp
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                with self.lock:
                    self.statuses[name][code.name] += 1
                # Flower 1.26 gives up on this phrase even with UNAVAILABLE.
                handshake = "handshake failed" in details and not self.args.retry_handshake_failure
                if code != grpc.StatusCode.UNAVAILABLE or handshake:
                    raise Fatal(f"{name} failed: {code.name}: {details}") from None
                if self.args.max_retries is not None and attempt >= self.args.max_retries:
                    raise Fatal(f"{name} failed: {code.name}: {details} "
                                f"(gave up after {attempt} retries)") from None
                cap = min(20.0, 2.0 ** attempt, self.args.max_retry_wait)
                delay = random.uniform(0, cap)
                attempt += 1
                with self.lock:
                    self.retries[name] += 1
                log(self.ROLE, f"{name}: UNAVAILABLE ({details}); retry {attempt} "
                               f"in {delay:.2f} s")
                time.sleep(delay)

    # ------------------------------------------------------------ heartbeat

    def _heartbeat_period(self) -> float:
        # 30 s interval -> a heartbeat every 17.5-22.5 s, as observed.
        hb = self.args.heartbeat_interval
        return hb * 2 / 3 + random.uniform(-hb / 12, hb / 12)

    def _heartbeat(self) -> None:
        req = pb.SendNodeHeartbeatRequest(node=pb.Node(node_id=self.node_id),
                                          heartbeat_interval=self.args.heartbeat_interval)
        resp = self.call("SendNodeHeartbeat", req, timeout=HEARTBEAT_DEADLINE)
        if not resp.success:
            with self.lock:
                self.counters["heartbeats_rejected"] += 1

    def _heartbeat_loop(self) -> None:
        while not self.hb_stop.wait(self._heartbeat_period()):
            try:
                self._heartbeat()
            except Fatal as e:
                self.fatal = str(e)
                self.stop_event.set()
                return

    # ------------------------------------------------------------ main flow

    def run(self) -> int:
        a = self.args
        self.node_id = self.call("RegisterNode", pb.RegisterNodeFleetRequest(
            public_key=self.key.public_pem)).node_id
        got = self.call("ActivateNode", pb.ActivateNodeRequest(
            public_key=self.key.public_pem, heartbeat_interval=a.heartbeat_interval)).node_id
        if got != self.node_id:
            raise Fatal(f"ActivateNode returned node {got}, registered as {self.node_id}")
        log(self.ROLE, f"node {self.node_id} registered and active")
        self._heartbeat()
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        try:
            target = 2 * a.rounds
            while self.replies < target and not self.stop_event.is_set():
                resp = self.call("PullMessages", pb.PullMessagesRequest(
                    node=pb.Node(node_id=self.node_id)))
                if len(resp.messages_list) != len(resp.message_object_trees):
                    raise Fatal("PullMessages: messages and object trees differ in number")
                if not resp.messages_list:
                    self.stop_event.wait(a.poll_interval)
                    continue
                for msg, tree in zip(resp.messages_list, resp.message_object_trees):
                    self._handle(msg, tree)
        finally:
            self.hb_stop.set()
        if self.fatal:
            raise Fatal(self.fatal)
        hb.join()
        self.exit_reason = "done" if self.replies >= 2 * a.rounds else "signal"
        self.call("DeactivateNode", pb.DeactivateNodeRequest(node_id=self.node_id))
        self.call("UnregisterNode", pb.UnregisterNodeFleetRequest(node_id=self.node_id))
        log(self.ROLE, f"node {self.node_id} deactivated and unregistered after "
                       f"{self.replies} replies")
        return 0

    def _node(self):
        return pb.Node(node_id=self.node_id)

    def _pull_object(self, run_id: int, oid: str) -> bytes:
        """PullObject, waiting for an object that is announced but not yet
        there (1 s doubling to 10 s, +-20%, as Flower)."""
        delay, deadline = 1.0, time.monotonic() + 300
        while True:
            r = self.call("PullObject", pb.PullObjectRequest(
                node=self._node(), run_id=run_id, object_id=oid))
            if not r.object_found:
                raise Fatal(f"PullObject: object {oid} not found")
            if r.object_available:
                if hashlib.sha256(r.object_content).hexdigest() != oid:
                    raise Fatal(f"PullObject: content of {oid} does not hash to its id")
                return r.object_content
            if time.monotonic() > deadline:
                raise Fatal(f"PullObject: object {oid} still unavailable after 300 s")
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)

    def _handle(self, msg, tree) -> None:
        md = msg.metadata
        mid = md.message_id
        if md.dst_node_id != self.node_id:
            raise Fatal(f"got message {mid} for node {md.dst_node_id}")
        if md.run_id not in self.runs:
            run = self.call("GetRun", pb.GetRunRequest(node=self._node(), run_id=md.run_id)).run
            fab = self.call("GetFab", pb.GetFabRequest(node=self._node(), hash_str=run.fab_hash,
                                                       run_id=md.run_id)).fab
            if hashlib.sha256(fab.content).hexdigest() != run.fab_hash:
                raise Fatal("GetFab: FAB content does not match the run's fab_hash")
            self.runs[md.run_id] = run

        ids = tree_ids(tree)
        contents = dict(zip(ids, self.pool.map(lambda i: self._pull_object(md.run_id, i), ids)))
        # Everything must be exactly what the SuperLink made: the tree must
        # match what each object says its children are, the message its id.
        parsed = {}
        for t in tree_nodes(tree):
            try:
                parsed[t.object_id] = parse_object(contents[t.object_id])
            except ValueError as e:
                raise Fatal(f"object {t.object_id}: {e}") from None
            if parsed[t.object_id][1] != [c.object_id for c in t.children]:
                raise Fatal(f"object {t.object_id}: children differ from the object tree")
        if message_object(msg, [c.object_id for c in tree.children])[0] != mid or \
                tree.object_id != mid:
            raise Fatal(f"message {mid}: id does not match its content")
        rnd, n_floats = self._read_instruction(parsed, tree)
        pulled = sum(len(c) for c in contents.values())
        with self.lock:
            self.counters["object_bytes_pulled"] += pulled

        self.call("ConfirmMessageReceived", pb.ConfirmMessageReceivedRequest(
            node=self._node(), run_id=md.run_id, message_object_id=mid))
        t_app = time.monotonic()
        reply, objs = self._reply(msg, rnd, n_floats)
        metrics = self.last_metrics
        runtime = time.monotonic() - t_app
        resp = self.call("PushMessages", pb.PushMessagesRequest(
            node=self._node(), messages_list=[reply],
            message_object_trees=[objs.tree(reply.metadata.message_id)],
            clientapp_runtime_list=[runtime]))
        unknown = [i for i in resp.objects_to_push if i not in objs.contents]
        if unknown:
            raise Fatal(f"PushMessages asked for objects not in the reply: {unknown[:3]}")

        def push(oid):
            r = self.call("PushObject", pb.PushObjectRequest(
                node=self._node(), run_id=md.run_id, object_id=oid,
                object_content=objs.contents[oid]))
            if not r.stored:
                with self.lock:
                    self.counters["objects_not_stored"] += 1
            return len(objs.contents[oid])
        pushed = sum(self.pool.map(push, list(resp.objects_to_push)))
        with self.lock:
            self.counters["object_bytes_pushed"] += pushed
            self.replies += 1
            self.error_replies += int(reply.HasField("error"))
            self.instructions.append({
                "message_id": mid, "reply_id": reply.metadata.message_id,
                "message_type": md.message_type, "round": rnd, "objects": len(ids),
                "bytes_pulled": pulled, "bytes_pushed": pushed,
                "error": reply.HasField("error"), "metrics": metrics})
        log(self.ROLE, f"round {rnd} {md.message_type}: replied "
                       f"({'error' if reply.HasField('error') else f'{pushed} bytes pushed'})")
        if self.args.vanish_after and self.replies >= self.args.vanish_after:
            # A node that dies (power cut, OOM kill): no DeactivateNode, no
            # goodbye; the SuperLink can only notice the silence.
            self.exit_reason = "vanished"
            self.write_summary()
            log(self.ROLE, f"vanishing after {self.replies} replies")
            os._exit(0)

    @staticmethod
    def _read_instruction(parsed: dict, tree) -> tuple[Optional[int], int]:
        """(server-round, number of floats in the model) from the objects."""
        rnd, n_floats = None, 0
        for oid, (type_name, _, body) in parsed.items():
            if type_name == "ConfigRecord":
                v = parse_config_record(body).get("server-round")
                rnd = v if isinstance(v, int) else rnd
            elif type_name == "Array":
                n_floats += max(1, int(json.loads(body)["shape"][0]))
        return rnd, n_floats

    def _reply(self, ins, rnd: Optional[int], n_floats: int):
        """What a ClientApp would answer: a trained model and metrics for
        train, metrics for evaluate, or an Error with --error-reply."""
        md = ins.metadata
        objs = ObjectSet()
        children = []
        error = None
        rng = random.Random(f"{self.node_id}/{md.message_id}")
        if self.args.error_reply and md.message_type == "train":
            metrics = None
            error = pb.Error(code=CLIENTAPP_RAISED_EXCEPTION,
                             reason="<class 'RuntimeError'>:<'emulated ClientApp failure'>")
        else:
            records = {}
            if md.message_type == "train" and n_floats:
                array = add_array(objs, n_floats, rng)
                records["arrays"] = objs.add("ArrayRecord", json.dumps({"model": array}).encode(),
                                             [array])
                metrics = {"num-examples": rng.randint(16, 256), "train_loss": rng.random()}
            else:
                # Per-class accuracies (a list) as well: the sidecar does
                # not average lists, it counts them.
                metrics = {"num-examples": rng.randint(16, 256), "eval_loss": rng.random(),
                           "eval_acc": rng.random(), "class_acc": [rng.random(), rng.random()]}
            records["metrics"] = objs.add("MetricRecord", metric_record_body(metrics))
            children = [objs.add("RecordDict", json.dumps(records).encode(),
                                 list(records.values()))]
        now = time.time()
        msg = pb.Message(metadata=pb.Metadata(
            run_id=md.run_id, src_node_id=self.node_id, dst_node_id=md.src_node_id,
            reply_to_message_id=md.message_id, group_id=md.group_id,
            ttl=max(1.0, md.ttl - (now - md.created_at)), message_type=md.message_type,
            created_at=now))
        if error is not None:
            msg.error.CopyFrom(error)
        oid, content = message_object(msg, children)
        objs.contents[oid], objs.children[oid] = content, children
        msg.metadata.message_id = oid
        if error is None:
            msg.content.SetInParent()  # the empty RecordDict, bytes 12 00
        self.last_metrics = metrics
        return msg, objs

    # -------------------------------------------------------------- summary

    def summary(self) -> dict:
        """The --summary-file document.

        node_id           decimal string ("0" before registration)
        exit_reason       done | signal | vanished | fatal | running
        fatal             the fatal error's message, or null
        calls             {method: attempts, retries included}
        statuses          {method: {status name: count}}
        errors_by_status  {status name: non-OK answers, all methods}
        retries, retries_by_method
        replies, error_replies, instructions [{message_id, reply_id,
            message_type, round, objects, bytes_pulled, bytes_pushed, error,
            metrics (the reply's MetricRecord as a dict, null for an error)}]
        heartbeats_rejected, objects_not_stored,
        bytes_sent, bytes_received (serialized protobuf), object_bytes_pulled,
        object_bytes_pushed
        """
        with self.lock:
            errors = defaultdict(int)
            for per in self.statuses.values():
                for code, n in per.items():
                    if code != "OK":
                        errors[code] += n
            c = self.counters
            return {
                "node_id": str(self.node_id), "exit_reason": self.exit_reason,
                "fatal": self.fatal, "calls": dict(self.calls),
                "statuses": {m: dict(s) for m, s in self.statuses.items()},
                "errors_by_status": dict(errors), "retries": sum(self.retries.values()),
                "retries_by_method": dict(self.retries), "replies": self.replies,
                "error_replies": self.error_replies, "instructions": list(self.instructions),
                **{k: c[k] for k in ("heartbeats_rejected", "objects_not_stored", "bytes_sent",
                                     "bytes_received", "object_bytes_pulled",
                                     "object_bytes_pushed")},
            }

    def write_summary(self) -> None:
        if self.args.summary_file:
            write_json_atomic(self.args.summary_file, self.summary())


def run_supernode(args) -> int:
    node = SuperNode(args)
    signals = []

    def on_signal(signum, frame):
        # First signal: leave like Flower (DeactivateNode, UnregisterNode).
        # Second: the goodbye is stuck (e.g. upstream gone), just go.
        signals.append(signum)
        if len(signals) > 1:
            node.exit_reason = "signal"
            node.write_summary()
            os._exit(1)
        node.stop_event.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        rc = node.run()
    except Fatal as e:
        node.fatal = str(e)
        node.exit_reason = "fatal"
        log(node.ROLE, f"fatal: {e}")
        rc = 1
    node.write_summary()
    # A fatal error can leave a transfer hanging in the pool; do not wait for it.
    node.pool.shutdown(wait=False, cancel_futures=True)
    node.channel.close()
    return rc


# ======================================================================= CLI


def host_port(s: str) -> str:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {s!r}")
    return s


def positive(kind):
    def conv(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
        return v
    return conv


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fleet_emulator.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)

    s = sub.add_parser("superlink", help="serve the Fleet API like Flower's SuperLink")
    s.add_argument("--listen", type=host_port, default="127.0.0.1:9092",
                   help="HOST:PORT to serve on (default 127.0.0.1:9092; port 0 picks one)")
    s.add_argument("--tls-cert", help="server certificate PEM (with --tls-key: TLS, else h2c)")
    s.add_argument("--tls-key", help="server private key PEM")
    s.add_argument("--nodes", type=positive(int), default=2,
                   help="active nodes to wait for before round 1 (default 2)")
    s.add_argument("--rounds", type=positive(int), default=3, help="server rounds (default 3)")
    s.add_argument("--array-bytes", type=positive(int), default=64 * 1024,
                   help="size of the model (.npy bytes, split into ArrayChunks of at most "
                        "5 MiB) sent with each instruction (default 65536)")
    s.add_argument("--stats-file", help="JSON statistics, rewritten as things change and at exit")
    s.add_argument("--exit-when-done", action="store_true",
                   help="exit once all rounds ended and the nodes left (or --done-grace passed)")
    s.add_argument("--done-grace", type=float, default=10.0,
                   help="seconds to wait for nodes to deactivate after the last round (default 10)")
    s.add_argument("--slow-push-answer", type=float, default=0.0, metavar="SECONDS",
                   help="answer a PushObject that completes a reply SECONDS late (the reply "
                        "counts at once, so the next phase may start before the answer), "
                        "as a busy SuperLink may")
    s.add_argument("--fail-method", action="append", metavar="METHOD:CODE[:COUNT]",
                   help="fail the first COUNT (default 1, 0 = all) calls of METHOD with status "
                        "CODE (name or number); repeatable")

    n = sub.add_parser("supernode", help="connect to a Fleet API like Flower's SuperNode")
    n.add_argument("--upstream", type=host_port, required=True, help="SuperLink HOST:PORT")
    sec = n.add_mutually_exclusive_group(required=True)
    sec.add_argument("--root-cert", help="CA PEM to verify the SuperLink with (TLS)")
    sec.add_argument("--insecure", action="store_true", help="h2c, no TLS")
    n.add_argument("--server-name", help="TLS name to verify instead of the upstream host")
    n.add_argument("--poll-interval", type=positive(float), default=3.0,
                   help="seconds between PullMessages while idle (Flower: 3)")
    n.add_argument("--heartbeat-interval", type=positive(float), default=30.0,
                   help="heartbeat interval announced to the SuperLink; heartbeats are sent "
                        "every ~2/3 of it (default 30)")
    n.add_argument("--rounds", type=positive(int), default=3,
                   help="leave after replying to 2 x ROUNDS instructions (default 3)")
    n.add_argument("--error-reply", action="store_true",
                   help="answer train instructions with Message.error, like a failing ClientApp")
    n.add_argument("--vanish-after", type=positive(int), metavar="N",
                   help="after N replies exit at once, without DeactivateNode")
    n.add_argument("--max-retry-wait", type=positive(float), default=20.0,
                   help="cap on one UNAVAILABLE backoff delay, seconds (Flower: 20)")
    n.add_argument("--max-retries", type=int, default=None,
                   help="give up after this many retries of one call (default: never)")
    n.add_argument("--retry-handshake-failure", action="store_true",
                   help="retry an UNAVAILABLE that says 'handshake failed' like Flower 1.25 "
                        "(default: give up at once, like 1.26)")
    n.add_argument("--summary-file", help="JSON summary written at exit")

    args = p.parse_args(argv)
    if args.mode == "superlink" and bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        load_protos()
    except RuntimeError as e:
        print(f"fleet_emulator: {e}", file=sys.stderr)
        return 2
    if args.mode == "superlink":
        try:
            FailureInjector(args.fail_method)
        except ValueError as e:
            print(f"fleet_emulator: {e}", file=sys.stderr)
            return 2
        return run_superlink(args)
    return run_supernode(args)


if __name__ == "__main__":
    sys.exit(main())
