#!/usr/bin/python3
"""make demo: a federation running end to end through flower-sidecar.

Starts, on loopback only:
  1. the Fleet emulator as the SuperLink, h2c on 127.0.0.1 (as an operator
     runs `flower-superlink --insecure --fleet-api-address 127.0.0.1:9192`),
  2. `flower-sidecar link` in front of it with an auto-generated TLS CA,
  3. two emulated SuperNodes that trust only that CA, running 3 rounds of
     train + evaluate through the sidecar with Flower's call sequence.
Shows the sidecar's event log, checks the federation completed, stops
everything it started, and exits 0 only when it all worked.
"""
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "emulator"))
import procs  # noqa: E402

PY = "/usr/bin/python3"
EMU = os.path.join(ROOT, "tests", "emulator", "fleet_emulator.py")
SIDECAR = os.path.join(ROOT, "build", "flower-sidecar")
ROUNDS = 3


def say(msg):
    print("\033[1m== %s\033[0m" % msg, flush=True)


def main():
    work = tempfile.mkdtemp(prefix="flower-sidecar-demo-")
    group = procs.ProcGroup(work)
    link_port, sidecar_port, admin_port = procs.free_port(), procs.free_port(), procs.free_port()
    tls_dir = os.path.join(work, "tls")
    stats_file = os.path.join(work, "superlink-stats.json")
    ok = False
    try:
        say("SuperLink (Fleet emulator), h2c on 127.0.0.1:%d" % link_port)
        link = group.start("superlink", [PY, EMU, "superlink", "--listen", "127.0.0.1:%d" % link_port,
                                         "--nodes", "2", "--rounds", str(ROUNDS), "--stats-file", stats_file,
                                         "--exit-when-done", "--done-grace", "2"])
        procs.wait_port("127.0.0.1", link_port, 15, proc=link)

        say("flower-sidecar link on 127.0.0.1:%d (TLS, CA generated in %s)" % (sidecar_port, tls_dir))
        sidecar = group.start("sidecar", [SIDECAR, "link", "--listen", "127.0.0.1:%d" % sidecar_port,
                                          "--upstream", "127.0.0.1:%d" % link_port,
                                          "--admin", "127.0.0.1:%d" % admin_port, "--tls-dir", tls_dir])
        procs.wait_port("127.0.0.1", sidecar_port, 10, proc=sidecar)

        say("two SuperNodes over TLS to localhost:%d, trusting %s/ca.pem" % (sidecar_port, tls_dir))
        nodes = []
        for i in range(2):
            nodes.append(group.start("supernode-%d" % i, [
                PY, EMU, "supernode", "--upstream", "localhost:%d" % sidecar_port,
                "--root-cert", os.path.join(tls_dir, "ca.pem"), "--poll-interval", "0.2",
                "--heartbeat-interval", "10", "--rounds", str(ROUNDS),
                "--summary-file", os.path.join(work, "supernode-%d.json" % i)]))
        for n in nodes:
            rc = procs.wait_exit(n, 120)
            if rc != 0:
                raise RuntimeError("a SuperNode failed (exit %d):\n%s" % (rc, procs.tail(group.log_path("supernode-0"))))
        procs.wait_exit(link, 30)

        say("flower-sidecar stops on SIGTERM (drain)")
        rc = procs.stop(sidecar, 15)
        print("sidecar exit code:", rc)

        say("the sidecar's event log (NDJSON, one event per line)")
        with open(group.log_path("sidecar")) as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        for l in lines:
            print(l)
        events = [json.loads(l) for l in lines if l.startswith("{")]

        with open(stats_file) as f:
            stats = json.load(f)
        say("what the SuperLink saw through the sidecar")
        print(json.dumps({k: stats[k] for k in ("calls", "rounds_completed") if k in stats}, indent=1))
        names = [e["event"] for e in events]
        ok = (rc == 0 and stats.get("done") and names.count("conn.open") >= 2
              and "upstream.up" in names and not any(e["level"] == "error" for e in events))
    except Exception as e:  # the demo's whole point is to say what failed
        print("demo failed:", e, file=sys.stderr)
        print(group.logs(), file=sys.stderr)
    finally:
        group.stop_all()
    say("demo %s (logs in %s)" % ("OK" if ok else "FAILED", work))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
