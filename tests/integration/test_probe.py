"""Integration tests for build/flower-probe (the grpc_health_probe replacement).

The health servers here are independent of the probe's C code: they are
python3-grpcio servers with generic handlers and the health_pb2 module that
protoc generates from proto/health.proto into build/py.  Certificates are
throwaway ECDSA P-256 ones made with the openssl CLI.

Run from the repository root:
    make build/flower-probe proto-py
    /usr/bin/python3 -m pytest -q tests/integration/test_probe.py

FLOWER_PROBE=/path/to/binary runs the same tests against another build (for
instance an installed flower-probe).
"""

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(os.environ.get("FLOWER_PROBE", REPO / "build" / "flower-probe"))
PYGEN = REPO / "build" / "py"

if not (PYGEN / "health_pb2.py").exists():
    raise RuntimeError("build/py/health_pb2.py missing: run `make proto-py` first")
sys.path.insert(0, str(PYGEN))
import health_pb2  # noqa: E402

HCR = health_pb2.HealthCheckResponse
SERVING, NOT_SERVING = HCR.SERVING, HCR.NOT_SERVING
UNKNOWN, SERVICE_UNKNOWN = HCR.UNKNOWN, HCR.SERVICE_UNKNOWN
FLEET = "flwr.proto.Fleet"

# Every wait in this file is bounded by one of these.
PROBE_WAIT_S = 15      # a probe run (subprocess killed after this)
HANDLER_WAIT_S = 10    # a server handler that never answers on its own


# --------------------------------------------------------------------------
# Health server


