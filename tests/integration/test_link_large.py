"""flower-sidecar link: large messages and slow readers.  Model updates are
hundreds of MiB; the sidecar must stream them with bounded memory (a stream
window per stream and direction, conventions: VmHWM under 64 MiB), intact,
and one client that stops reading must not hold up anyone else.

The measured VmHWM figures are printed (with -s), listed at the end of the
run ("flower-sidecar figures"), and written to vmhwm-*.txt in the test's
tmp_path.  Under ASan the sidecar runs with a 16 MiB quarantine (see
conftest.py) so the same 64 MiB bound applies.
"""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from conftest import FIGURES, RSS_LIMIT_KIB, SLOW, unary
from echo_server import random_payload

MiB = 1 << 20


def _report(tmp_path, name: str, sc, extra: str = "") -> int:
    st = sc.rss()
    line = f"{name}: sidecar VmHWM {st['VmHWM'] / 1024:.1f} MiB, VmRSS {st['VmRSS'] / 1024:.1f} MiB {extra}".strip()
    print("\n" + line)
    FIGURES.append(line)
    (tmp_path / f"vmhwm-{name}.txt").write_text(line + "\n")
    return st["VmHWM"]


@pytest.mark.long
def test_256mib_up_with_bounded_memory(link, tmp_path):
    ch = link.channel()
    data = random_payload(256 * MiB, seed=1)
    want = b"%d,%s" % (len(data), hashlib.sha256(data).hexdigest().encode())
    t0 = time.monotonic()
    assert unary(ch, "Sink", data, timeout=300 * SLOW) == want
    hwm = _report(tmp_path, "256MiB-up", link, f"({time.monotonic() - t0:.1f} s)")
    assert hwm < RSS_LIMIT_KIB, f"VmHWM {hwm} KiB for a 256 MiB upload"


@pytest.mark.long
def test_256mib_down_with_bounded_memory(link, tmp_path):
    ch = link.channel()
    t0 = time.monotonic()
    got = unary(ch, "Random", b"%d,2" % (256 * MiB), timeout=300 * SLOW)
    hwm = _report(tmp_path, "256MiB-down", link, f"({time.monotonic() - t0:.1f} s)")
    assert len(got) == 256 * MiB
    assert got == random_payload(256 * MiB, seed=2), "256 MiB download corrupted"
    assert hwm < RSS_LIMIT_KIB, f"VmHWM {hwm} KiB for a 256 MiB download"


@pytest.mark.big
@pytest.mark.long
def test_1gib_up_with_bounded_memory(link, tmp_path):
    ch = link.channel()
    data = random_payload(1024 * MiB, seed=3)
    want = b"%d,%s" % (len(data), hashlib.sha256(data).hexdigest().encode())
    t0 = time.monotonic()
    got = unary(ch, "Sink", data, timeout=600 * SLOW)
    del data
    hwm = _report(tmp_path, "1GiB-up", link, f"({time.monotonic() - t0:.1f} s)")
    assert got == want
    assert hwm < RSS_LIMIT_KIB, f"VmHWM {hwm / 1024:.1f} MiB for a 1 GiB upload (limit {RSS_LIMIT_KIB // 1024} MiB)"


def test_stalled_reader_does_not_stall_others(link, tmp_path):
    a, b = link.channel(), link.channel()
    # 4000 x 1 MiB offered, one read: the rest backs up behind the client.
    stalled = a.unary_stream("/test.Echo/ServerStream")(b"4000,%d" % MiB, timeout=120 * SLOW)
    assert next(stalled) == b"\x00" * MiB
    # No event says "windows full"; give the upstream a moment to fill every
    # buffer on the way (grpcio's, the sidecar's stream window, the socket).
    time.sleep(1.0)
    try:
        for ch, where in ((a, "same connection"), (b, "other connection")):
            worst = 0.0
            for i in range(20):
                t0 = time.monotonic()
                assert unary(ch, "Unary", b"u%d" % i, timeout=5 * SLOW) == b"u%d" % i
                worst = max(worst, time.monotonic() - t0)
            assert worst < 1.0 * SLOW, f"unary on the {where} took {worst:.2f} s behind a stalled stream"
            # Data moves too, not only tiny calls.
            assert unary(ch, "Random", b"%d,5" % (4 * MiB), timeout=10 * SLOW) == random_payload(4 * MiB, 5)
        hwm = _report(tmp_path, "stalled-reader", link)
        assert hwm < RSS_LIMIT_KIB
        # The stalled stream is still intact: it resumes where it stopped.
        assert next(stalled) == b"\x01" * MiB
    finally:
        stalled.cancel()
    with pytest.raises(grpc.RpcError):
        for _ in stalled:
            pass


def test_concurrent_large_messages_on_one_connection(link, tmp_path):
    """Several multi-MiB messages at once on one connection, both ways.  The
    bench found a stall here: nghttp2 stopped at the output high-water mark,
    the socket then took everything at once, and nothing woke the
    connection again."""
    from concurrent.futures import ThreadPoolExecutor

    ch = link.channel()
    size = 6 * MiB
    data = random_payload(size, seed=7)
    want_up = b"%d,%s" % (size, hashlib.sha256(data).hexdigest().encode())

    def down(i):
        return unary(ch, "Random", b"%d,%d" % (size, i), timeout=60 * SLOW)

    def up(i):
        return unary(ch, "Sink", data, timeout=60 * SLOW)

    with ThreadPoolExecutor(8) as ex:
        downs = [ex.submit(down, i) for i in range(4)]
        ups = [ex.submit(up, i) for i in range(4)]
        for i, f in enumerate(downs):
            assert f.result() == random_payload(size, seed=i)
        for f in ups:
            assert f.result() == want_up
    _report(tmp_path, "concurrent-6MiBx8", link)


def test_client_killed_during_large_transfers(link, make_upstream, tmp_path):
    """A client that dies while its large messages are half-sent must leave
    the sidecar serving (the bench found a use-after-free here)."""
    import subprocess
    import sys

    script = (
        "import grpc, sys, threading\n"
        f"ch = grpc.secure_channel('localhost:{link.listen.split(':')[-1]}', grpc.ssl_channel_credentials(open(sys.argv[1], 'rb').read()),\n"
        "    options=[('grpc.max_receive_message_length', -1), ('grpc.max_send_message_length', -1)])\n"
        "def go(m, req):\n"
        "    try: ch.unary_unary('/test.Echo/' + m)(req, timeout=30)\n"
        "    except Exception: pass\n"
        "for i in range(4):\n"
        "    threading.Thread(target=go, args=('Random', b'%d,%d' % (64 << 20, i)), daemon=True).start()\n"
        "    threading.Thread(target=go, args=('Sink', b'x' * (32 << 20)), daemon=True).start()\n"
        "threading.Event().wait(30)\n"
    )
    ca = tmp_path / "ca.pem"
    ca.write_bytes(link.ca_pem)
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", script, str(ca)])
        time.sleep(1.5 * SLOW)
        p.kill()
        p.wait(10)
    assert link.alive()
    ch = link.channel()
    assert unary(ch, "Unary", b"after", timeout=10 * SLOW) == b"after"
