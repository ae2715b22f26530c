#!/usr/bin/python3
"""bench/legit.py: the legit caller of bench/attacks (run with /usr/bin/python3,
Debian's grpcio).

    /usr/bin/python3 bench/legit.py HOST:PORT CA.pem INTERVAL PATH [INFLIGHT IPATH IREQ]

One grpcio channel over TLS (one connection of its own, retries off).  A
thread makes unary calls to PATH (100 B request; bench/backend.c's Echo or
the grpcio echo server's Unary), one after the other, INTERVAL s apart, each
with a 5 s deadline.  With INFLIGHT > 0, as many more threads keep one call
to IPATH with request IREQ (e.g. /test.Echo/Sleep, "1") in flight each, on
the same channel: calls in progress on the proxy's upstream when an attack
lands.

Prints "READY" once a call has succeeded; stops starting calls when stdin
closes, waits for the calls in progress, then prints one JSON list of
[kind, start (CLOCK_MONOTONIC s), seconds, status] per call and exits.
"""
import json
import sys
import threading
import time

import grpc


def main():
    target, ca, interval, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    inflight = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    ipath, ireq = (sys.argv[6], sys.argv[7].encode()) if inflight else ("", b"")
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    ch = grpc.secure_channel(target, creds, options=[("grpc.enable_retries", 0)])
    ident = lambda b: b  # noqa: E731  raw bytes both ways
    quick = ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)
    slow = ch.unary_unary(ipath, request_serializer=ident, response_deserializer=ident) if inflight else None
    req = b"\x0a\x62" + b"l" * 98  # protobuf field 1, 98 bytes: 100 B
    calls, lock = [], threading.Lock()
    stop, ready = threading.Event(), threading.Event()

    def call(kind, fn, arg, timeout):
        t0 = time.monotonic()
        try:
            fn(arg, timeout=timeout)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name if e.code() else "UNKNOWN"
        with lock:
            calls.append([kind, t0, time.monotonic() - t0, code])
        return code == "OK"

    def quick_loop():
        while not stop.is_set():
            if call("quick", quick, req, 5.0):
                ready.set()
            stop.wait(interval)

    def slow_loop():
        while not stop.is_set():
            if not call("inflight", slow, ireq, 10.0):
                stop.wait(0.2)

    threads = [threading.Thread(target=quick_loop)] + [threading.Thread(target=slow_loop) for _ in range(inflight)]
    for t in threads:
        t.start()
    # The first call waits for the connection (up to 10 s).
    if ready.wait(10):
        print("READY", flush=True)
    else:
        print("NOT READY", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(timeout=15)
    with lock:
        print(json.dumps(calls), flush=True)
    ch.close()


if __name__ == "__main__":
    main()
