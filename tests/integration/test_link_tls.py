"""flower-sidecar link: the TLS listener.  Clients that cannot speak gRPC
over TLS (no ALPN h2, plaintext, garbage, wrong CA) are refused with a
tls.fail event without disturbing anyone else; the auto-generated and the
operator's certificates work as documented.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import stat
import subprocess
import time

import grpc
import pytest

import h2raw
from conftest import HOST, Bidi, make_ca, make_server_cert, openssl, unary

# --- refused handshakes ----------------------------------------------------


def _tls_client(ctx: ssl.SSLContext, port: int, server_hostname: str = "localhost"):
    """Connects and handshakes; returns (ssl socket or None, handshake error or
    None, local port)."""
    raw = socket.create_connection((HOST, port), timeout=5)
    local = raw.getsockname()[1]
    try:
        s = ctx.wrap_socket(raw, server_hostname=server_hostname)
        return s, None, local
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return None, e, local


def _closed_by_server(s) -> bool:
    """True once the server closed the (TLS) connection: EOF, close_notify,
    reset or an alert, within 5 s."""
    s.settimeout(5)
    try:
        data = s.recv(1024)
    except socket.timeout:
        return False
    except (ssl.SSLError, OSError):
        return True
    return data == b""


@pytest.fixture
def guarded(link):
    """The link sidecar plus a good client whose stream is open across the
    bad connection: it must keep working."""
    ch = link.channel()
    stream = Bidi(ch)
    stream.send(b"before")
    assert stream.recv() == b"before"
    yield link, stream
    stream.send(b"after")
    assert stream.recv() == b"after", "a bad client disturbed a good connection"
    stream.done()
    assert unary(link.channel(), "Unary", b"new") == b"new", "a bad client broke new connections"
    assert link.alive()


def _client_ctx(ca: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    return ctx


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http1.1-only"])
def test_client_without_alpn_h2_is_refused(guarded, alpn):
    sc, _ = guarded
    ctx = _client_ctx(sc.ca_pem)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    s, err, local = _tls_client(ctx, sc.port)
    if s is not None:  # TLS 1.3: the client may finish before the server refuses
        assert s.selected_alpn_protocol() != "h2"
        assert _closed_by_server(s), "connection without ALPN h2 left open"
        s.close()
    ev = sc.events.wait("tls.fail", peer=f"{HOST}:{local}")
    assert "ALPN" in ev["reason"], ev
    assert not sc.events.find("conn.open", peer=f"{HOST}:{local}")


def test_plaintext_h2_preface_to_tls_port(guarded):
    sc, _ = guarded
    s = socket.create_connection((HOST, sc.port), timeout=5)
    local = s.getsockname()[1]
    s.sendall(h2raw.PREFACE + h2raw.frame(h2raw.SETTINGS, 0, 0))
    closed, _ = h2raw.read_until_closed(s, 5)
    s.close()
    assert closed, "plaintext HTTP/2 on the TLS port was not closed"
    sc.events.wait("tls.fail", peer=f"{HOST}:{local}")


def test_random_bytes_to_tls_port(guarded):
    sc, _ = guarded
    s = socket.create_connection((HOST, sc.port), timeout=5)
    local = s.getsockname()[1]
    try:
        s.sendall(os.urandom(64 * 1024))
    except OSError:
        pass  # the sidecar may close before taking it all
    closed, _ = h2raw.read_until_closed(s, 5)
    s.close()
    assert closed, "64 KiB of garbage left the connection open"
    sc.events.wait("tls.fail", peer=f"{HOST}:{local}")


def test_client_trusting_another_ca(guarded, tmp_path):
    sc, _ = guarded
    other_ca, _ = make_ca(tmp_path / "other", cn="Some other CA")
    ctx = _client_ctx(other_ca.read_bytes())
    ctx.set_alpn_protocols(["h2"])
    s, err, local = _tls_client(ctx, sc.port)
    assert s is None and isinstance(err, ssl.SSLCertVerificationError), err
    sc.events.wait("tls.fail", peer=f"{HOST}:{local}")
    # And a gRPC client in the same situation gets UNAVAILABLE, not a hang.
    ch = sc.channel(root_ca=other_ca.read_bytes())
    with pytest.raises(grpc.RpcError) as ei:
        unary(ch, "Unary", b"x", timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_silent_client_is_cut_by_handshake_timeout(echo, make_sidecar):
    # A client that connects and never speaks must not hold a connection
    # (and its memory) for ever.
    sc = make_sidecar("--tls-handshake-timeout", "0.5", upstream=echo)
    s = socket.create_connection((HOST, sc.port), timeout=5)
    local = s.getsockname()[1]
    t0 = time.monotonic()
    closed, _ = h2raw.read_until_closed(s, 5)
    elapsed = time.monotonic() - t0
    s.close()
    assert closed, "silent client not disconnected"
    assert 0.3 < elapsed < 3, f"cut after {elapsed:.2f} s with --tls-handshake-timeout 0.5"
    ev = sc.events.wait("tls.fail", peer=f"{HOST}:{local}")
    assert "timeout" in ev["reason"], ev
    assert unary(sc.channel(), "Unary", b"ok") == b"ok"


# --- auto-generated certificates ---------------------------------------------


def _fingerprint(path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-fingerprint", "-sha256").strip()


def test_auto_generated_certificates(echo, make_sidecar, tmp_path):
    tls_dir = tmp_path / "auto" / "tls"  # parents do not exist yet
    sc = make_sidecar("--tls-san", "fl.example.test", upstream=echo, tls_dir=tls_dir)
    ready = sc.events.wait("tls.ready")
    assert ready["generated"] is True, ready
    assert ready["ca"] == str(tls_dir / "ca.pem"), ready

    for name, mode in (("ca.pem", None), ("ca.key", 0o600), ("server.pem", None), ("server.key", 0o600)):
        p = tls_dir / name
        assert p.is_file(), f"{name} missing"
        if mode is not None:
            assert stat.S_IMODE(p.stat().st_mode) == mode, f"{name} has mode {oct(p.stat().st_mode)}"
    assert "server.pem: OK" in openssl("verify", "-CAfile", str(tls_dir / "ca.pem"), str(tls_dir / "server.pem"))
    san = openssl("x509", "-in", str(tls_dir / "server.pem"), "-noout", "-ext", "subjectAltName")
    for want in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1", "DNS:fl.example.test"):
        assert want in san, f"{want} not in {san}"
    text = openssl("x509", "-in", str(tls_dir / "server.pem"), "-noout", "-text")
    assert "prime256v1" in text or "P-256" in text  # ECDSA P-256 as documented
    assert unary(sc.channel(), "Unary", b"auto") == b"auto"

    # A restart with the same settings keeps the same CA and certificate:
    # clients that pinned ca.pem keep working.
    fp_server, fp_ca = _fingerprint(tls_dir / "server.pem"), _fingerprint(tls_dir / "ca.pem")
    assert sc.stop() == 0
    sc.start()
    again = sc.events.find("tls.ready")
    assert len(again) == 2 and again[1]["generated"] is False, again
    assert _fingerprint(tls_dir / "server.pem") == fp_server
    assert _fingerprint(tls_dir / "ca.pem") == fp_ca
    assert unary(sc.channel("127.0.0.1"), "Unary", b"again") == b"again"


def test_tls_san_is_repeatable(echo, make_sidecar, tmp_path):
    # --help: "extra subject alternative name ... (repeatable)".
    extra = ["a.example.test", "192.0.2.10", "b.example.test"]
    sc = make_sidecar(*[x for e in extra for x in ("--tls-san", e)], upstream=echo)
    san = openssl("x509", "-in", str(sc.tls_dir / "server.pem"), "-noout", "-ext", "subjectAltName")
    missing = [e for e in ("DNS:a.example.test", "IP Address:192.0.2.10", "DNS:b.example.test") if e not in san]
    assert not missing, f"--tls-san {extra}: {missing} missing from {san}"


# --- operator certificates -----------------------------------------------------


@pytest.fixture(scope="module")
def operator_pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("operator-pki")
    ca = make_ca(d, cn="Operator CA")
    return ca, make_server_cert(d, ca, rsa=True)


def test_operator_certificate_from_paths(echo, make_sidecar, operator_pki, tmp_path):
    (ca_pem, _), (cert, key) = operator_pki
    unused = tmp_path / "unused-tls"
    sc = make_sidecar("--tls-cert", str(cert), "--tls-key", str(key), upstream=echo, tls_dir=unused)
    ready = sc.events.wait("tls.ready")
    assert ready["cert"] == str(cert) and ready["key"] == str(key), ready
    assert "generated" not in ready, ready
    assert unary(sc.channel(root_ca=ca_pem.read_bytes()), "Unary", b"op") == b"op"
    assert not unused.exists(), "a CA was generated although a certificate was given"


def test_operator_certificate_from_base64_variables(echo, make_sidecar, operator_pki, tmp_path):
    (ca_pem, _), (cert, key) = operator_pki
    env = {"FL_SSL_CERTFILE": base64.b64encode(cert.read_bytes()).decode(),
           "FL_SSL_KEYFILE": base64.b64encode(key.read_bytes()).decode()}
    sc = make_sidecar(upstream=echo, env=env, tls_dir=tmp_path / "unused-tls")
    ready = sc.events.wait("tls.ready")
    assert ready["cert"] == "base64 from FL_SSL_CERTFILE", ready
    assert ready["key"] == "base64 from FL_SSL_KEYFILE", ready
    assert unary(sc.channel(root_ca=ca_pem.read_bytes()), "Unary", b"b64") == b"b64"
    # The auto CA is not what the server presents.
    with pytest.raises(grpc.RpcError):
        other_ca, _ = make_ca(tmp_path / "x", cn="Not the operator CA")
        unary(sc.channel(root_ca=other_ca.read_bytes()), "Unary", b"x", timeout=10)


# --- Flower's TLS semantics: the CA of the server certificate ---------------

def make_client_cert(d, ca, name: str = "client"):
    """A client certificate signed by |ca| with the openssl CLI: (cert, key)."""
    cert, key, csr, ext = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def _ssl_variables(pki):
    (ca, _), (cert, key) = pki
    return {"FL_SSL_CA_CERTFILE": base64.b64encode(ca.read_bytes()).decode(),
            "FL_SSL_CERTFILE": base64.b64encode(cert.read_bytes()).decode(),
            "FL_SSL_KEYFILE": base64.b64encode(key.read_bytes()).decode()}


def _mtls_channel(sc, ca: bytes, cert=None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=cert[1].read_bytes() if cert else None,
                                         certificate_chain=cert[0].read_bytes() if cert else None)
    ch = grpc.secure_channel(sc.target(), creds, options=[("grpc.use_local_subchannel_pool", 1)])
    sc.channels.append(ch)
    return ch


def _served_chain(port: int) -> int:
    # bytes: after the handshake s_client may print the server's binary HTTP/2 SETTINGS
    out = subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{port}", "-alpn", "h2", "-showcerts"],
                         input=b"", capture_output=True, timeout=20).stdout
    return out.count(b"-----BEGIN CERTIFICATE-----")


def test_all_three_ssl_variables_do_not_lock_out_stock_supernodes(echo, make_sidecar, operator_pki, tmp_path):
    """The appliances ask for FL_SSL_CA_CERTFILE, FL_SSL_CERTFILE and
    FL_SSL_KEYFILE.  As with Flower's SuperLink (require_client_auth=False),
    a SuperNode that has only the CA gets in; the CA is sent in the chain; a
    client certificate that is presented must chain to the CA."""
    (ca, _), _ = operator_pki
    sc = make_sidecar(upstream=echo, env=_ssl_variables(operator_pki), tls_dir=tmp_path / "unused")
    ready = sc.events.wait("tls.ready")
    assert ready["client_cert"] == "verified when presented", ready
    assert unary(_mtls_channel(sc, ca.read_bytes()), "Unary", b"ca only") == b"ca only"
    assert _served_chain(sc.port) == 2, "the server certificate's CA is not in the chain"
    good = make_client_cert(tmp_path, operator_pki[0], "good")
    assert unary(_mtls_channel(sc, ca.read_bytes(), good), "Unary", b"cert") == b"cert"
    opened = sc.events.wait("conn.open", client_cert="/CN=good")
    assert opened["client_cert"] == "/CN=good"
    stranger_ca = make_ca(tmp_path / "stranger", cn="Stranger CA")
    bad = make_client_cert(tmp_path, stranger_ca, "bad")
    with pytest.raises(grpc.RpcError) as e:
        unary(_mtls_channel(sc, ca.read_bytes(), bad), "Unary", b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    sc.events.wait("tls.fail")


def test_require_client_cert_makes_mtls_mandatory(echo, make_sidecar, operator_pki, tmp_path):
    (ca, _), _ = operator_pki
    env = dict(_ssl_variables(operator_pki), FL_SIDECAR_REQUIRE_CLIENT_CERT="YES")
    sc = make_sidecar(upstream=echo, env=env, tls_dir=tmp_path / "unused")
    assert sc.events.wait("tls.ready")["client_cert"] == "required"
    with pytest.raises(grpc.RpcError) as e:
        unary(_mtls_channel(sc, ca.read_bytes()), "Unary", b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    fail = sc.events.wait("tls.fail")
    assert "certificate" in fail["reason"], fail
    good = make_client_cert(tmp_path, operator_pki[0], "member")
    assert unary(_mtls_channel(sc, ca.read_bytes(), good), "Unary", b"member") == b"member"
    assert sc.events.wait("conn.open", client_cert="/CN=member")


def test_require_client_cert_flag_with_the_auto_generated_ca(echo, make_sidecar, tmp_path):
    """--tls-require-client-cert without an operator CA: client certificates
    must come from the auto-generated CA (its key is in --tls-dir)."""
    sc = make_sidecar("--tls-require-client-cert", upstream=echo)
    with pytest.raises(grpc.RpcError):
        unary(_mtls_channel(sc, sc.ca_pem), "Unary", b"x", timeout=10)
    client = make_client_cert(tmp_path, (sc.tls_dir / "ca.pem", sc.tls_dir / "ca.key"), "auto-member")
    assert unary(_mtls_channel(sc, sc.ca_pem, client), "Unary", b"auto") == b"auto"
