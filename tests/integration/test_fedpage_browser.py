"""The federation page (GET / on the admin port) in a real browser: Debian's
headless `chromium`, driven over the DevTools protocol (tests/integration/
headless.py), loads the page from a link sidecar while an emulated Flower
federation runs through it, and the test reads what the browser rendered.

    make all && /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_fedpage_browser.py

One federation for the module: an emulated SuperLink (3 nodes, 3 rounds of
train + evaluate) that stays up after its rounds, a link sidecar with TLS,
and three emulated SuperNodes whose replies carry MetricRecords.  Node n2
dies after its 2nd reply (heartbeat interval 2 s): round 2 waits about 4 s
for it before the SuperLink counts it offline, so the page has an unfinished
run to show for at least two of its 2 s polls.  The page is loaded before
the nodes start; its DOM is sampled every 0.25 s while they run; once the
run is over and the sidecar has said node.offline, the state no longer
changes and the DOM must match /v1/federation and what the emulator counted:
node count and states, rounds, one curve point per round.  Screenshots in
light and dark mode, desktop and phone width, the DOM, the document and the
browser's console go under the test's tmp_path and build/test-output/
fedpage-browser/.  The browser must log no console error, no uncaught
exception, no failed request, and fetch nothing but the page and its JSON.

Skipped, with the reason, where `chromium` is not installed (`make deps`
installs it).  FS_SIDECAR_BIN=build/flower-sidecar-asan runs it against
the sanitized build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import procs
from conftest import HOST, PY, SLOW, Sidecar, check_clean_exit, wait_for
from headless import Chromium, find_chromium

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = str(ROOT / "tests" / "emulator" / "fleet_emulator.py")
OUT = ROOT / "build" / "test-output" / "fedpage-browser"

pytestmark = [
    pytest.mark.xdist_group("test_fedpage_browser"),
    pytest.mark.skipif(not find_chromium(), reason="chromium (Debian package) not installed: "
                       "the page is not checked in a browser; `make deps` installs it"),
]

NODES, ROUNDS = 3, 3
FAST_NODE = ["--poll-interval", "0.1", "--max-retry-wait", "0.2"]
RUN_TIMEOUT = 40 * SLOW
PAGE_POLL_S = 2.0  # the page's own poll interval (POLL_MS)

# What the page shows, read from its DOM in one go.
DOM = r"""(() => {
  const q = (s, root) => Array.from((root || document).querySelectorAll(s));
  const txt = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
  const upd = document.getElementById("updated");
  const kv = q("#runinfo > div").map((d) => d.textContent);
  const info = {};
  for (let i = 0; i + 1 < kv.length; i += 2) info[kv[i]] = kv[i + 1];
  const curves = {};
  q("svg.curve-svg").forEach((s) => {
    curves[s.dataset.key] = {
      points: q("circle.pt", s).map((c) => [c.dataset.type, +c.dataset.round, +c.getAttribute("cy"),
                                              c.getAttribute("fill")]),
      lines: q("polyline", s).map((p) => [p.getAttribute("stroke"), p.getAttribute("points").trim().split(/\s+/).length]),
    };
  });
  return {
    updated_ms: upd && upd.dateTime ? Date.parse(upd.dateTime) : null,
    health: txt("health"), upstream: txt("upstream"), err: txt("err"),
    nodecount: txt("nodecount"), legend: q("#nodelegend > span").map((e) => e.textContent),
    topo: q("#topo-svg circle.node").map((c) => [c.dataset.node, c.getAttribute("class")]),
    nodes: q("#nodes tbody tr").map((tr) => Array.from(tr.cells, (td) => td.textContent)),
    runinfo: info,
    phases: q("#timeline-svg rect.phase").map((r) => [+r.dataset.round, r.dataset.type, +r.getAttribute("fill-opacity")]),
    rounds: q("#rounds tbody tr").map((tr) => Array.from(tr.cells, (td) => td.textContent)),
    curves: curves,
  };
})()"""

# Colours and geometry that decide whether the page is readable.
LOOK = r"""(() => {
  const cs = (e) => getComputedStyle(e);
  const rgb = (s) => (s.match(/[\d.]+/g) || []).slice(0, 3).map(Number);
  const sec = Array.from(document.querySelectorAll("section"));
  const texts = [];
  document.querySelectorAll("svg").forEach((svg) => {
    const box = svg.getBoundingClientRect();
    svg.querySelectorAll("text").forEach((t) => {
      const r = t.getBoundingClientRect();
      texts.push({svg: svg.id || svg.dataset.key, text: t.textContent, height: r.height,
                  inside: r.left >= box.left - 0.5 && r.right <= box.right + 0.5 &&
                          r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5});
    });
  });
  return {
    bg: rgb(cs(document.body).backgroundColor), fg: rgb(cs(document.body).color),
    card: rgb(cs(sec[0]).backgroundColor), svgText: rgb(cs(document.querySelector("#topo-svg text")).fill),
    badges: ["health", "upstream"].map((id) => {
      const e = document.getElementById(id);
      return {text: e.textContent, fg: rgb(cs(e).color), bg: rgb(cs(e).backgroundColor)};
    }),
    width: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
    sectionsRight: Math.max.apply(null, sec.map((s) => s.getBoundingClientRect().right)),
    curveWidths: Array.from(document.querySelectorAll("svg.curve-svg"), (s) => s.getBoundingClientRect().width),
    texts: texts,
  };
})()"""


def http(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as r:
        assert r.status == 200
        return r.read()


def luminance(rgb: list) -> float:
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: list, b: list) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


class Live:
    """The federation, the sidecar and the browser watching its page."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.group = procs.ProcGroup(str(tmp))
        self.sc: Sidecar | None = None
        self.browser: Chromium | None = None
        self.samples: list[tuple[float, dict]] = []  # (monotonic, DOM), each change once
        self.timings: dict[str, float] = {}

    def run(self) -> "Live":
        t0 = time.monotonic()
        port = procs.free_port(HOST)
        self.stats_path = self.tmp / "superlink.json"
        link = self.group.start("superlink", [
            PY, EMULATOR, "superlink", "--listen", f"{HOST}:{port}", "--stats-file", str(self.stats_path),
            "--nodes", str(NODES), "--rounds", str(ROUNDS)])
        procs.wait_port(HOST, port, timeout=20, proc=link)
        self.sc = Sidecar(self.tmp, "link", ["--upstream", f"{HOST}:{port}"], tls=True)
        self.sc.start()
        self.url = f"http://{HOST}:{self.sc.admin_port}/"

        # The browser loads the page before any node exists.
        self.browser = Chromium(self.tmp / "chromium").start()
        self.timings["browser_start_s"] = time.monotonic() - t0
        self.browser.navigate(self.url)
        self.sample(wait=lambda d: d["updated_ms"] and d["health"] == "SERVING", what="the first rendering")

        ca = str(self.sc.tls_dir / "ca.pem")
        self.node_names = [f"n{i}" for i in range(NODES)]
        for name in self.node_names:
            extra = ["--vanish-after", "2", "--heartbeat-interval", "2"] if name == "n2" else []
            self.group.start(name, [
                PY, EMULATOR, "supernode", "--upstream", f"localhost:{self.sc.port}", "--root-cert", ca,
                "--summary-file", str(self.tmp / f"{name}.json"), "--rounds", str(ROUNDS), *FAST_NODE, *extra])
        nodes = [self.group.procs[n] for n in self.node_names]
        deadline = time.monotonic() + RUN_TIMEOUT
        # While the federation runs: what the page shows, as it changes.
        while True:
            self.sample()
            if all(p.poll() is not None for p in nodes) and self.superlink_done() and \
                    self.sc.events.find("node.offline"):
                break
            assert time.monotonic() < deadline, "the federation did not finish\n" + self.logs()
            assert link.poll() is None, "the SuperLink exited\n" + self.logs()
            time.sleep(0.25)
        self.timings["run_s"] = time.monotonic() - t0
        # Over: nothing changes any more but the clock.  The page's next
        # poll renders a document at least as new as this one.
        self.final = json.loads(http(self.sc.admin_port, "/v1/federation"))
        self.final_dom = self.sample(wait=lambda d: d["updated_ms"] and d["updated_ms"] >= self.final["now_ms"],
                                     what="a rendering of the finished run", timeout=3 * PAGE_POLL_S + 5 * SLOW)
        self.timings["final_render_s"] = time.monotonic() - t0
        self.stats = json.loads(self.stats_path.read_text())
        self.summaries = {n: json.loads((self.tmp / f"{n}.json").read_text()) for n in self.node_names}
        return self

    def superlink_done(self) -> bool:
        try:
            return json.loads(self.stats_path.read_text()).get("done", False)
        except (OSError, ValueError):
            return False

    def sample(self, wait=None, what: str = "", timeout: float = 10 * SLOW) -> dict:
        """The DOM now (kept if it changed); with wait, polls until wait(DOM)."""
        deadline = time.monotonic() + timeout
        while True:
            dom = self.browser.eval(DOM)
            if not self.samples or _content(self.samples[-1][1]) != _content(dom):
                self.samples.append((time.monotonic(), dom))
            if wait is None or wait(dom):
                return dom
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}; the page shows "
                                     f"{json.dumps(dom)[:1500]}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        out = self.group.logs(20)
        if self.sc:
            out += "\n" + self.sc.logs(20)
        if self.browser:
            out += "\n--- chromium console ---\n" + "\n".join(self.browser.console()[-20:])
        return out

    def save(self, name: str, data: bytes | str) -> Path:
        """Under the test's tmp dir, and a copy in build/test-output/."""
        path = self.tmp / "out" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, OUT / name)
        return path

    def stop(self) -> None:
        try:
            if self.browser:
                self.browser.close()
                left = self.browser.pids()
                assert not left, f"chromium processes left: {left}"
        finally:
            self.group.stop_all()
            if self.sc and self.sc.proc:
                check_clean_exit(self.sc)


