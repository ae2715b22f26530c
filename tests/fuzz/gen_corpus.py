#!/usr/bin/python3
"""Builds the seed corpus of tests/fuzz/fuzz_observe.c from real Fleet
messages, made with the emulator's protos and object helpers
(tests/emulator/fleet_emulator.py, build/py/fleet_pb2.py).

    make proto-py && /usr/bin/python3 tests/fuzz/gen_corpus.py [DIR]

DIR defaults to tests/fuzz/corpus; existing seed-*.bin files there are
replaced, other files (e.g. crash reproducers kept on purpose) are left.
The input format is described at the top of fuzz_observe.c.  The output is
deterministic (fixed ids and seeds), so regenerating gives the same files.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import fleet_emulator as emu  # noqa: E402

pb = emu.load_protos()

METHOD_NUM = {name: i + 1 for i, name in enumerate(emu.METHODS)}  # fleet.h order
NOT_OK, RESET = 0x10, 0x20
ADV_1S, ADV_10S, ADV_100S = 0x40, 0x80, 0xC0

NODE_A = 0x9A5C3E1F00000001 | (1 << 63)
NODE_B = 11120582391849163402
RUN = 0xF00DF00DF00DF00D
PEM = b"-----BEGIN PUBLIC KEY-----\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE\n-----END PUBLIC KEY-----\n"


def grpc_frame(body: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + struct.pack(">I", len(body)) + body


def record(method: str | None, req: bytes, resp: bytes, sel_extra: int = 0, chunk: int = 0,
           frame: bool = True) -> bytes:
    m = METHOD_NUM[method] if method else 0
    if frame:
        req, resp = grpc_frame(req), grpc_frame(resp)
    return (bytes([m | sel_extra, chunk]) + len(req).to_bytes(3, "little") + req +
            len(resp).to_bytes(3, "little") + resp)


def ser(m) -> bytes:
    return m.SerializeToString(deterministic=True)


def node(nid):
    return pb.Node(node_id=nid)


class Instruction:
    """An instruction as the emulator's SuperLink builds it (small model)."""

    def __init__(self, rnd: int, mtype: str, dst: int, array_bytes: int = 256, seed: int = 1):
        rng = random.Random(seed)
        objs = emu.ObjectSet()
        n_floats = max(1, (array_bytes - 128) // 4)
        array = emu.add_array(objs, n_floats, rng)
        arrays = objs.add("ArrayRecord", ('{"model": "%s"}' % array).encode(), [array])
        self.config = objs.add("ConfigRecord", emu.config_record_body({"server-round": rnd}))
        content = objs.add("RecordDict", ('{"arrays": "%s", "config": "%s"}' % (arrays, self.config)).encode(),
                           [arrays, self.config])
        msg = pb.Message(metadata=pb.Metadata(
            run_id=RUN, src_node_id=1, dst_node_id=dst, group_id="", ttl=43200.0,
            message_type=mtype, created_at=1763784330.5))
        mid = objs.add("Message", emu.message_body(msg), [content])
        msg.metadata.message_id = mid
        msg.content.SetInParent()
        self.msg, self.objs, self.mid = msg, objs, mid
        self.tree = objs.tree(mid)
        self.ids = emu.tree_ids(self.tree)


def reply_for(ins: Instruction, src: int, error: bool = False):
    objs = emu.ObjectSet()
    children = []
    if not error:
        metrics = objs.add("MetricRecord", emu.metric_record_body({"num-examples": 64, "loss": 0.25}))
        children = [objs.add("RecordDict", ('{"metrics": "%s"}' % metrics).encode(), [metrics])]
    msg = pb.Message(metadata=pb.Metadata(
        run_id=RUN, src_node_id=src, dst_node_id=1, reply_to_message_id=ins.mid, group_id="",
        ttl=43000.0, message_type=ins.msg.metadata.message_type, created_at=1763784331.0))
    if error:
        msg.error.CopyFrom(pb.Error(code=2, reason="<class 'RuntimeError'>:<'emulated ClientApp failure'>"))
    oid, content = emu.message_object(msg, children)
    objs.contents[oid], objs.children[oid] = content, children
    msg.metadata.message_id = oid
    if not error:
        msg.content.SetInParent()
    return msg, objs


# --- calls ------------------------------------------------------------------

def c_register(nid, **kw):
    return record("RegisterNode", ser(pb.RegisterNodeFleetRequest(public_key=PEM)),
                  ser(pb.RegisterNodeFleetResponse(node_id=nid)), **kw)


def c_activate(nid, hb=30.0, **kw):
    return record("ActivateNode", ser(pb.ActivateNodeRequest(public_key=PEM, heartbeat_interval=hb)),
                  ser(pb.ActivateNodeResponse(node_id=nid)), **kw)


def c_heartbeat(nid, hb=30.0, **kw):
    return record("SendNodeHeartbeat", ser(pb.SendNodeHeartbeatRequest(node=node(nid), heartbeat_interval=hb)),
                  ser(pb.SendNodeHeartbeatResponse(success=True)), **kw)


def c_deactivate(nid, **kw):
    return record("DeactivateNode", ser(pb.DeactivateNodeRequest(node_id=nid)),
                  ser(pb.DeactivateNodeResponse()), **kw)


def c_unregister(nid, **kw):
    return record("UnregisterNode", ser(pb.UnregisterNodeFleetRequest(node_id=nid)),
                  ser(pb.UnregisterNodeFleetResponse()), **kw)


def c_pull_messages(nid, ins: Instruction | None, **kw):
    resp = pb.PullMessagesResponse(reconnect=pb.Reconnect(reconnect=5))
    if ins is not None:
        resp.messages_list.append(ins.msg)
        resp.message_object_trees.append(ins.tree)
    return record("PullMessages", ser(pb.PullMessagesRequest(node=node(nid))), ser(resp), **kw)


def c_get_run(nid, **kw):
    run = pb.Run(run_id=RUN, fab_id="flwrlabs/emulator-app", fab_version="1.0.0", fab_hash="ab" * 32,
                 status=pb.RunStatus(status="running"), federation="default")
    run.override_config["local-epochs"].sint64 = 1
    return record("GetRun", ser(pb.GetRunRequest(node=node(nid), run_id=RUN)), ser(pb.GetRunResponse(run=run)), **kw)


def c_get_fab(nid, **kw):
    return record("GetFab", ser(pb.GetFabRequest(node=node(nid), hash_str="ab" * 32, run_id=RUN)),
                  ser(pb.GetFabResponse(fab=pb.Fab(hash_str="ab" * 32, content=b"PK\x03\x04" + b"z" * 60))), **kw)


def c_pull_object(nid, oid, content, available=True, **kw):
    resp = (pb.PullObjectResponse(object_found=True, object_available=True, object_content=content)
            if available else pb.PullObjectResponse(object_found=True, object_available=False))
    return record("PullObject", ser(pb.PullObjectRequest(node=node(nid), run_id=RUN, object_id=oid)), ser(resp), **kw)


def c_confirm(nid, mid, **kw):
    return record("ConfirmMessageReceived",
                  ser(pb.ConfirmMessageReceivedRequest(node=node(nid), run_id=RUN, message_object_id=mid)),
                  ser(pb.ConfirmMessageReceivedResponse()), **kw)


def c_push_messages(nid, msg, objs, runtime=0.25, **kw):
    tree = objs.tree(msg.metadata.message_id)
    req = pb.PushMessagesRequest(node=node(nid), messages_list=[msg], message_object_trees=[tree],
                                 clientapp_runtime_list=[runtime])
    resp = pb.PushMessagesResponse(reconnect=pb.Reconnect(reconnect=5), objects_to_push=list(objs.contents))
    resp.results[msg.metadata.message_id] = 0
    return record("PushMessages", ser(req), ser(resp), **kw)


def c_push_object(nid, oid, content, **kw):
    return record("PushObject", ser(pb.PushObjectRequest(node=node(nid), run_id=RUN, object_id=oid,
                                                         object_content=content)),
                  ser(pb.PushObjectResponse(stored=True)), **kw)


def instruction_calls(nid, ins: Instruction, error=False, pull_config_first=False, **kw) -> bytes:
    out = c_pull_messages(nid, ins, **kw)
    ids = list(ins.ids)
    if pull_config_first:
        ids.remove(ins.config)
        ids.insert(0, ins.config)
    for oid in ids:
        out += c_pull_object(nid, oid, ins.objs.contents[oid], **kw)
    out += c_confirm(nid, ins.mid, **kw)
    msg, objs = reply_for(ins, nid, error)
    out += c_push_messages(nid, msg, objs, **kw)
    for oid, content in objs.contents.items():
        out += c_push_object(nid, oid, content, **kw)
    return out


# --- seeds --------------------------------------------------------------------

def seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    ins1 = Instruction(1, "train", NODE_A, seed=1)
    ins1e = Instruction(1, "evaluate", NODE_A, seed=2)
    ins1b = Instruction(1, "train", NODE_B, seed=1)  # same model/config objects as ins1

    # One call of every method, whole and byte by byte.
    singles = {
        "register": c_register(NODE_A), "activate": c_activate(NODE_A, 30.0),
        "heartbeat": c_heartbeat(NODE_A), "deactivate": c_deactivate(NODE_A),
        "unregister": c_unregister(NODE_A), "pull-empty": c_pull_messages(NODE_A, None),
        "pull-instruction": c_pull_messages(NODE_A, ins1), "get-run": c_get_run(NODE_A),
        "get-fab": c_get_fab(NODE_A), "confirm": c_confirm(NODE_A, ins1.mid),
        "pull-config": c_pull_object(NODE_A, ins1.config, ins1.objs.contents[ins1.config]),
        "pull-unavailable": c_pull_object(NODE_A, ins1.config, b"", available=False),
    }
    rmsg, robjs = reply_for(ins1, NODE_A)
    singles["push-messages"] = c_push_messages(NODE_A, rmsg, robjs)
    emsg, eobjs = reply_for(ins1, NODE_A, error=True)
    singles["push-messages-error"] = c_push_messages(NODE_A, emsg, eobjs)
    oid = next(iter(robjs.contents))
    singles["push-object"] = c_push_object(NODE_A, oid, robjs.contents[oid])
    for name, data in singles.items():
        s[f"call-{name}"] = data
    for name in ("activate", "pull-instruction", "push-messages", "pull-config", "get-run"):
        method_rec = singles[name]
        # same call, one byte per DATA chunk
        s[f"call-{name}-bytewise"] = method_rec[:1] + b"\x01" + method_rec[2:]

    # Non-OK, reset, non-Fleet path, compressed, truncated, corrupt.
    s["status-unavailable-register"] = c_register(NODE_A, sel_extra=NOT_OK)
    s["status-unavailable-pull"] = c_pull_messages(NODE_A, ins1, sel_extra=NOT_OK)
    s["reset-push-messages"] = c_push_messages(NODE_A, rmsg, robjs, sel_extra=RESET)
    s["not-fleet"] = record(None, b"hello", b"world")
    body = ser(pb.ActivateNodeResponse(node_id=NODE_A))
    s["compressed"] = (bytes([METHOD_NUM["ActivateNode"], 0]) +
                       (5 + 2).to_bytes(3, "little") + grpc_frame(b"\x11" * 2, 1) +
                       (5 + len(body)).to_bytes(3, "little") + grpc_frame(body, 1))
    full = singles["pull-instruction"]
    s["truncated-pull"] = full[:len(full) // 2]
    corrupt = bytearray(singles["push-messages"])
    for i in range(20, len(corrupt), 37):
        corrupt[i] ^= 0xFF
    s["corrupt-push-messages"] = bytes(corrupt)
    s["empty-messages"] = record("PushObject", b"", b"") + record("GetRun", b"", b"")
    s["unframed"] = record("ActivateNode", b"\x12\x08", b"\x08\x01", frame=False)
    # Calls whose request or response carried no DATA at all.
    s["no-data"] = b"".join(record(m, b"", b"", frame=False) for m in emu.METHODS) + \
        record("PullObject", ser(pb.PullObjectRequest(node=node(NODE_A), object_id="x")), b"", frame=False)

    # Lifecycles: the round logic needs several calls in one input.
    life = (c_register(NODE_A) + c_activate(NODE_A, 2.0) + c_heartbeat(NODE_A, 2.0) +
            c_get_run(NODE_A) + c_get_fab(NODE_A) + instruction_calls(NODE_A, ins1) +
            instruction_calls(NODE_A, ins1e) + c_deactivate(NODE_A) + c_unregister(NODE_A))
    s["life-one-node"] = life
    s["life-one-node-bytewise"] = b"".join(
        bytes([r[0], 1]) + r[2:] for r in [c_register(NODE_A), c_activate(NODE_A, 2.0)]) + \
        instruction_calls(NODE_A, ins1, chunk=7)
    s["life-config-first"] = (c_activate(NODE_A) + instruction_calls(NODE_A, ins1, pull_config_first=True))
    s["two-nodes-error-reply"] = (c_activate(NODE_A, 1.0) + c_activate(NODE_B, 1.0) +
                                  instruction_calls(NODE_A, ins1) +
                                  instruction_calls(NODE_B, ins1b, error=True) +
                                  c_pull_messages(NODE_A, ins1e))
    # Node B goes silent mid-round: node.offline, missing, round.end.
    s["node-offline-mid-round"] = (c_activate(NODE_A, 1.0) + c_activate(NODE_B, 1.0) +
                                   instruction_calls(NODE_A, ins1) + c_pull_messages(NODE_B, ins1b) +
                                   c_pull_object(NODE_B, ins1.config, ins1.objs.contents[ins1.config]) +
                                   c_confirm(NODE_B, ins1b.mid) +
                                   c_heartbeat(NODE_A, 1.0, sel_extra=ADV_10S))
    # Dispatch whose ConfigRecord never comes: the 30 s fallback.
    s["dispatch-fallback"] = (c_activate(NODE_A) + c_pull_messages(NODE_A, ins1) +
                              c_heartbeat(NODE_A, sel_extra=ADV_100S))
    # Odd heartbeat intervals (0, negative, huge) then time passes.
    s["odd-heartbeat-intervals"] = (c_activate(NODE_A, 0.0) + c_activate(NODE_B, -5.0) +
                                    c_activate(NODE_A + 2, 1e300) + c_activate(NODE_A + 3, 5e-324) +
                                    c_heartbeat(NODE_A, sel_extra=ADV_100S))
    # ConfigRecord bodies: the whole input also goes to fs_fed_parse_server_round.
    s["config-sint64"] = emu.config_record_body({"server-round": 3, "lr": 0.1})
    s["config-negative"] = emu.config_record_body({"x": "y", "server-round": -7})
    s["config-uint64"] = ser(pb.ConfigRecord(items=[pb.ConfigRecord.Item(
        key="server-round", value=pb.ConfigRecordValue(uint64=2**64 - 1))]))
    s["config-absent"] = emu.config_record_body({"round": 1})
    # A PushObject larger than the 64 KiB prefix the observer keeps.
    big = Instruction(2, "train", NODE_A, array_bytes=70000, seed=3)
    chunk_id = next(i for i in big.ids if big.objs.contents[i].startswith(b"ArrayChunk"))
    s["big-push-object"] = c_push_object(NODE_A, chunk_id, big.objs.contents[chunk_id])
    return s


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fuzz" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("seed-*.bin"):
        old.unlink()
    for name, data in sorted(seeds().items()):
        (out / f"seed-{name}.bin").write_bytes(data)
    print(f"{len(seeds())} seeds in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
