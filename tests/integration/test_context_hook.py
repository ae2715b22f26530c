"""The OpenNebula contextualization hook (deploy/opennebula/one-context-hook).

Golden tests: sample one_env files (tests/integration/context/CASE/one_env,
as one-context writes them) to the files the hook writes, compared line by
line with the expected ones next to them (@CA@, @CERT@, @KEY@: base64 of
PEMs made for the run; @ONE_ENV@, @TOKEN@: paths of the run).  Invalid
input: one line naming the variable and the value (never a key's), exit 2,
nothing written and an earlier file left as it was.  Then the sidecar
started from the written files (addresses moved to free loopback ports by
flags, which win) really serves calls, end to end with real TLS.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

import procs
from conftest import HOST, ROOT, SIDECAR, make_ca, make_server_cert, unary, wait_for, listening

HOOK = ROOT / "deploy" / "opennebula" / "one-context-hook"
CASES = Path(__file__).parent / "context"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("hook-pki")
    ca = make_ca(d, cn="Appliance CA")
    cert = make_server_cert(d, ca)
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return {"dir": d, "ca": ca, "cert": cert, "@CA@": b64(ca[0]), "@CERT@": b64(cert[0]), "@KEY@": b64(cert[1])}


def run_hook(tmp: Path, one_env_text: str, extra_env: dict | None = None, systemd: str = "no"):
    """Runs the hook on |one_env_text| with every path inside |tmp|."""
    (tmp / "etc").mkdir(exist_ok=True)
    one_env = tmp / "one_env"
    one_env.write_text(one_env_text)
    token = tmp / "token.txt"
    token.write_text("c2VjcmV0LXRva2Vu\n")
    env = {"PATH": os.environ["PATH"], "ONE_ENV": str(one_env), "DEFAULTS": str(tmp / "no-defaults"),
           "CONF_DIR": str(tmp / "etc"), "RUN_DIR": str(tmp / "run"), "TOKEN_FILE": str(token), "SYSTEMD": systemd}
    env.update(extra_env or {})
    return subprocess.run(["/bin/sh", str(HOOK)], capture_output=True, text=True, env=env, timeout=30)


def subst(text: str, pki, tmp: Path) -> str:
    for k in ("@CA@", "@CERT@", "@KEY@"):
        text = text.replace(k, pki[k])
    return text.replace("@ONE_ENV@", str(tmp / "one_env")).replace("@TOKEN@", str(tmp / "token.txt"))


def env_of(path: Path) -> dict:
    """An EnvironmentFile= (KEY=VALUE lines, # comments) as a dict."""
    out = {}
    for ln in path.read_text().splitlines():
        if ln and not ln.startswith("#"):
            k, v = ln.split("=", 1)
            out[k] = v
    return out


GOLDEN = ["link-auto-tls", "link-operator-pems", "node-static", "node-onegate", "appliance-defaults"]


@pytest.mark.parametrize("case", GOLDEN)
def test_golden(case, pki, tmp_path):
    src = CASES / case
    r = run_hook(tmp_path, subst((src / "one_env").read_text(), pki, tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stdout + r.stderr
    written = {"context.env": tmp_path / "etc" / "context.env", "superlink.env": tmp_path / "etc" / "superlink.env",
               "onegate.conf": tmp_path / "run" / "flower-sidecar@.service.d" / "onegate.conf"}
    for name, path in written.items():
        expected = src / name
        if not expected.exists():
            assert not path.exists(), f"{name} written, but the case expects none"
            continue
        assert path.read_text().splitlines() == subst(expected.read_text(), pki, tmp_path).splitlines(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{name} is not mode 0600"
    assert not [p for p in (tmp_path / "etc").iterdir() if p.name.startswith(".")], "a temporary file is left"


def test_pem_paths_are_inlined_as_base64(pki, tmp_path):
    """The daemon runs as a dynamic user that cannot read root's key files:
    a PEM given as a path travels as base64 in the 0600 settings file."""
    one_env = (f'export FL_TLS_ENABLED="YES"\nexport FL_FLEET_API_ADDRESS="0.0.0.0:9092"\n'
               f'export FL_SSL_CA_CERTFILE="{pki["ca"][0]}"\nexport FL_SSL_CERTFILE="{pki["cert"][0]}"\n'
               f'export FL_SSL_KEYFILE="{pki["cert"][1]}"\n')
    r = run_hook(tmp_path, one_env)
    assert r.returncode == 0, r.stderr
    env = env_of(tmp_path / "etc" / "context.env")
    assert env["FL_SSL_CERTFILE"] == pki["@CERT@"] and env["FL_SSL_KEYFILE"] == pki["@KEY@"]
    assert env["FL_SSL_CA_CERTFILE"] == pki["@CA@"]


# (id, one_env, variable named, value shown (None: must not appear))
INVALID = [
    ("tls-enabled", 'export FL_SIDECAR_ROLE="link"\nexport FL_TLS_ENABLED="maybe"\n', "FL_TLS_ENABLED", "maybe"),
    ("fleet-address", 'export FL_FLEET_API_ADDRESS="0.0.0.0"\n', "FL_FLEET_API_ADDRESS", "0.0.0.0"),
    ("fleet-address-port", 'export FL_FLEET_API_ADDRESS="0.0.0.0:99999"\n', "FL_FLEET_API_ADDRESS", "0.0.0.0:99999"),
    ("fleet-address-taken", 'export FL_FLEET_API_ADDRESS="127.0.0.1:9192"\n', "FL_FLEET_API_ADDRESS", "127.0.0.1:9192"),
    ("superlink-address", 'export FL_SUPERLINK_ADDRESS="superlink"\n', "FL_SUPERLINK_ADDRESS", "superlink"),
    ("role", 'export FL_SIDECAR_ROLE="coordinator"\n', "FL_SIDECAR_ROLE", "coordinator"),
    ("no-role", 'export FL_LOG_LEVEL="INFO"\n', "FL_SIDECAR_ROLE", None),
    ("node-without-upstream", 'export FL_SIDECAR_ROLE="node"\n', "FL_SUPERLINK_ADDRESS", None),
    ("log-format", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_LOG_FORMAT="xml"\n', "FL_LOG_FORMAT", "xml"),
    ("log-level", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_LOG_LEVEL="LOUD"\n', "FL_LOG_LEVEL", "LOUD"),
    ("metrics", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_METRICS_ENABLED="si"\n',
     "FL_METRICS_ENABLED", "si"),
    ("keepalive", 'export FL_SUPERLINK_ADDRESS="10.0.0.5:9092"\nexport FL_GRPC_KEEPALIVE_TIME="-5"\n',
     "FL_GRPC_KEEPALIVE_TIME", "-5"),
    ("backoff", 'export FL_SUPERLINK_ADDRESS="10.0.0.5:9092"\nexport FL_EDGE_BACKOFF_MAX="0"\n',
     "FL_EDGE_BACKOFF_MAX", "0"),
    ("admin", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_SIDECAR_ADMIN="9099"\n', "FL_SIDECAR_ADMIN", "9099"),
    ("ca-not-pem", 'export FL_SUPERLINK_ADDRESS="10.0.0.5:9092"\nexport FL_TLS_ENABLED="YES"\n'
     'export FL_SSL_CA_CERTFILE="bm90IGEgY2VydGlmaWNhdGU="\n', "FL_SSL_CA_CERTFILE", "bm90IGEgY2VydGlmaWNhdGU="),
    ("ca-missing-file", 'export FL_SUPERLINK_ADDRESS="10.0.0.5:9092"\nexport FL_TLS_ENABLED="YES"\n'
     'export FL_SSL_CA_CERTFILE="/nonexistent/ca.pem"\n', "FL_SSL_CA_CERTFILE", "/nonexistent/ca.pem"),
    ("key-not-pem", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_TLS_ENABLED="YES"\n'
     'export FL_SSL_CERTFILE="@CERT@"\nexport FL_SSL_KEYFILE="c2VjcmV0IGtleSBtYXRlcmlhbA=="\n', "FL_SSL_KEYFILE", None),
    ("key-without-cert", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_TLS_ENABLED="YES"\n'
     'export FL_SSL_KEYFILE="@KEY@"\n', "FL_SSL_CERTFILE", None),
    ("link-ca-without-cert", 'export FL_FLEET_API_ADDRESS="0.0.0.0:9092"\nexport FL_TLS_ENABLED="YES"\n'
     'export FL_SSL_CA_CERTFILE="@CA@"\n', "FL_SSL_CA_CERTFILE", None),
    ("onegate-endpoint", 'export FL_SIDECAR_ROLE="node"\nexport ONEGATE_ENDPOINT="192.168.0.1:5030"\n'
     'export VMID="4"\n', "ONEGATE_ENDPOINT", "192.168.0.1:5030"),
    ("vmid", 'export FL_SIDECAR_ROLE="node"\nexport ONEGATE_ENDPOINT="http://192.168.0.1:5030"\n'
     'export VMID="four"\n', "VMID", "four"),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_input_writes_nothing(case, pki, tmp_path):
    name, one_env, variable, shown = case
    previous = "# the settings of the last good boot\nFL_SIDECAR_ROLE=link\n"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "context.env").write_text(previous)
    r = run_hook(tmp_path, subst(one_env, pki, tmp_path))
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and variable in lines[0], lines
    if shown is not None:
        assert f"'{shown}'" in lines[0], lines
    for secret in (pki["@KEY@"], "c2VjcmV0IGtleSBtYXRlcmlhbA=="):
        assert secret[:16] not in r.stdout + r.stderr, "a key was printed"
    assert (tmp_path / "etc" / "context.env").read_text() == previous, "the earlier file was changed"
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["context.env"], "a file was written"
    assert not (tmp_path / "run").exists()


def test_enables_and_starts_the_role_when_systemd_runs(pki, tmp_path):
    """With systemd, the hook enables flower-sidecar@ROLE, disables the other
    role and restarts without blocking the boot.  systemctl is the one
    program here that is replaced (it needs systemd as PID 1): a script that
    records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bindir / "systemctl").chmod(0o755)
    r = run_hook(tmp_path, 'export FL_SUPERLINK_ADDRESS="10.0.0.5:9092"\n',
                 {"PATH": f"{bindir}:{os.environ['PATH']}"}, systemd="yes")
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines() == [
        "daemon-reload", "disable --now flower-sidecar@link.service", "enable flower-sidecar@node.service",
        "restart --no-block flower-sidecar@node.service"]


def _start(argv, env_file: Path, tmp: Path, name: str, ready_port: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    env.update(env_of(env_file))
    out = open(tmp / f"{name}.out", "wb")
    p = subprocess.Popen([SIDECAR, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: p.poll() is not None or listening(ready_port), 10, f"{name} listening")
    assert p.poll() is None, (tmp / f"{name}.out").read_text()
    return p


def _stop(*procs_):
    for p in procs_:
        p.terminate()
    for p in procs_:
        assert p.wait(timeout=20) == 0


def test_written_files_start_sidecars_that_serve(pki, echo, tmp_path):
    """The files of link-operator-pems and node-static, each given to a
    sidecar (listen/admin/upstream moved to free loopback ports by flags):
    a grpcio call through node (h2c in, TLS out, CA from its file) and link
    (the operator certificate from its file) reaches the upstream."""
    link_dir, node_dir = tmp_path / "link", tmp_path / "node"
    for d, case in ((link_dir, "link-operator-pems"), (node_dir, "node-static")):
        d.mkdir()
        r = run_hook(d, subst((CASES / case / "one_env").read_text(), pki, d))
        assert r.returncode == 0, r.stderr
    lp, la, np_, na = (procs.free_port() for _ in range(4))
    link = _start(["link", "--listen", f"{HOST}:{lp}", "--admin", f"{HOST}:{la}", "--upstream", echo.address,
                   "--tls-dir", str(tmp_path / "unused")], link_dir / "etc" / "context.env", tmp_path, "link", lp)
    node = _start(["node", "--listen", f"{HOST}:{np_}", "--admin", f"{HOST}:{na}", "--upstream", f"{HOST}:{lp}"],
                  node_dir / "etc" / "context.env", tmp_path, "node", np_)
    try:
        import grpc
        with grpc.insecure_channel(f"{HOST}:{np_}") as ch:
            assert unary(ch, "Unary", b"from the CONTEXT") == b"from the CONTEXT"
    finally:
        _stop(node, link)
    assert "client_cert=" in (tmp_path / "link.out").read_text()  # text logs, as the appliances' default
    assert not (tmp_path / "unused").exists()


def test_written_auto_tls_file_starts_a_serving_link(echo, pki, tmp_path):
    r = run_hook(tmp_path, (CASES / "link-auto-tls" / "one_env").read_text())
    assert r.returncode == 0, r.stderr
    lp, la = procs.free_port(), procs.free_port()
    tls_dir = tmp_path / "tls"
    link = _start(["link", "--listen", f"{HOST}:{lp}", "--admin", f"{HOST}:{la}", "--upstream", echo.address,
                   "--tls-dir", str(tls_dir)], tmp_path / "etc" / "context.env", tmp_path, "auto", lp)
    try:
        import grpc
        creds = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{lp}", creds) as ch:
            assert unary(ch, "Unary", b"auto") == b"auto"
    finally:
        _stop(link)