class HealthServer:
    """grpc.health.v1.Health over grpcio generic handlers.

    statuses maps service name -> ServingStatus.  Check answers the status or
    NOT_FOUND for an unknown name; Watch sends the current status (or
    SERVICE_UNKNOWN) and every change, and keeps the stream open.
    """

    def __init__(self, statuses=None, *, health=True, hang=False, creds=None):
        self.statuses = dict({"": SERVING} if statuses is None else statuses)
        self.hang = hang
        self.calls = []           # (method, service, {metadata})
        self.cond = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        if health:
            handler = grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {
                    "Check": grpc.unary_unary_rpc_method_handler(
                        self._check,
                        request_deserializer=health_pb2.HealthCheckRequest.FromString,
                        response_serializer=HCR.SerializeToString),
                    "Watch": grpc.unary_stream_rpc_method_handler(
                        self._watch,
                        request_deserializer=health_pb2.HealthCheckRequest.FromString,
                        response_serializer=HCR.SerializeToString),
                })
        else:
            # a gRPC server that serves something else only
            handler = grpc.method_handlers_generic_handler(
                "test.Echo",
                {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
        self.server.add_generic_rpc_handlers((handler,))
        if creds is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        assert self.port
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    def set_status(self, service, status):
        with self.cond:
            self.statuses[service] = status
            self.cond.notify_all()

    def _record(self, method, request, context):
        with self.cond:
            self.calls.append((method, request.service,
                               {k: v for k, v in context.invocation_metadata()}))

    def _check(self, request, context):
        self._record("Check", request, context)
        if self.hang:
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(HANDLER_WAIT_S)
            context.abort(grpc.StatusCode.UNAVAILABLE, "test server gave up")
        with self.cond:
            status = self.statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return HCR(status=status)

    def _watch(self, request, context):
        self._record("Watch", request, context)
        end = time.monotonic() + HANDLER_WAIT_S
        last = None
        while context.is_active() and time.monotonic() < end:
            with self.cond:
                status = self.statuses.get(request.service, SERVICE_UNKNOWN)
                if status == last:
                    self.cond.wait(0.05)
                    continue
            last = status
            yield HCR(status=status)

    def stop(self):
        self.server.stop(0).wait(5)


@pytest.fixture
def servers():
    """Factory for health servers, all stopped at teardown."""
    made = []

    def make(*args, **kwargs):
        s = HealthServer(*args, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


# --------------------------------------------------------------------------
# Helpers


class Result:
    def __init__(self, proc, elapsed):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.elapsed = elapsed

    def __repr__(self):
        return (f"rc={self.rc} elapsed={self.elapsed:.2f}s\n"
                f"stdout={self.out!r}\nstderr={self.err!r}")


def probe(*args, env_extra=None):
    assert PROBE.exists(), f"{PROBE} missing: run `make build/flower-probe`"
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRPC_VERBOSITY", "GRPC_TRACE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
           and not k.lower().endswith("_proxy")}
    env.update(env_extra or {})
    t0 = time.monotonic()
    # subprocess.run kills the child (by its PID) if it overruns.
    proc = subprocess.run([str(PROBE), *args], capture_output=True, text=True,
                          timeout=PROBE_WAIT_S, env=env)
    return Result(proc, time.monotonic() - t0)


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Plaintext health states


@pytest.mark.parametrize("status,rc", [
    (SERVING, 0),
    (NOT_SERVING, 4),
    (UNKNOWN, 4),
    (SERVICE_UNKNOWN, 4),
])
def test_check_status_maps_to_exit_code(servers, status, rc):
    srv = servers({"": status})
    r = probe("-addr", srv.addr)
    assert r.rc == rc, r
    name = HCR.ServingStatus.Name(status)
    if rc == 0:
        assert r.out == "status: SERVING\n", r
        assert r.err == "", r
    else:
        assert r.out == "", r
        assert one_line(r.err) == f'service unhealthy (responded with "{name}")', r
    assert [c[:2] for c in srv.calls] == [("Check", "")], "one Check for service \"\""


def test_service_flag_is_sent(servers):
    srv = servers({"": SERVING, FLEET: NOT_SERVING})
    r = probe("-addr", srv.addr, "-service", FLEET)
    assert r.rc == 4, r
    assert "NOT_SERVING" in r.err
    srv.set_status(FLEET, SERVING)
    r = probe("-addr=" + srv.addr, "--service=" + FLEET)
    assert r.rc == 0, r
    assert [c[1] for c in srv.calls] == [FLEET, FLEET]


def test_unknown_service_is_rpc_failure(servers):
    srv = servers({"": SERVING})
    r = probe("-addr", srv.addr, "-service", "no.such.Service")
    assert r.rc == 3, r
    line = one_line(r.err)
    assert line.startswith("error: health rpc failed:"), r
    assert "NotFound" in line and "unknown service" in line, r


def test_status_change_is_seen(servers):
    srv = servers({"": SERVING})
    assert probe("-addr", srv.addr).rc == 0
    srv.set_status("", NOT_SERVING)
    assert probe("-addr", srv.addr).rc == 4
    srv.set_status("", SERVING)
    assert probe("-addr", srv.addr).rc == 0


def test_watch_of_test_server(servers):
    """The test server's Watch follows the protocol (harness sanity check)."""
    srv = servers({"": SERVING})
    with grpc.insecure_channel(srv.addr) as ch:
        watch = ch.unary_stream("/grpc.health.v1.Health/Watch",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=HCR.FromString)
        stream = watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(stream).status == SERVING
        srv.set_status("", NOT_SERVING)
        assert next(stream).status == NOT_SERVING
        stream.cancel()
        unknown = watch(health_pb2.HealthCheckRequest(service="x"), timeout=0.5)
        assert next(unknown).status == SERVICE_UNKNOWN
        with pytest.raises(grpc.RpcError) as e:
            next(unknown)  # stream stays open until our deadline
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_headers_and_user_agent(servers):
    srv = servers({"": SERVING})
    r = probe("-addr", srv.addr, "-rpc-header", "X-Token: abc def",
              "-rpc-header=x-second:2")
    assert r.rc == 0, r
    md = srv.calls[0][2]
    assert md.get("x-token") == "abc def"
    assert md.get("x-second") == "2"
    assert md.get("user-agent", "").startswith("flower-probe"), md
    r = probe("-addr", srv.addr, "-user-agent", "ready-script/1")
    assert r.rc == 0, r
    assert srv.calls[1][2].get("user-agent", "").startswith("ready-script/1")


def test_proxy_variables_do_not_apply_to_loopback(servers):
    srv = servers({"": SERVING})
    dead = f"http://127.0.0.1:{closed_port()}"
    proxies = {"http_proxy": dead, "https_proxy": dead, "grpc_proxy": dead,
               "HTTPS_PROXY": dead}
    for addr in (srv.addr, f"localhost:{srv.port}", f"dns:///127.0.0.1:{srv.port}"):
        r = probe("-addr", addr, env_extra=proxies)
        assert r.rc == 0, (addr, r)


def test_verbose_prints_timings(servers):
    srv = servers({"": SERVING})
    r = probe("-v", "-addr", srv.addr)
    assert r.rc == 0, r
    assert r.out == "status: SERVING\n"
    assert "connection established (took " in r.err
    assert "time elapsed: connect=" in r.err and " rpc=" in r.err


# --------------------------------------------------------------------------
# Connection and RPC failures


def test_closed_port_is_connection_failure():
    port = closed_port()
    r = probe("-addr", f"127.0.0.1:{port}", "-connect-timeout", "500ms")
    assert r.rc == 2, r
    line = one_line(r.err)
    assert line.startswith(f'timeout: failed to connect service "127.0.0.1:{port}" within 500ms'), r
    assert r.elapsed < 0.5 + 1.5, r


def test_server_without_health_service(servers):
    srv = servers(health=False)
    r = probe("-addr", srv.addr)
    assert r.rc == 3, r
    assert one_line(r.err).startswith(
        "error: this server does not implement the grpc health protocol (grpc.health.v1.Health)"), r


def test_check_that_never_answers_times_out(servers):
    srv = servers({"": SERVING}, hang=True)
    r = probe("-addr", srv.addr, "-rpc-timeout", "700ms")
    assert r.rc == 3, r
    assert one_line(r.err) == "timeout: health rpc did not complete within 700ms", r
    assert 0.7 <= r.elapsed < 0.7 + 1.5, r
    assert [c[0] for c in srv.calls] == ["Check"]


@pytest.mark.parametrize("tls", [False, True])
def test_silent_listener_is_connection_timeout(tls):
    """Accepts TCP but never speaks (no TLS handshake, no HTTP/2 SETTINGS):
    the channel never becomes READY, so -connect-timeout applies."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        port = lst.getsockname()[1]
        extra = ["-tls", "-tls-no-verify"] if tls else []
        r = probe("-addr", f"127.0.0.1:{port}", *extra, "-connect-timeout", "600ms")
    assert r.rc == 2, r
    assert one_line(r.err).startswith(
        f'timeout: failed to connect service "127.0.0.1:{port}" within 600ms'), r
    assert 0.6 <= r.elapsed < 0.6 + 1.5, r


# --------------------------------------------------------------------------
# TLS


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def key(name):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", f"{name}.key", cwd=d)

    def ca(name):
        key(name)
        openssl("req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
                "-days", "2", "-out", f"{name}.pem",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def leaf(name, ca_name, cn, ext):
        key(name)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}",
                "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}.pem",
                "-CAkey", f"{ca_name}.key", "-set_serial", str(int(time.time() * 1000)),
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)

    ca("ca")
    ca("other-ca")
    leaf("server", "ca", "localhost",
         "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
         "extendedKeyUsage=serverAuth\n")
    leaf("misnamed", "ca", "other.example",
         "basicConstraints=CA:FALSE\nsubjectAltName=DNS:other.example\n"
         "extendedKeyUsage=serverAuth\n")
    leaf("client", "ca", "flower-probe-test-client",
         "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    leaf("stranger", "other-ca", "stranger",
         "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")

    class P:
        pass

    p = P()
    p.dir = d
    for n in ("ca", "other-ca", "server", "misnamed", "client", "stranger"):
        setattr(p, n.replace("-", "_") + "_pem", str(d / f"{n}.pem"))
        setattr(p, n.replace("-", "_") + "_key", str(d / f"{n}.key"))
    return p


def server_creds(pki, require_client_auth=False, name="server"):
    key, pem = getattr(pki, name + "_key"), getattr(pki, name + "_pem")
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(pem).read_bytes())],
        root_certificates=Path(pki.ca_pem).read_bytes() if require_client_auth else None,
        require_client_auth=require_client_auth)


def test_tls_with_right_ca(servers, pki):
    srv = servers({"": SERVING}, creds=server_creds(pki))
    r = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem)
    assert r.rc == 0, r
    assert r.out == "status: SERVING\n"
    # host name "localhost" is in the certificate too
    r = probe("-addr", f"localhost:{srv.port}", "-tls", "-tls-ca-cert", pki.ca_pem)
    assert r.rc == 0, r


def test_tls_with_wrong_ca_is_connection_failure(servers, pki):
    srv = servers({"": SERVING}, creds=server_creds(pki))
    r = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.other_ca_pem,
              "-connect-timeout", "500ms")
    assert r.rc == 2, r
    assert one_line(r.err).startswith("timeout: failed to connect service"), r
    assert srv.calls == []


def test_tls_with_system_roots_rejects_private_ca(servers, pki):
    srv = servers({"": SERVING}, creds=server_creds(pki))
    r = probe("-addr", srv.addr, "-tls", "-connect-timeout", "500ms")
    assert r.rc == 2, r


def test_tls_no_verify(servers, pki):
    srv = servers({"": NOT_SERVING}, creds=server_creds(pki))
    r = probe("-addr", srv.addr, "-tls", "-tls-no-verify")
    assert r.rc == 4, r  # reached the server despite the unknown CA
    srv.set_status("", SERVING)
    r = probe("-addr", srv.addr, "-tls", "-tls-no-verify")
    assert r.rc == 0, r


def test_tls_server_name(servers, pki):
    srv = servers({"": SERVING}, creds=server_creds(pki))
    ok = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
               "-tls-server-name", "localhost")
    assert ok.rc == 0, ok
    bad = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
                "-tls-server-name", "wrong.example.org", "-connect-timeout", "500ms")
    assert bad.rc == 2, bad
    assert len(srv.calls) == 1


def test_tls_host_name_checks(servers, pki):
    """Certificate for other.example only, served on 127.0.0.1."""
    srv = servers({"": SERVING}, creds=server_creds(pki, name="misnamed"))
    r = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem, "-connect-timeout", "500ms")
    assert r.rc == 2, r  # chain is fine, name is not
    r = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
              "-tls-server-name", "other.example")
    assert r.rc == 0, r
    r = probe("-addr", srv.addr, "-tls", "-tls-no-verify")
    assert r.rc == 0, r  # neither chain nor name checked
    assert len(srv.calls) == 2


def test_mtls(servers, pki):
    srv = servers({"": SERVING}, creds=server_creds(pki, require_client_auth=True))
    with_cert = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
                      "-tls-client-cert", pki.client_pem, "-tls-client-key", pki.client_key)
    assert with_cert.rc == 0, with_cert
    no_verify = probe("-addr", srv.addr, "-tls", "-tls-no-verify",
                      "-tls-client-cert", pki.client_pem, "-tls-client-key", pki.client_key)
    assert no_verify.rc == 0, no_verify
    without = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
                    "-connect-timeout", "500ms")
    assert without.rc == 2, without
    stranger = probe("-addr", srv.addr, "-tls", "-tls-ca-cert", pki.ca_pem,
                     "-tls-client-cert", pki.stranger_pem, "-tls-client-key", pki.stranger_key,
                     "-connect-timeout", "500ms")
    assert stranger.rc == 2, stranger
    assert len(srv.calls) == 2


def test_tls_mismatch_with_plaintext(servers, pki):
    plain = servers({"": SERVING})
    r = probe("-addr", plain.addr, "-tls", "-tls-no-verify", "-connect-timeout", "500ms")
    assert r.rc == 2, r
    tls = servers({"": SERVING}, creds=server_creds(pki))
    r = probe("-addr", tls.addr, "-connect-timeout", "500ms")
    assert r.rc == 2, r


# --------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("args,needle", [
    ([], "-addr not specified"),
    (["-addr="], "-addr not specified"),
    (["-addr", "127.0.0.1:1", "-bogus"], "flag provided but not defined: -bogus"),
    (["-addr", "127.0.0.1:1", "-connect-timeout", "1"], "missing unit"),
    (["-addr", "127.0.0.1:1", "-rpc-timeout=fast"], "invalid duration"),
    (["-addr", "127.0.0.1:1", "-rpc-timeout", "5x"], 'unknown unit "x"'),
    (["-addr", "127.0.0.1:1", "-connect-timeout", "0s"], "must be greater than zero"),
    (["-addr", "127.0.0.1:1", "-rpc-timeout=-1s"], "must be greater than zero"),
    (["-addr"], "flag needs an argument: -addr"),
    (["-addr", "127.0.0.1:1", "-tls=maybe"], "invalid boolean value"),
    (["-addr", "127.0.0.1:1", "-tls", "true"], "unexpected argument"),
    (["-addr", "127.0.0.1:1", "-tls-no-verify"], "without specifying -tls"),
    (["-addr", "127.0.0.1:1", "-tls-ca-cert", "/x"], "without specifying -tls"),
    (["-addr", "127.0.0.1:1", "-tls-server-name", "x"], "without specifying -tls"),
    (["-addr", "127.0.0.1:1", "-tls", "-tls-client-cert", "/x"],
     "without specifying -tls-client-key"),
    (["-addr", "127.0.0.1:1", "-tls", "-tls-no-verify", "-tls-ca-cert", "/x"],
     "cannot specify -tls-ca-cert with -tls-no-verify"),
    (["-addr", "127.0.0.1:1", "-tls", "-tls-ca-cert", "/nonexistent/ca.pem"],
     "No such file or directory"),
    (["-addr", "127.0.0.1:1", "-rpc-header", "no-colon"], "expected 'key: value'"),
    (["-addr", "127.0.0.1:1", "-rpc-header", "bad key: v"], "invalid RPC header name"),
    (["---addr", "x"], "bad flag syntax"),
])
def test_bad_arguments(args, needle):
    r = probe(*args)
    assert r.rc == 1, r
    assert r.out == "", r
    line = one_line(r.err)
    assert line.startswith("error: ") and needle in line, r
    assert r.elapsed < 2, r


def test_bad_tls_files(pki, tmp_path):
    not_pem = tmp_path / "garbage.pem"
    not_pem.write_text("this is not a certificate\n")
    base = ["-addr", "127.0.0.1:1", "-tls"]
    cases = [
        (["-tls-ca-cert", str(not_pem)], "no root CA certs parsed"),
        (["-tls-ca-cert", pki.ca_key], "no root CA certs parsed"),
        (["-tls-client-cert", pki.client_pem, "-tls-client-key", pki.server_key],
         "does not match"),
        (["-tls-client-cert", str(not_pem), "-tls-client-key", pki.client_key],
         "no certificate found"),
        (["-tls-client-cert", pki.client_pem, "-tls-client-key", str(tmp_path / "nope.key")],
         "No such file or directory"),
    ]
    for extra, needle in cases:
        r = probe(*base, *extra)
        assert r.rc == 1, (extra, r)
        assert needle in one_line(r.err), (extra, r)


def test_help():
    r = probe("-h")
    assert r.rc == 0, r
    assert "-addr" in r.out and "-tls-no-verify" in r.out and "-rpc-header" in r.out


def test_flag_syntax_variants(servers):
    srv = servers({"": SERVING, FLEET: SERVING})
    for args in (
        ["-addr", srv.addr],
        ["-addr=" + srv.addr],
        ["--addr", srv.addr, "--connect-timeout=1.5s", "-rpc-timeout", "2s"],
        ["-addr", srv.addr, "-connect-timeout", "1m", "-tls=false", "-v=false"],
        ["-addr", srv.addr, "-service=" + FLEET, "-rpc-timeout", "1500ms", "--"],
        ["-addr", f":{srv.port}"],  # Go dials ":port" on the local host
    ):
        r = probe(*args)
        assert r.rc == 0, (args, r)
        assert r.out == "status: SERVING\n", (args, r)
