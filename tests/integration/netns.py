"""Two network namespaces joined by a veth pair, and real faults on that link.

Used by test_node_faults.py (root only):

    topo = Topology.create()          # fsA-<pid>-<n> and fsB-<pid>-<n>
    topo.argv("a", cmd...)            # ["ip", "netns", "exec", NS_A, cmd...]
    topo.blackhole()                  # silent: every packet dropped both ways
    topo.loss(20)                     # 20 % of packets dropped, both ways
    topo.rate(4000, 200)              # 4 Mbit/s each way, up to 200 ms queued
    topo.clear()                      # the link is clean again
    topo.destroy()                    # namespaces (and so the veth pair) gone

Faults are nftables `netdev` tables with an ingress chain hooked on each veth
end, inside that end's namespace (this kernel has no sch_netem).  A blackhole
is `policy drop`; loss is a rule `numgen random mod 100 < N drop`.  Either
is removed by deleting the table.  A slow link is a `tbf` qdisc on each
veth end (egress): a bandwidth cap with a bounded queue, whose queueing
delay is real TCP round-trip time.  Nothing here touches the host's own
network namespace except to create the veth pair and move its ends away.

Names embed the test runner's PID; namespaces of runners that are no longer
alive (a run killed half-way) are removed by cleanup_stale().
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from typing import Sequence

IP = "/usr/sbin/ip"
NFT = "/usr/sbin/nft"
TC = "/usr/sbin/tc"
TABLE = "fsfault"   # the one nftables table a fault lives in, per namespace

_counter = itertools.count(1)
_NAME_RE = re.compile(r"^fs[AB]-(\d+)-\d+$")


def run(argv: Sequence[str], timeout: float = 10.0, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def is_root() -> bool:
    return os.geteuid() == 0


def cleanup_stale() -> list[str]:
    """Deletes fsA-/fsB- namespaces left by test runs whose process is gone."""
    r = run([IP, "netns", "list"], check=False)
    removed = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            run([IP, "netns", "del", name], check=False)
            removed.append(name)
    return removed


class Topology:
    """ns "a" (SuperLink side) and ns "b" (SuperNode side), one veth pair."""

    def __init__(self, n: int):
        pid = os.getpid()
        self.n = n
        self.ns = {"a": f"fsA-{pid}-{n}", "b": f"fsB-{pid}-{n}"}
        # Interface names: at most 15 characters, unique on the host while
        # both ends are still in the root namespace.
        tag = f"{pid % 1000000}{n % 100:02d}"
        self.dev = {"a": f"fsa{tag}", "b": f"fsb{tag}"}
        third = 1 + (pid * 7 + n) % 250
        self.addr = {"a": f"10.213.{third}.1", "b": f"10.213.{third}.2"}
        self.fault: str | None = None
        self.shaped: str | None = None  # the rate cap, if any
        self.created = False

    @classmethod
    def create(cls) -> "Topology":
        t = cls(next(_counter))
        try:
            t._create()
        except Exception:
            t.destroy()
            raise
        return t

    def _create(self) -> None:
        a, b = self.ns["a"], self.ns["b"]
        run([IP, "netns", "add", a])
        self.created = True
        run([IP, "netns", "add", b])
        run([IP, "link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"]])
        for side in ("a", "b"):
            ns, dev = self.ns[side], self.dev[side]
            run([IP, "link", "set", dev, "netns", ns])
            run([IP, "-n", ns, "addr", "add", f"{self.addr[side]}/30", "dev", dev])
            run([IP, "-n", ns, "link", "set", dev, "up"])
            run([IP, "-n", ns, "link", "set", "lo", "up"])

    def argv(self, side: str, *cmd: str) -> list[str]:
        """argv that runs cmd inside namespace |side| ("a" or "b").

        `ip netns exec` execs the command in place (no extra process), so the
        PID a Popen of this argv reports is the command's own."""
        return [IP, "netns", "exec", self.ns[side], *cmd]

    # -- faults --------------------------------------------------------------

    def _install(self, kind: str, rule: str, policy: str) -> None:
        self.clear()
        for side in ("a", "b"):
            lines = [f"table netdev {TABLE} {{",
                     " chain ingress {",
                     f"  type filter hook ingress device \"{self.dev[side]}\" priority 0; policy {policy};",
                     *([f"  {rule}"] if rule else []),
                     " }",
                     "}"]
            script = "\n".join(lines) + "\n"
            run(self.argv(side, NFT, "-f", "-"), input=script)
        self.fault = kind

    def blackhole(self) -> None:
        """Silently drops every packet arriving on either veth end."""
        self._install("blackhole", "", "drop")

    def loss(self, percent: int) -> None:
        """Drops |percent| % of the packets arriving on either end, at random."""
        assert 0 < percent < 100
        self._install(f"loss {percent}%", f"numgen random mod 100 < {percent} drop", "accept")

    def rate(self, kbit: int, queue_ms: int) -> None:
        """Caps each direction at |kbit| kbit/s with at most |queue_ms| of
        queue (packets beyond it are dropped), on top of any nftables fault."""
        for side in ("a", "b"):
            run(self.argv(side, TC, "qdisc", "replace", "dev", self.dev[side], "root", "tbf",
                          "rate", f"{kbit}kbit", "burst", "16kb", "latency", f"{queue_ms}ms"))
        self.shaped = f"{kbit} kbit/s"

    def clear(self) -> None:
        """Removes whatever fault and rate cap are installed (idempotent)."""
        if self.shaped:
            for side in ("a", "b"):
                run(self.argv(side, TC, "qdisc", "del", "dev", self.dev[side], "root"), check=False)
            self.shaped = None
        for side in ("a", "b"):
            r = run(self.argv(side, NFT, "list", "tables"), check=False)
            if TABLE in r.stdout:
                run(self.argv(side, NFT, "delete", "table", "netdev", TABLE))
        self.fault = None

    def ruleset(self, side: str) -> str:
        return run(self.argv(side, NFT, "list", "ruleset"), check=False).stdout

    def destroy(self) -> None:
        """Deletes both namespaces (and with them the veth pair and the faults).

        Stop the processes running inside first: a namespace lives on as long
        as a process is in it."""
        if not self.created:
            return
        for side in ("a", "b"):
            run([IP, "netns", "del", self.ns[side]], check=False)
        self.created = False
