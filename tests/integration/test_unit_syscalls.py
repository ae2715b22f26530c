"""The systemd unit's SystemCallFilter= admits every system call the daemon
makes.  A call outside it would fail with EPERM (SystemCallErrorNumber=) only
in production, under systemd: here the daemon runs under strace through a
TLS handshake, calls with bodies, /metrics, a health Watch, SIGHUP, a
sd_notify socket with the watchdog and a SIGTERM drain, and every system
call seen is checked against the unit's allow list less its deny list, as
`systemd-analyze syscall-filter` expands them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request

import grpc
import pytest

import procs
from conftest import HOST, ROOT, SIDECAR, listening, unary, wait_for

UNIT = ROOT / "deploy" / "systemd" / "flower-sidecar@.service"


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, timeout=30).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for ln in out.splitlines():
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        if ln.startswith("@"):
            cur = s
            groups[cur] = []
        elif cur:
            groups[cur].append(s)
    return groups


def expand(names, groups) -> set[str]:
    out: set[str] = set()
    for n in names:
        out |= expand(groups[n], groups) if n.startswith("@") else {n}
    return out


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_unit_syscall_filter_admits_every_syscall(echo, tmp_path):
    groups = syscall_groups()
    allow, deny = set(), set()
    for ln in UNIT.read_text().splitlines():
        m = re.match(r"SystemCallFilter=(~?)(.*)", ln)
        if m:
            (deny if m.group(1) else allow).update(expand(m.group(2).split(), groups))
    assert "read" in allow and "reboot" not in allow - deny and "setrlimit" in deny, "filter parsed wrongly"

    port, admin = procs.free_port(), procs.free_port()
    # Read like systemd does: sd_notify's send blocks once a datagram queue
    # nobody reads is full.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    stop_reading = threading.Event()

    def drain():
        while not stop_reading.is_set():
            try:
                notify.recv(4096)
            except OSError:
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    trace = tmp_path / "trace"
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    p = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), SIDECAR, "link", "--listen", f"{HOST}:{port}",
                          "--admin", f"{HOST}:{admin}", "--upstream", echo.address, "--tls-dir",
                          str(tmp_path / "tls")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: listening(port) and listening(admin), 20, "sidecar under strace")
        creds = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "tls" / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            for n in (10, 100_000, 3_000_000):
                assert unary(ch, "Unary", b"x" * n) == b"x" * n
        assert urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=10).status == 200
        with grpc.insecure_channel(f"{HOST}:{admin}") as ch:
            watch = ch.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=1)
            with pytest.raises(grpc.RpcError):
                for _ in watch:
                    pass
        daemon = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(daemon, signal.SIGHUP)  # the daemon we started, by PID
        wait_for(lambda: "SIGHUP" in trace.read_text(), 10, "SIGHUP seen")
        os.kill(daemon, signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        stop_reading.set()
        reader.join(timeout=5)
        notify.close()
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M)) - {"execve"}  # strace's own exec
    assert len(used) > 30, used
    assert not used - allow, f"not in the unit's SystemCallFilter allow list: {sorted(used - allow)}"
    assert not used & deny, f"denied by the unit's SystemCallFilter: {sorted(used & deny)}"
