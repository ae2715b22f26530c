"""flower-sidecar link: configuration errors.  A bad flag or variable is exit
code 2 with one line on stderr naming the flag or variable and the value
(README.md, "Flags"); --help exits 0 and documents every flag the parser knows.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

import procs
from conftest import HOST, ROOT, SIDECAR, SLOW


def run_sidecar(args, env=None, timeout=10):
    """Runs the binary to completion.  Every case also gets safe loopback
    addresses and a temporary --tls-dir (unless it tests those), so a
    wrongly accepted configuration starts a harmless sidecar that the
    timeout ends, instead of grabbing port 9092 or writing to /var/lib."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    e.update(env or {})
    try:
        r = subprocess.run([SIDECAR, *args], capture_output=True, text=True, env=e, timeout=timeout * SLOW)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it (by PID)
        raise AssertionError(f"{args} {env}: still running after {timeout} s: the configuration was accepted")
    return r


def safe(tmp_path, *skip):
    a = []
    if "--listen" not in skip:
        a += ["--listen", f"{HOST}:{procs.free_port()}"]
    if "--admin" not in skip:
        a += ["--admin", f"{HOST}:{procs.free_port()}"]
    if "--upstream" not in skip:
        a += ["--upstream", f"{HOST}:{procs.free_port()}"]
    return a + ["--tls-dir", str(tmp_path / "tls")]


VAR_FLAG = {"FL_SUPERLINK_ADDRESS": "--upstream", "FL_FLEET_API_ADDRESS": "--listen", "FL_SIDECAR_ADMIN": "--admin"}

