#!/usr/bin/python3
"""Checks deploy/grafana/flower-sidecar.json (run by `make deploy-check`):

- it is JSON, a dashboard with unique panel ids, each panel with a type, a
  title, a grid position and at least one target with a PromQL expr;
- every expr parses: the exprs (Grafana's $__rate_interval / $instance
  variables replaced by what Grafana would put there) are written as
  recording rules to a rules file that `promtool check rules` must accept;
- every metric the dashboard (and the alert rules) query is one the README
  documents, so a renamed metric cannot leave a silent empty panel.

    /usr/bin/python3 tests/deploy/check_dashboard.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "flower-sidecar.json"
RULES = ROOT / "deploy" / "prometheus" / "flower-sidecar.rules.yml"
METRIC = re.compile(r"\b((?:flower_sidecar|grpc_server)_[a-z_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def fail(msg: str) -> None:
    print(f"check_dashboard: {msg}", file=sys.stderr)
    sys.exit(1)


def exprs(dash: dict) -> list[tuple[str, str]]:
    out, ids = [], set()
    if not isinstance(dash.get("panels"), list) or not dash["panels"]:
        fail("no panels")
    for p in dash["panels"]:
        for key in ("id", "type", "title", "gridPos", "targets"):
            if key not in p:
                fail(f"panel {p.get('title', p.get('id'))!r} has no {key}")
        if p["id"] in ids:
            fail(f"panel id {p['id']} twice")
        ids.add(p["id"])
        if not p["targets"]:
            fail(f"panel {p['title']!r} has no target")
        for t in p["targets"]:
            if not isinstance(t.get("expr"), str) or not t["expr"].strip():
                fail(f"panel {p['title']!r}: target without expr")
            out.append((p["title"], t["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$instance", ".*").replace("${instance}", ".*"))


def documented_metrics() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return set(METRIC.findall(readme))


def main() -> int:
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as e:
        fail(f"{DASHBOARD}: {e}")
    pairs = exprs(dash)
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "dashboard.rules.yml"
        lines = ["groups:", "  - name: dashboard", "    rules:"]
        for i, (_, e) in enumerate(pairs):
            lines += [f"      - record: dashboard:panel_expr_{i}", f"        expr: {json.dumps(grafana_to_promql(e))}"]
        rules.write_text("\n".join(lines) + "\n")
        r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            fail(f"promtool check rules on the dashboard's exprs:\n{r.stdout}{r.stderr}")
    docs = documented_metrics()
    used = set()
    for _, e in pairs:
        used |= set(METRIC.findall(e))
    used |= set(METRIC.findall(RULES.read_text()))
    missing = sorted(m for m in used if m not in docs and not any(
        m.endswith(s) and m[: -len(s)] in docs for s in SUFFIXES))
    if missing:
        fail(f"queried but not documented in README.md: {missing}")
    print(f"check_dashboard: {len(pairs)} exprs in {len(dash['panels'])} panels parse; "
          f"{len(used)} metrics queried, all documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
