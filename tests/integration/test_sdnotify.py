"""flower-sidecar under systemd (Type=notify): the sd_notify messages, read
from a real AF_UNIX datagram socket given in NOTIFY_SOCKET, as systemd
would.  READY=1 only once the Fleet listener and the admin port accept;
STATUS= follows the health verdict; WATCHDOG=1 at half WATCHDOG_USEC;
STOPPING=1 on SIGTERM.  Without NOTIFY_SOCKET nothing is sent (every other
test runs that way).
"""

from __future__ import annotations

import socket
import threading
import time

from conftest import listening, wait_for


class NotifySocket:
    """A bound AF_UNIX datagram socket; a thread keeps every message with
    the time it arrived and, for READY=1, whether both ports listened then."""

    def __init__(self, path, ports=()):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.ports = list(ports)
        self.messages: list[tuple[float, str, bool]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            text = data.decode()
            ports_up = all(listening(p) for p in self.ports) if "READY=1" in text else False
            self.messages.append((time.monotonic(), text, ports_up))

    def lines(self, key: str) -> list[tuple[float, str]]:
        out = []
        for t, text, _ in self.messages:
            out += [(t, ln[len(key) + 1:]) for ln in text.split("\n") if ln.startswith(key + "=")]
        return out

    def close(self):
        self.stop = True
        self.thread.join(timeout=5)
        self.sock.close()


def test_notify_ready_status_watchdog_stopping(make_upstream, make_sidecar, tmp_path):
    up = make_upstream()
    sc = make_sidecar(upstream=up, start=False, env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                                    "WATCHDOG_USEC": "300000"})
    ns = NotifySocket(tmp_path / "notify", ports=[sc.port, sc.admin_port])
    try:
        sc.start()
        wait_for(lambda: ns.lines("READY"), 10, "READY=1")
        ready = [m for m in ns.messages if "READY=1" in m[1]]
        assert len(ready) == 1, ns.messages
        assert ready[0][2], "READY=1 was sent before the Fleet listener and the admin port accepted"
        wait_for(lambda: any(s.startswith("SERVING") for _, s in ns.lines("STATUS")), 10, "STATUS=SERVING")

        # The upstream goes away and comes back: STATUS says so each time.
        up.kill9()
        wait_for(lambda: any(s.startswith("NOT_SERVING") and "upstream" in s
                             for _, s in ns.lines("STATUS")[1:]), 10, "STATUS=NOT_SERVING: upstream...")
        up.start()
        wait_for(lambda: [s for _, s in ns.lines("STATUS")][-1].startswith("SERVING"), 20, "STATUS=SERVING again")
        statuses = [s.split(":")[0] for _, s in ns.lines("STATUS")]
        assert statuses[-3:] == ["SERVING", "NOT_SERVING", "SERVING"], statuses

        # WATCHDOG=1 every WATCHDOG_USEC / 2 = 150 ms, from the event loop.
        n0 = len(ns.lines("WATCHDOG"))
        time.sleep(1.5)
        beats = ns.lines("WATCHDOG")[n0:]
        assert all(v == "1" for _, v in beats)
        gaps = [b[0] - a[0] for a, b in zip(beats, beats[1:])]
        assert 6 <= len(beats) <= 12, f"{len(beats)} WATCHDOG=1 in 1.5 s (expected ~10): gaps {gaps}"
        assert max(gaps) < 0.3 * 1.0, f"a gap of {max(gaps):.3f} s would have tripped a 300 ms watchdog"

        assert not ns.lines("STOPPING")
        sc.signal()
        assert sc.wait_exit(15) == 0
        stopping = ns.lines("STOPPING")
        assert [v for _, v in stopping] == ["1"], ns.messages
        assert "draining" in ns.lines("STATUS")[-1][1], ns.lines("STATUS")
    finally:
        ns.close()


def test_no_notify_socket_no_messages_and_sighup_keeps_running(make_upstream, make_sidecar, tmp_path):
    """Without NOTIFY_SOCKET (a plain start) the daemon runs as before; a
    socket nobody named stays silent.  SIGHUP (systemd's ExecReload=) is
    logged and does not end the daemon."""
    import signal
    ns = NotifySocket(tmp_path / "unused")
    try:
        sc = make_sidecar(upstream=make_upstream())
        sc.signal(signal.SIGHUP)
        ev = sc.events.wait("sidecar.reload")
        assert ev["signal"] == "SIGHUP"
        time.sleep(0.3)
        assert sc.alive() and listening(sc.port)
        assert not ns.messages
    finally:
        ns.close()
