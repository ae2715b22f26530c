"""Certificate lifecycle: SIGHUP re-reads certificates and keys, the
auto-generated ones are renewed while the daemon runs, a new CA is announced
before the certificate it signs is served; established connections and calls
are never touched.  Real TLS, real grpcio clients, serial numbers read from
the certificates the sidecar serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from datetime import timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import procs
from conftest import HOST, SIDECAR, Bidi, Events, make_ca, make_server_cert, unary, wait_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


def _ctx(ca: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _served(port: int, ca: bytes) -> x509.Certificate:
    """The certificate a new connection gets (verified against |ca|)."""
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with _ctx(ca).wrap_socket(raw, server_hostname="localhost") as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def _serial(port: int, ca: bytes) -> int:
    return _served(port, ca).serial_number


class IdleH2:
    """A TLS connection that spoke its HTTP/2 preface and then idles; ping()
    proves it is still open and served (PING answered with an ACK)."""

    def __init__(self, port: int, ca: bytes):
        raw = socket.create_connection((HOST, port), timeout=10)
        self.s = _ctx(ca).wrap_socket(raw, server_hostname="localhost")
        self.serial = x509.load_der_x509_certificate(self.s.getpeercert(binary_form=True)).serial_number
        self.s.sendall(PREFACE + SETTINGS)
        self.buf = b""

    def ping(self, payload: bytes) -> bool:
        self.s.sendall(struct.pack(">I", 8)[1:] + b"\x06\x00\x00\x00\x00\x00" + payload)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                typ, flags, body = self.buf[3], self.buf[4], self.buf[9:9 + n]
                self.buf = self.buf[9 + n:]
                if typ == 6 and flags & 1 and body == payload:
                    return True
            data = self.s.recv(65536)
            if not data:
                return False
            self.buf += data
        return False

    def close(self) -> None:
        self.s.close()


def _metric(admin_port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def _replace(src: Path, dst: Path) -> None:
    """Atomically, as an operator's deployment tool would."""
    tmp = dst.with_suffix(".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_sighup_swaps_operator_certificate_and_keeps_every_connection(echo, make_sidecar, tmp_path):
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    a = make_server_cert(pki, ca, name="a")
    b = make_server_cert(pki, ca, name="b")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    _replace(a[0], cert)
    _replace(a[1], key)
    sc = make_sidecar("--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca[0]), upstream=echo)
    ca_pem = ca[0].read_bytes()
    serial_a = x509.load_pem_x509_certificate(a[0].read_bytes()).serial_number
    serial_b = x509.load_pem_x509_certificate(b[0].read_bytes()).serial_number
    assert _serial(sc.port, ca_pem) == serial_a

    # A long streaming call and 100 idle TLS connections, all on certificate a.
    stream = Bidi(sc.channel(root_ca=ca_pem), timeout=120)
    stream.send(b"before")
    assert stream.recv() == b"before"
    idle = [IdleH2(sc.port, ca_pem) for _ in range(100)]
    try:
        assert {c.serial for c in idle} == {serial_a}
        assert all(c.ping(b"pre-swap") for c in idle)

        mark = sc.events.mark()
        _replace(b[0], cert)
        _replace(b[1], key)
        sc.signal(signal.SIGHUP)
        ev = sc.events.wait("cert.reload", since=mark)
        assert ev["ok"] is True and ev["trigger"] == "SIGHUP", ev
        assert str(cert) in ev["files"] and str(key) in ev["files"], ev
        want = x509.load_pem_x509_certificate(b[0].read_bytes()).not_valid_after
        assert ev["not_after"] == want.strftime("%Y-%m-%dT%H:%M:%SZ"), ev

        # New handshakes get b; everything established is untouched.
        assert _serial(sc.port, ca_pem) == serial_b
        assert unary(sc.channel(root_ca=ca_pem), "Unary", b"new") == b"new"
        stream.send(b"after")
        assert stream.recv() == b"after", "the streaming call did not survive the reload"
        assert all(c.ping(b"postswap") for c in idle), "an idle connection was dropped by the reload"
        not_after = _metric(sc.admin_port, 'flower_sidecar_tls_cert_not_after_seconds{cert="server"}')
        assert not_after == want.replace(tzinfo=timezone.utc).timestamp(), not_after

        # A corrupt new key: the old pair stays, the key's bytes are never printed.
        good_key = key.read_bytes()
        body = b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgCORRUPTEDKEYBYTESxyz"
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n")
        mark = sc.events.mark()
        sc.signal(signal.SIGHUP)
        ev = sc.events.wait("cert.reload", since=mark)
        assert ev["ok"] is False and ev["level"] == "error", ev
        assert "key" in ev["reason"], ev
        assert _serial(sc.port, ca_pem) == serial_b, "a bad key replaced the certificate in use"
        assert unary(sc.channel(root_ca=ca_pem), "Unary", b"still") == b"still"
        logged = sc.events.path.read_bytes() + sc.stderr_path.read_bytes()
        assert b"CORRUPTEDKEY" not in logged and good_key.split(b"\n")[1] not in logged

        # A key that does not match the certificate: refused the same way.
        _replace(a[1], key)
        mark = sc.events.mark()
        sc.signal(signal.SIGHUP)
        ev = sc.events.wait("cert.reload", since=mark)
        assert ev["ok"] is False and "does not match" in ev["reason"], ev
        assert _serial(sc.port, ca_pem) == serial_b
        stream.send(b"end")
        assert stream.recv() == b"end"
        stream.done()
        assert all(c.ping(b"the-end!") for c in idle)
    finally:
        for c in idle:
            c.close()


@pytest.mark.long
def test_auto_generated_certificates_renewed_while_running(echo, make_sidecar):
    """Server lifetime 9 s, CA 30 s (test-only settings): the server certificate
    is renewed every ~6 s, the CA after ~20 s; a renewed CA is announced
    (cert.renew cert=ca) and served only --tls-ca-switch-delay later."""
    sc = make_sidecar("--tls-ca-switch-delay", "4", upstream=echo,
                      env={"FS_TEST_CERT_LIFETIME_S": "9", "FS_TEST_CA_LIFETIME_S": "30"})
    old_ca = sc.ca_pem
    first = _served(sc.port, old_ca)
    assert 8 <= (first.not_valid_after - first.not_valid_before).total_seconds() <= 9
    stream = Bidi(sc.channel(root_ca=old_ca), timeout=120)
    stream.send(b"one")
    assert stream.recv() == b"one"
    idle = IdleH2(sc.port, old_ca)

    ev = sc.events.wait("cert.renew", timeout=15, cert="server")
    assert ev["reason"] == "less than a third of its lifetime left", ev
    second = _served(sc.port, old_ca)
    assert second.serial_number != first.serial_number
    assert second.not_valid_after > first.not_valid_after
    stream.send(b"two")
    assert stream.recv() == b"two"
    assert idle.ping(b"renewed1")

    # The CA: announced first, served only after the switch delay.
    ann = sc.events.wait("cert.renew", timeout=30, cert="ca")
    t_ann = time.monotonic()
    assert ann["switch_in_s"] == 4 and ann["reason"] == "less than a third of its lifetime left", ann
    new_ca = sc.ca_pem  # written to --tls-dir when announced
    assert new_ca != old_ca
    still_old = _served(sc.port, old_ca)  # verifies against the old CA
    assert time.monotonic() - t_ann < 4, "too slow to observe the announcement window"
    assert still_old.issuer == first.issuer
    evs = sc.events.all()
    i_ann = evs.index(ann)
    sw = sc.events.wait("cert.reload", timeout=10, since=i_ann, trigger="renewal")
    assert sw["ok"] is True
    assert time.monotonic() - t_ann >= 3.5
    fresh = _served(sc.port, new_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        _served(sc.port, old_ca)
    assert fresh.serial_number not in (first.serial_number, second.serial_number)
    assert sw["not_after"] == fresh.not_valid_after.strftime("%Y-%m-%dT%H:%M:%SZ")

    # Established connections and calls never noticed.
    stream.send(b"three")
    assert stream.recv() == b"three"
    stream.done()
    assert idle.ping(b"renewed2")
    idle.close()
    assert unary(sc.channel(root_ca=new_ca), "Unary", b"x") == b"x"
    assert not sc.events.find("cert.reload", ok=False)


def test_sighup_renews_a_deleted_auto_ca_and_bad_lifetime_is_refused(echo, make_sidecar, tmp_path):
    """Deleting the auto-generated CA and sending SIGHUP rotates it (announced
    first); an invalid test-only lifetime is a startup error naming it."""
    sc = make_sidecar("--tls-ca-switch-delay", "0.5", upstream=echo)
    old_ca = sc.ca_pem
    os.unlink(sc.tls_dir / "ca.pem")
    mark = sc.events.mark()
    sc.signal(signal.SIGHUP)
    ann = sc.events.wait("cert.renew", since=mark, cert="ca")
    assert "no usable CA" in ann["reason"], ann
    sw = sc.events.wait("cert.reload", since=mark, trigger="SIGHUP")
    assert sw["ok"] is True
    assert sc.ca_pem != old_ca
    _served(sc.port, sc.ca_pem)
    r = subprocess.run([SIDECAR, "link", "--tls-dir", str(tmp_path / "x"), "--listen", f"{HOST}:1",
                        "--upstream", f"{HOST}:2"], env={"FS_TEST_CERT_LIFETIME_S": "soon"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "FS_TEST_CERT_LIFETIME_S" in r.stderr, r.stderr


def test_node_reload_and_upstream_expiry_metric(echo, make_sidecar, tmp_path):
    """Node role: /metrics tells when the upstream's certificate expires;
    SIGHUP re-reads --tls-ca (a broken file keeps the old context)."""
    link = make_sidecar(upstream=echo)
    ca_file = tmp_path / "node-ca.pem"
    ca_file.write_bytes(link.ca_pem)
    port, admin = procs.free_port(HOST), procs.free_port(HOST)
    events = Events(tmp_path / "node.events", role="node")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    with open(events.path, "wb") as out, open(tmp_path / "node.stderr", "wb") as err:
        node = subprocess.Popen([SIDECAR, "node", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}",
                                 "--upstream", f"localhost:{link.port}", "--tls-ca", str(ca_file)],
                                stdout=out, stderr=err, env=env, start_new_session=True)
    try:
        events.wait("upstream.up", timeout=15)
        served = _served(link.port, link.ca_pem)
        not_after = _metric(admin, 'flower_sidecar_tls_cert_not_after_seconds{cert="upstream"}')
        assert not_after == served.not_valid_after.replace(tzinfo=timezone.utc).timestamp(), not_after
        assert _metric(admin, 'flower_sidecar_tls_cert_not_after_seconds{cert="server"}') is None

        ca_file.write_text("not a certificate\n")
        node.send_signal(signal.SIGHUP)
        ev = events.wait("cert.reload")
        assert ev["ok"] is False and "--tls-ca" in ev["reason"], ev
        ca_file.write_bytes(link.ca_pem)
        node.send_signal(signal.SIGHUP)
        ev = events.wait("cert.reload", ok=True)
        assert ev["files"] == str(ca_file), ev
        with grpc.insecure_channel(f"{HOST}:{port}") as ch:
            assert unary(ch, "Unary", b"via node") == b"via node"
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