def _content(dom: dict) -> dict:
    """A DOM sample without what changes with the clock alone."""
    d = dict(dom, updated_ms=None)
    d["nodes"] = [row[:3] + row[4:] for row in dom["nodes"]]  # "last seen ... ago"
    d["runinfo"] = {k: v for k, v in dom["runinfo"].items() if k != "current"}
    return d


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    subprocess.run(["make", "-s", "-C", str(ROOT), "proto-py"], check=True, timeout=120)
    lv = Live(tmp_path_factory.mktemp("fedpage-browser"))
    try:
        lv.run()
        yield lv
    finally:
        lv.stop()


# --------------------------------------------------------------------- tests


def test_page_followed_the_run(live):
    """Loaded before the first node, the page showed the rounds and the
    training curve grow while the federation ran, without a reload."""
    first = live.samples[0][1]
    assert first["nodes"] == [] and first["phases"] == [] and first["curves"] == {}, first
    total = len(live.final["runs"][0]["rounds"])
    phases_seen = [len(d["phases"]) for _, d in live.samples]
    assert phases_seen == sorted(phases_seen), phases_seen
    # Round 2 waited ~4 s for the dead node: two of the page's polls at least.
    assert any(0 < n < total for n in phases_seen), phases_seen
    train_points = [sum(1 for p in d["curves"].get("train_loss", {}).get("points", []) if p[0] == "train")
                    for _, d in live.samples]
    assert train_points == sorted(train_points) and len(set(train_points)) >= 3, train_points
    n2 = live.summaries["n2"]["node_id"]
    n2_states = []
    for _, d in live.samples:
        st = {row[0]: row[1] for row in d["nodes"]}.get(n2)
        if st and (not n2_states or n2_states[-1] != st):
            n2_states.append(st)
    # Forward only (a 2 s poll may miss the 2 s it was late), ending offline.
    order = ["active", "late", "offline"]
    assert n2_states == sorted(n2_states, key=order.index) and n2_states[-1] == "offline", n2_states
    assert all(d["err"] == "" for _, d in live.samples), [d["err"] for _, d in live.samples]
    live.save("samples.json", json.dumps({"timings_s": {k: round(v, 2) for k, v in live.timings.items()}, "samples": [
        {"t": round(t - live.samples[0][0], 2), "phases": len(d["phases"]), "train_points": tp,
         "nodes": [r[:2] for r in d["nodes"]]} for (t, d), tp in zip(live.samples, train_points)]}, indent=1))