# (id, args after the role (None: no role at all), env, strings the one line must contain)
BAD = [
    ("unknown-flag", ["--frobnicate"], {}, ["--frobnicate"]),
    ("unknown-flag-with-value", ["--frobnicate=3"], {}, ["--frobnicate"]),
    ("listen-nonsense", ["--listen", "nonsense"], {}, ["--listen", "nonsense"]),
    ("listen-bad-port", ["--listen", "127.0.0.1:99999"], {}, ["--listen", "127.0.0.1:99999"]),
    ("max-message-size-negative", ["--max-message-size", "-1"], {}, ["--max-message-size", "-1"]),
    ("max-message-size-junk", ["--max-message-size", "12Q"], {}, ["--max-message-size", "12Q"]),
    ("drain-timeout-junk", ["--drain-timeout", "soon"], {}, ["--drain-timeout", "soon"]),
    ("log-level-variable", [], {"FL_LOG_LEVEL": "LOUD"}, ["FL_LOG_LEVEL", "LOUD"]),
    ("tls-enabled-variable", [], {"FL_TLS_ENABLED": "maybe"}, ["FL_TLS_ENABLED", "maybe"]),
    ("superlink-address-variable", [], {"FL_SUPERLINK_ADDRESS": "no-port"}, ["FL_SUPERLINK_ADDRESS", "no-port"]),
    ("fleet-api-address-variable", [], {"FL_FLEET_API_ADDRESS": "0.0.0.0"}, ["FL_FLEET_API_ADDRESS", "0.0.0.0"]),
    ("admin-variable", [], {"FL_SIDECAR_ADMIN": "localhost:0"}, ["FL_SIDECAR_ADMIN", "localhost:0"]),
    ("require-client-cert-variable", [], {"FL_SIDECAR_REQUIRE_CLIENT_CERT": "sure"},
     ["FL_SIDECAR_REQUIRE_CLIENT_CERT", "sure"]),
    ("tls-ca-without-server-cert", ["--tls-ca", "/etc/hostname"], {}, ["--tls-ca", "/etc/hostname", "server certificate"]),
    ("tls-keyfile-variable-without-cert", [], {"FL_SSL_KEYFILE": "c2VjcmV0IGtleSBtYXRlcmlhbA=="},
     ["FL_SSL_KEYFILE", "not shown"]),
    ("tls-cert-without-key", ["--tls-cert", "/etc/hostname"], {}, ["--tls-cert", "/etc/hostname", "key"]),
    ("tls-key-without-cert", ["--tls-key", "/etc/hostname"], {}, ["--tls-key", "/etc/hostname", "certificate"]),
    ("tls-cert-unreadable", ["--tls-cert", "/nonexistent", "--tls-key", "/nonexistent-key"], {},
     ["--tls-cert", "/nonexistent"]),
    ("tls-keyfile-variable-garbage", ["--tls-cert", "/etc/hostname"], {"FL_SSL_KEYFILE": "bm90IGEgcGVt"},
     ["FL_SSL_KEYFILE", "not shown"]),
    ("bad-role", None, {}, ["role"]),
    ("missing-role", [], {}, ["role"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_configuration_is_exit_2_with_one_line(case, tmp_path):
    name, args, env, needles = case
    if name == "missing-role":
        argv = []
    elif name == "bad-role":
        argv = ["linky", *safe(tmp_path)]
    else:
        # a variable is read only when no flag gives its setting
        flags = [a for a in args if a.startswith("--")] + [VAR_FLAG[v] for v in env if v in VAR_FLAG]
        argv = ["link", *safe(tmp_path, *flags), *args]
    r = run_sidecar(argv, env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, f"exit {r.returncode}, stderr {r.stderr!r}"
    if name == "tls-keyfile-variable-without-cert":
        assert "c2VjcmV0" not in r.stdout + r.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    if name == "bad-role":
        assert "linky" in lines[0]


@pytest.mark.parametrize("how", ["cut", "bad-char"])
def test_a_malformed_key_is_never_echoed(how, tmp_path):
    """A private key given as base64 (FL_SSL_KEYFILE, OpenNebula text64) but
    malformed is refused without showing the value: even a broken base64 of
    a PEM key holds the key.  The line names the variable; no 12 characters
    of the value appear in anything the sidecar prints."""
    import base64
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    b64 = base64.b64encode(pem).decode()
    value = b64[:-3] if how == "cut" else b64[:40] + "*" + b64[41:]
    r = run_sidecar(["link", *safe(tmp_path), "--tls-cert", "/etc/hostname"], {"FL_SSL_KEYFILE": value})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "FL_SSL_KEYFILE" in lines[0], r.stderr
    out = r.stdout + r.stderr
    leaked = [value[i:i + 12] for i in range(0, len(value) - 12) if value[i:i + 12] in out]
    assert not leaked, f"the key's base64 appears in the output: {leaked[:3]}"


def test_bad_flag_is_not_saved_by_a_good_variable(tmp_path):
    # The flag wins over the variable, so a bad flag is the error even when
    # the variable alone would be fine.
    r = run_sidecar(["link", *safe(tmp_path), "--log-level", "LOUD"], {"FL_LOG_LEVEL": "DEBUG"})
    assert r.returncode == 2 and "--log-level" in r.stderr, r.stderr


def _known_flags() -> list[str]:
    """Every long option the parser accepts, read from proxy/config.c."""
    src = (ROOT / "proxy" / "config.c").read_text()
    table = src[src.index("long_opts[]"):]
    table = table[:table.index("{0, 0, 0, 0}")]
    flags = re.findall(r'\{"([a-z0-9-]+)",', table)
    assert len(flags) > 20, flags
    return ["--" + f for f in flags]


def test_help_lists_every_flag():
    r = run_sidecar(["--help"])
    assert r.returncode == 0, r.stderr
    missing = [f for f in _known_flags() if not re.search(re.escape(f) + r"\b", r.stdout)]
    assert not missing, f"--help does not mention {missing}"
    # Also after the role, as users type it.
    r2 = run_sidecar(["link", "--help"])
    assert r2.returncode == 0 and r2.stdout == r.stdout


def _start_and_read(argv, env, tmp_path, ready_port):
    """Starts the sidecar, waits for |ready_port| to listen, stops it with
    SIGTERM; returns (exit code, stdout)."""
    from conftest import listening, wait_for
    e = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    e.update(env)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        p = subprocess.Popen([SIDECAR, *argv], stdout=f, stderr=subprocess.STDOUT, env=e)
    try:
        wait_for(lambda: p.poll() is not None or listening(ready_port), 10 * SLOW, f"port {ready_port}")
        assert p.poll() is None, out.read_text()
    finally:
        if p.poll() is None:
            p.terminate()
        rc = p.wait(timeout=15 * SLOW)
    return rc, out.read_text()


# (id, variable that alone would be refused, flag that gives the same setting)
FLAG_WINS = [
    ("log-format", {"FL_LOG_FORMAT": "xml"}, ["--log-format", "text"]),
    ("tls-enabled", {"FL_TLS_ENABLED": "maybe"}, ["--no-tls"]),
    ("fleet-api-address", {"FL_FLEET_API_ADDRESS": "nonsense"}, []),  # --listen comes from the test
    ("admin", {"FL_SIDECAR_ADMIN": "nonsense"}, []),                  # --admin comes from the test
    ("backoff", {"FL_EDGE_BACKOFF_INITIAL": "-1"}, ["--backoff-initial", "2"]),
]


@pytest.mark.parametrize("case", FLAG_WINS, ids=[c[0] for c in FLAG_WINS])
def test_a_flag_wins_over_an_invalid_variable(case, tmp_path):
    """conventions.md: a flag wins over its variable, even an invalid one
    (an invalid variable whose setting no flag gives is exit 2, above)."""
    name, env, flags = case
    listen, admin = procs.free_port(), procs.free_port()
    argv = ["link", "--listen", f"{HOST}:{listen}", "--admin", f"{HOST}:{admin}", "--upstream",
            f"{HOST}:{procs.free_port()}", "--tls-dir", str(tmp_path / "tls"), *flags]
    rc, out = _start_and_read(argv, env, tmp_path, admin)
    assert rc == 0, out
    if name == "log-format":
        assert not out.startswith("{") and re.search(r"Z info +sidecar\.start ", out), out  # text, not JSON
    if name == "tls-enabled":
        assert "tls=off" in out or '"tls":"off"' in out, out


def test_listen_and_admin_from_the_appliance_variables(tmp_path):
    """FL_FLEET_API_ADDRESS (the SuperLink's Fleet API address in the
    appliances) is the link role's --listen; FL_SIDECAR_ADMIN (the variable
    the READY_SCRIPT reads) its --admin.  The node role ignores
    FL_FLEET_API_ADDRESS: there it is the SuperLink's own setting."""
    import json
    import urllib.request
    from conftest import listening
    listen, admin = procs.free_port(), procs.free_port()
    env = {"FL_FLEET_API_ADDRESS": f"{HOST}:{listen}", "FL_SIDECAR_ADMIN": f"{HOST}:{admin}"}
    argv = ["link", "--upstream", f"{HOST}:{procs.free_port()}", "--tls-dir", str(tmp_path / "tls")]
    from conftest import wait_for
    e = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    e.update(env)
    p = subprocess.Popen([SIDECAR, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e)
    try:
        wait_for(lambda: p.poll() is not None or (listening(admin) and listening(listen)), 10 * SLOW, "both ports")
        assert p.poll() is None
        try:
            urllib.request.urlopen(f"http://{HOST}:{admin}/healthz", timeout=5)
        except urllib.error.HTTPError as e503:
            assert e503.code == 503  # no upstream here: NOT_SERVING, but it answered
    finally:
        p.terminate()
        out = p.communicate(timeout=15 * SLOW)[0].decode()
    start = [json.loads(ln) for ln in out.splitlines() if '"sidecar.start"' in ln][0]
    assert start["event"] == "sidecar.start" and start["listen"] == f"{HOST}:{listen}", out
    version = subprocess.run([SIDECAR, "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert start["version"] == version, start

    node_admin = procs.free_port()
    env = {"FL_FLEET_API_ADDRESS": "0.0.0.0:1", "FL_SIDECAR_ADMIN": f"{HOST}:{node_admin}",
           "FL_SUPERLINK_ADDRESS": f"{HOST}:{procs.free_port()}"}
    rc, out = _start_and_read(["node", "--listen", f"{HOST}:{procs.free_port()}", "--no-tls"], env, tmp_path,
                              node_admin)
    assert rc == 0 and "0.0.0.0:1" not in out, out


def test_man_page_lists_every_flag_and_variable():
    """flower-sidecar(8) documents every flag the parser knows and every
    variable it reads (deploy/man/flower-sidecar.8, installed by the package)."""
    man = (ROOT / "deploy" / "man" / "flower-sidecar.8").read_text().replace("\\-", "-")
    missing = [f for f in _known_flags() if not re.search(re.escape(f) + r"\b", man)]
    assert not missing, f"flower-sidecar.8 does not mention {missing}"
    src = (ROOT / "proxy" / "config.c").read_text()
    variables = re.findall(r'\{"(FL_[A-Z_]+)", OPT_', src)
    assert len(variables) >= 14, variables
    missing = [v for v in variables if v not in man.replace("\\_", "_")]
    assert not missing, f"flower-sidecar.8 does not mention {missing}"
