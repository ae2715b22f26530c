"""deploy/prometheus/flower-sidecar.rules.yml only uses metrics the sidecar
really serves: every flower_sidecar_* name in the rules is a family on a
running link sidecar's /metrics (TLS on, so the certificate gauge is there),
or on a node sidecar's for the node-only ones.  promtool's unit tests of the
rules themselves run in `make alerts-check`."""

from __future__ import annotations

import re
import urllib.request

from conftest import HOST, ROOT


def families(port: int) -> set[str]:
    body = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    return set(re.findall(r"^# TYPE (flower_sidecar_\w+) ", body, re.M))


def test_every_metric_in_the_alert_rules_is_served(link):
    rules = (ROOT / "deploy" / "prometheus" / "flower-sidecar.rules.yml").read_text()
    used = set(re.findall(r"\b(flower_sidecar_\w+)", rules))
    assert len(used) >= 5, used
    served = families(link.admin_port)
    missing = sorted(used - served)
    assert not missing, f"the rules use metrics /metrics does not serve: {missing}"
    assert "flower_sidecar_build_info" in served