def test_page_shows_the_federation(live):
    """The finished run as rendered: the emulator's nodes, the rounds of
    /v1/federation, one curve point per round for each metric key."""
    dom, doc, st = live.final_dom, live.final, live.stats
    assert (dom["health"], dom["upstream"]) == ("SERVING", "up")
    # Nodes: the emulator's, in the states the document gives.
    ids = {sm["node_id"] for sm in live.summaries.values()}
    states = {n["node_id"]: n["state"] for n in doc["nodes"]}
    assert set(states) == ids and len(ids) == NODES
    assert dom["nodecount"] == f"({NODES})"
    assert sorted(n for n, _ in dom["topo"]) == sorted(ids)
    assert {n: cls.split()[-1] for n, cls in dom["topo"]} == {n: "s-" + s for n, s in states.items()}
    assert {row[0]: row[1] for row in dom["nodes"]} == states
    assert states[live.summaries["n2"]["node_id"]] == "offline"
    counts = doc["node_counts"]
    assert dom["legend"] == [f"{k} {counts[k]}" for k in ("active", "late", "offline", "deactivated")]
    for row in dom["nodes"]:
        n = next(x for x in doc["nodes"] if x["node_id"] == row[0])
        assert row[2] == n["peer"] and row[4:6] == [str(n["calls"]), str(n["errors"])], (row, n)
    # Rounds: the document's, which are the SuperLink's.
    run = doc["runs"][0]
    assert run["run_id"] == st["run_id"] and dom["runinfo"]["run_id"] == run["run_id"]
    phases = [(p["round"], p["message_type"]) for p in run["rounds"]]
    assert phases == [(r["round"], r["message_type"]) for r in st["rounds"]]
    assert len(phases) == 2 * ROUNDS
    assert [(r, t) for r, t, _ in dom["phases"]] == phases
    assert all(op > 0.5 for _, _, op in dom["phases"])  # all closed: drawn solid
    assert dom["runinfo"]["rounds"].split()[0] == str(ROUNDS), dom["runinfo"]
    rows = [(int(r[0]), r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in dom["rounds"]]
    assert rows == [(p["round"], p["message_type"], p["nodes"], p["replies"], p["errors"], p["missing"])
                    for p in reversed(run["rounds"])]
    # Curves: one per metric key with numbers, one point per round and type.
    keys = [k for k in run["metric_keys"] if any(k in p["metrics"] for p in run["rounds"])]
    assert "train_loss" in keys and sorted(dom["curves"]) == sorted(keys)
    for key in keys:
        want = [(p["message_type"], p["round"], p["metrics"][key]["mean"]) for p in run["rounds"]
                if key in p["metrics"]]
        got = dom["curves"][key]["points"]
        assert [(t, r) for t, r, _, _ in got] == sorted(((t, r) for t, r, _ in want),
                                                         key=lambda x: ([p[0] for p in want].index(x[0]), x[1]))
        assert sum(n for _, n in dom["curves"][key]["lines"]) == len(want)
        # The points' heights are the means, on one linear scale per chart.
        ys = [m for _, _, m in want]
        if max(ys) > min(ys):
            by = {(t, r): cy for t, r, cy, _ in got}
            top, bottom = by[max(want, key=lambda w: w[2])[:2]], by[min(want, key=lambda w: w[2])[:2]]
            assert top < bottom
            for t, r, m in want:
                frac = (by[(t, r)] - top) / (bottom - top)
                assert abs(frac - (max(ys) - m) / (max(ys) - min(ys))) < 0.01, (key, t, r, m, frac)
    train = [(r, cy) for t, r, cy, _ in dom["curves"]["train_loss"]["points"] if t == "train"]
    assert [r for r, _ in train] == list(range(1, ROUNDS + 1))
    live.save("federation.json", json.dumps(doc, indent=1))
    live.save("dom.html", live.browser.eval("document.documentElement.outerHTML"))


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_page_looks_right(live, scheme, device):
    """Light and dark mode, desktop and a phone's 390 px: readable colours,
    nothing wider than the screen, a screenshot of each."""
    b = live.browser
    if device == "phone":
        b.viewport(390, 844, mobile=True, scale=2)
    else:
        b.viewport(1280, 900)
    b.color_scheme(scheme)
    try:
        width = 390 if device == "phone" else 1280
        # The page redraws its drawings for the new width (on resize, or at
        # its next poll): the timeline's user units are CSS pixels again.
        look = b.wait_eval(f"""(() => {{
            const l = {LOOK};
            const tl = document.getElementById("timeline-svg");
            const drawn = tl ? +tl.getAttribute("viewBox").split(" ")[2] : 0;
            return l.width === {width} && Math.abs(tl.getBoundingClientRect().width - drawn) <= 1 && l;
          }})()""", timeout=3 * PAGE_POLL_S, what=f"the page drawn for the {device} viewport")
        dark = luminance(look["bg"]) < 0.1
        assert dark == (scheme == "dark"), look
        assert (luminance(look["card"]) < 0.1) == dark, look
        assert contrast(look["fg"], look["bg"]) >= 7 and contrast(look["fg"], look["card"]) >= 7, look
        assert contrast(look["svgText"], look["card"]) >= 7, look
        for badge in look["badges"]:  # WCAG AA for small text
            assert contrast(badge["fg"], badge["bg"]) >= 4.5, badge
        # The drawings' text: as large on a phone as on a desktop, none cut off.
        assert len(look["texts"]) > 20, look["texts"]
        assert all(t["height"] >= 10 for t in look["texts"]), [t for t in look["texts"] if t["height"] < 10]
        assert all(t["inside"] for t in look["texts"]), [t for t in look["texts"] if not t["inside"]]
        # Nothing sticks out sideways: the page does not scroll horizontally.
        assert look["scrollWidth"] <= look["width"] and look["sectionsRight"] <= look["width"], look
        assert all(w >= 250 for w in look["curveWidths"]), look
        png = b.screenshot()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        live.save(f"{device}-{scheme}.png", png)
    finally:
        b.viewport(1280, 900)
        b.send("Emulation.clearDeviceMetricsOverride")
        b.color_scheme("light")


def test_browser_saw_no_errors(live):
    """Console: no error, no uncaught exception; network: the page and its
    JSON only, every answer 200 (no favicon.ico 404 either)."""
    b = live.browser
    live.save("console.log", "\n".join(b.console() + [f"{s} {u}" for u, s in b.requests()]) + "\n")
    assert b.problems() == [], b.problems()
    reqs = b.requests()
    assert {u for u, _ in reqs} == {live.url, live.url + "v1/federation"}, reqs
    assert all(s == 200 for _, s in reqs), reqs
    polls = sum(1 for u, _ in reqs if u.endswith("/v1/federation"))
    elapsed = live.samples[-1][0] - live.samples[0][0]
    assert polls >= elapsed / PAGE_POLL_S - 1, (polls, elapsed)
