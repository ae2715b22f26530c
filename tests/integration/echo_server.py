"""A python3-grpcio upstream for the proxy tests: service test.Echo on raw bytes.

Methods (all payloads are raw bytes, no protobuf):
  Unary         echoes the request; echoes request metadata 'x-echo-*' as
                initial metadata and sends trailer 'x-trailer: done'.
  Fail          aborts with the status code given as ASCII digits in the request.
  ServerStream  request is b"<count>,<size>": streams count messages of size bytes.
  ClientStream  answers b"<messages>,<bytes>" after the client's stream ends.
  Bidi          echoes every message as it arrives.
  Sized         request is ASCII digits N: answers N bytes (pattern), checks nothing.
  Sink          answers b"<bytes>,<sha256>" of the request.
  Sleep         sleeps the seconds given in the request, honouring cancellation;
                records cancellations in the counters.
  Random        request is b"<bytes>,<seed>": answers random_payload(bytes, seed),
                which clients can rebuild to compare (unlike Sized, every MiB
                differs, so lost, repeated or reordered chunks show).
  Abort         server stream; request is b"<count>,<code>": sends count
                messages b"msg-<i>", then aborts with status code <code> and
                message "aborted after <count> messages".
Counters (GET via method Stats) are kept per method, for asserting that calls
reached (or did not reach) the upstream.

Run: /usr/bin/python3 echo_server.py --listen 127.0.0.1:PORT [--tls-cert C --tls-key K]
     [--max-concurrent-streams N]
"""
import argparse
import hashlib
import json
import random
import sys
import threading
import time
from concurrent import futures

import grpc

COUNTS = {}
CANCELLED = {"Sleep": 0}
LOCK = threading.Lock()


def count(name):
    with LOCK:
        COUNTS[name] = COUNTS.get(name, 0) + 1


def unary(req, ctx):
    count("Unary")
    md = [(k, v) for k, v in ctx.invocation_metadata() if k.startswith("x-echo-")]
    ctx.send_initial_metadata(md)
    ctx.set_trailing_metadata([("x-trailer", "done")])
    return req


def fail(req, ctx):
    count("Fail")
    code = int(req.decode() or "13")
    status = next(s for s in grpc.StatusCode if s.value[0] == code)
    ctx.abort(status, "failing on purpose: %d" % code)


def server_stream(req, ctx):
    count("ServerStream")
    n, size = (int(x) for x in req.decode().split(","))
    for i in range(n):
        yield bytes([i % 256]) * size


def client_stream(it, ctx):
    count("ClientStream")
    msgs = total = 0
    for m in it:
        msgs += 1
        total += len(m)
    return b"%d,%d" % (msgs, total)


def bidi(it, ctx):
    count("Bidi")
    for m in it:
        yield m


def sized(req, ctx):
    count("Sized")
    n = int(req.decode())
    block = bytes(range(256)) * 4096  # 1 MiB pattern
    out = bytearray()
    while len(out) < n:
        out += block[: n - len(out)]
    return bytes(out)


def sink(req, ctx):
    count("Sink")
    return b"%d,%s" % (len(req), hashlib.sha256(req).hexdigest().encode())


def sleep(req, ctx):
    count("Sleep")
    deadline = time.time() + float(req.decode() or "1")
    while time.time() < deadline:
        if not ctx.is_active():
            with LOCK:
                CANCELLED["Sleep"] += 1
            return b""
        time.sleep(0.01)
    return b"slept"


def random_payload(n, seed):
    """n pseudo-random bytes: one seeded random MiB, rotated by a different
    amount for every MiB (cheap to build for 1 GiB, and no two MiB alike)."""
    base = random.Random(seed).randbytes(1 << 20)
    mv = memoryview(base)
    out = bytearray(n)
    pos = i = 0
    while pos < n:
        k = (i * 4099) % len(base)
        for part in (mv[k:], mv[:k]):
            take = min(len(part), n - pos)
            out[pos:pos + take] = part[:take]
            pos += take
        i += 1
    return bytes(out)


def random_(req, ctx):
    count("Random")
    n, seed = (int(x) for x in req.decode().split(","))
    return random_payload(n, seed)


def abort_(req, ctx):
    count("Abort")
    n, code = (int(x) for x in req.decode().split(","))
    for i in range(n):
        yield b"msg-%d" % i
    status = next(s for s in grpc.StatusCode if s.value[0] == code)
    ctx.abort(status, "aborted after %d messages" % n)


def stats(req, ctx):
    with LOCK:
        return json.dumps({"counts": COUNTS, "cancelled": CANCELLED}).encode()


def handlers():
    u, ss, cs, bd = (grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler,
                     grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler)
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": u(unary), "Fail": u(fail), "ServerStream": ss(server_stream),
        "ClientStream": cs(client_stream), "Bidi": bd(bidi), "Sized": u(sized),
        "Sink": u(sink), "Sleep": u(sleep), "Stats": u(stats),
        "Random": u(random_), "Abort": ss(abort_),
    })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--max-concurrent-streams", type=int, default=0,
                    help="HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (0: grpcio's default)")
    a = ap.parse_args()
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.so_reuseport", 0)]
    if a.max_concurrent_streams:
        opts.append(("grpc.max_concurrent_streams", a.max_concurrent_streams))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers), options=opts,
                         maximum_concurrent_rpcs=None)
    server.add_generic_rpc_handlers((handlers(),))
    serve(server, a.listen, a.tls_cert, a.tls_key)


def serve(server, listen, tls_cert=None, tls_key=None):
    """Binds |server| to |listen| (TLS when |tls_cert| is given), prints
    "listening PORT" for the test that started us, and serves until killed."""
    if tls_cert:
        creds = grpc.ssl_server_credentials([(open(tls_key, "rb").read(), open(tls_cert, "rb").read())])
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        sys.exit("cannot listen on %s" % listen)
    server.start()
    print("listening %d" % port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
