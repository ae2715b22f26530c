#!/usr/bin/env python3
"""A OneGate emulator that follows ../shared/onegate.md (OpenNebula's OneGate
API as onegate-server.rb implements it), including its quirks, for tests.

    onegate_emulator.py --listen 127.0.0.1:5030 --control 127.0.0.1:5031

API (as the real server):
  every request needs X-ONEGATE-TOKEN and X-ONEGATE-VMID of a known VM, else
  401 "Not authorized".
  PUT /vm          body: OpenNebula template text, one attribute a line
                   (KEY = "VALUE" or KEY=VALUE), split on newlines and
                   appended to the VM's USER_TEMPLATE.  Form encoding is not
                   decoded: `A=1&B=2` is stored as A = "1&B=2", as the real
                   server does.  SERVICE_ID, ROLE_NAME, SCHED_REQUIREMENTS:
                   403.  200 with an empty body.
  PUT /vm?type=2   body: attribute names, one a line: deleted.
  GET /vm          {"VM": {...}} of the caller.
  GET /service     the caller's OneFlow service (400 if it is in none): roles
                   with nodes, each with vm_info.VM (ID and NAME as strings,
                   USER_TEMPLATE values as strings, TEMPLATE.NIC a single
                   object when the VM has one NIC), "running" false while a
                   VM boots.

Control port (JSON, for tests; no authentication):
  POST /vm        {"id": 41, "token": "...", "role": "superlink", "ip": "10.0.0.5",
                   "booting": false, "in_service": true}
  POST /template  {"id": 41, "set": {"FL_READY": "NO"}, "delete": ["X"]}
  POST /fault     {"mode": "none" | "500" | "stall" | "refuse", "seconds": 20,
                   "then": {"mode": ..., "seconds": ...}}  (then: the next fault, once
                   this one has run its time; 500 and stall only)
                  500: every API request answers 500 for |seconds|;
                  stall: every API request waits |seconds| before its answer;
                  refuse: the API port stops listening for |seconds|.
  GET /state      {"vms": {id: USER_TEMPLATE}, "log": [{"method", "path", "vmid",
                   "status", "t", "body"}]}
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

RESTRICTED = {"SERVICE_ID", "ROLE_NAME", "SCHED_REQUIREMENTS"}
LOCK = threading.Lock()
STATE = {"vms": {}, "log": [], "fault": {"mode": "none", "until": 0.0}, "service": {"id": "12", "name": "flower"}}


def parse_template(body: str) -> dict[str, str]:
    """OpenNebula template text: one attribute a line."""
    out = {}
    for line in body.split("\n"):
        m = re.match(r'^\s*([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$', line)
        if not m:
            continue
        key, raw = m.group(1).upper(), m.group(2)
        if raw.startswith('"'):
            val, i = [], 1
            while i < len(raw) and raw[i] != '"':
                if raw[i] == "\\" and i + 1 < len(raw):
                    i += 1
                val.append(raw[i])
                i += 1
            value = "".join(val)
        else:
            value = raw
        out[key] = value
    return out


def vm_doc(vm: dict) -> dict:
    nic = {"IP": vm["ip"], "NETWORK": "private", "MAC": "02:00:0a:00:00:05"}
    return {"VM": {"ID": str(vm["id"]), "NAME": f'{vm["role"]}_{vm["id"]}_(service_12)',
                   "USER_TEMPLATE": dict(vm["user_template"]), "TEMPLATE": {"NIC": nic}}}


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _answer(self, status: int, body: bytes = b"", ctype: str = "text/plain", vmid=None, req_body=""):
        with LOCK:
            STATE["log"].append({"method": self.command, "path": self.path, "vmid": vmid, "status": status,
                                 "t": time.time(), "body": req_body})
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        req_body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        with LOCK:
            f = STATE["fault"]
            if f.get("then") and time.time() >= f["until"]:  # the next fault of a sequence
                nxt = f["then"]
                STATE["fault"] = {"mode": nxt["mode"], "until": f["until"] + float(nxt["seconds"]),
                                  "then": nxt.get("then")}
            fault = dict(STATE["fault"])
        if fault["mode"] != "none" and time.time() < fault["until"]:
            if fault["mode"] == "500":
                return self._answer(500, b"Internal Server Error", req_body=req_body)
            if fault["mode"] == "stall":
                time.sleep(max(0.0, fault["until"] - time.time()))
        token, vmid = self.headers.get("X-ONEGATE-TOKEN"), self.headers.get("X-ONEGATE-VMID")
        with LOCK:
            vm = STATE["vms"].get(str(vmid))
        if vm is None or not token or token != vm["token"]:
            return self._answer(401, b"Not authorized", vmid=vmid, req_body=req_body)
        url = urlparse(self.path)
        if self.command == "PUT" and url.path == "/vm":
            if parse_qs(url.query).get("type") == ["2"]:
                with LOCK:
                    for name in req_body.split("\n"):
                        vm["user_template"].pop(name.strip().upper(), None)
                return self._answer(200, vmid=vmid, req_body=req_body)
            attrs = parse_template(req_body)
            if RESTRICTED & attrs.keys():
                return self._answer(403, b"Restricted attribute", vmid=vmid, req_body=req_body)
            with LOCK:
                vm["user_template"].update(attrs)
            return self._answer(200, vmid=vmid, req_body=req_body)
        if self.command == "GET" and url.path == "/vm":
            with LOCK:
                doc = vm_doc(vm)
            return self._answer(200, json.dumps(doc).encode(), "application/json", vmid)
        if self.command == "GET" and url.path == "/service":
            if not vm.get("in_service", True):
                return self._answer(400, b"VM is not part of a service", vmid=vmid)
            with LOCK:
                roles: dict[str, list] = {}
                for v in STATE["vms"].values():
                    if v.get("in_service", True):
                        roles.setdefault(v["role"], []).append(v)
                doc = {"SERVICE": {"id": STATE["service"]["id"], "name": STATE["service"]["name"], "state": 2,
                                   "roles": [{"name": name, "cardinality": len(vms), "state": 2,
                                              "nodes": [dict({"deploy_id": int(v["id"]), "vm_info": vm_doc(v)},
                                                             **({"running": False} if v.get("booting") else
                                                                {"running": True})) for v in vms]}
                                             for name, vms in roles.items()]}}
                for name in STATE.get("empty_roles", []):
                    doc["SERVICE"]["roles"].append({"name": name, "cardinality": 1, "state": 1, "nodes": []})
            return self._answer(200, json.dumps(doc).encode(), "application/json", vmid)
        return self._answer(404, b"Not found", vmid=vmid, req_body=req_body)

    do_GET = do_PUT = do_POST = do_DELETE = _handle


class ApiServer:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.server = None
        self.lock = threading.Lock()
        self.start()

    def start(self):
        with self.lock:
            self.server = ThreadingHTTPServer((self.host, self.port), Api)
            self.server.daemon_threads = True
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuse_for(self, seconds: float):
        def run():
            with self.lock:
                srv, self.server = self.server, None
            srv.shutdown()
            srv.server_close()
            time.sleep(seconds)
            self.start()
        threading.Thread(target=run, daemon=True).start()


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: ApiServer = None

    def log_message(self, *a):
        pass

    def _json(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            doc = {"vms": {k: dict(v["user_template"]) for k, v in STATE["vms"].items()}, "log": list(STATE["log"])}
        self._json(200, doc)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/vm":
            with LOCK:
                STATE["vms"][str(req["id"])] = {"id": req["id"], "token": req["token"], "role": req["role"],
                                                "ip": req.get("ip", "127.0.0.1"), "booting": req.get("booting", False),
                                                "in_service": req.get("in_service", True), "user_template": {}}
        elif self.path == "/template":
            with LOCK:
                ut = STATE["vms"][str(req["id"])]["user_template"]
                ut.update(req.get("set", {}))
                for k in req.get("delete", []):
                    ut.pop(k, None)
        elif self.path == "/fault":
            mode, secs = req.get("mode", "none"), float(req.get("seconds", 0))
            if mode == "refuse":
                self.api.refuse_for(secs)
            else:
                with LOCK:
                    STATE["fault"] = {"mode": mode, "until": time.time() + secs, "then": req.get("then")}
        elif self.path == "/empty_role":
            with LOCK:
                STATE.setdefault("empty_roles", []).append(req["name"])
        else:
            return self._json(404, {"error": "unknown"})
        self._json(200, {"ok": True})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--control", required=True)
    a = ap.parse_args()
    h, p = a.listen.rsplit(":", 1)
    Control.api = ApiServer(h, int(p))
    ch, cp = a.control.rsplit(":", 1)
    ctl = ThreadingHTTPServer((ch, int(cp)), Control)
    print("listening", flush=True)
    ctl.serve_forever()


if __name__ == "__main__":
    main()
