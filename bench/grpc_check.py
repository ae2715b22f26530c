#!/usr/bin/python3
"""bench/grpc_check.py: a real-gRPC correctness pass through one system.

    /usr/bin/python3 bench/grpc_check.py HOST:PORT [CA.pem]

With CA.pem the channel is TLS (the certificate must cover 127.0.0.1),
without it h2c.  Checks, against bench/backend.c:
  1. unary Echo: the reply equals the request, the trailer set by the
     backend (bench-trailer) arrives, grpc-status is OK;
  2. Trailers-Only error: /bench.B/Fail ends with FAILED_PRECONDITION and
     its message, and an unknown method with UNIMPLEMENTED;
  3. 4 MiB both ways (Echo) and a 4 MiB download (Size);
  4. 100 concurrent Echo calls with distinct payloads on one channel.
Prints one line per check; exits 1 on the first failure.
"""
import os
import sys
import time

import grpc

MIB = 1 << 20


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def main():
    target = sys.argv[1]
    opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
            ("grpc.enable_retries", 0)]
    if len(sys.argv) > 2:
        with open(sys.argv[2], "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        ch = grpc.secure_channel(target, creds, options=opts)
    else:
        ch = grpc.insecure_channel(target, options=opts)
    grpc.channel_ready_future(ch).result(timeout=10)
    ident = lambda b: b  # noqa: E731  raw bytes both ways
    echo = ch.unary_unary("/bench.B/Echo", request_serializer=ident, response_deserializer=ident)
    size = ch.unary_unary("/bench.B/Size", request_serializer=ident, response_deserializer=ident)
    fail = ch.unary_unary("/bench.B/Fail", request_serializer=ident, response_deserializer=ident)
    nope = ch.unary_unary("/bench.B/Nope", request_serializer=ident, response_deserializer=ident)
    t0 = time.monotonic()

    def check(name, ok, detail=""):
        print(("ok   " if ok else "FAIL ") + name + ((": " + detail) if detail else ""), flush=True)
        if not ok:
            sys.exit(1)

    # 1. unary with trailers
    req = os.urandom(100)
    resp, call = echo.with_call(req, metadata=(("bench-trailer", "t-42"),), timeout=10)
    tr = dict(call.trailing_metadata() or ())
    check("unary echo 100 B", resp == req)
    check("trailers pass through", tr.get("bench-trailer") == "t-42" and call.code() == grpc.StatusCode.OK,
          "trailing metadata %r" % (tr,))

    # 2. Trailers-Only errors
    for stub, code, msg in ((fail, grpc.StatusCode.FAILED_PRECONDITION, "bench: failed as asked"),
                            (nope, grpc.StatusCode.UNIMPLEMENTED, "bench: unknown method")):
        try:
            stub(b"\x08\x01", timeout=10)
            check("Trailers-Only %s" % code.name, False, "call succeeded")
        except grpc.RpcError as e:
            check("Trailers-Only %s" % code.name, e.code() == code and e.details() == msg,
                  "%s %r" % (e.code(), e.details()))

    # 3. 4 MiB both ways, and a 4 MiB download
    big = os.urandom(4 * MIB)
    check("echo 4 MiB up and down", echo(big, timeout=30) == big)
    got = size(b"\x08" + varint(4 * MIB), timeout=30)
    check("download 4 MiB (Size)", len(got) == 4 * MIB)
    got = size(b"\x08" + varint(10) + b"\x12" + varint(4 * MIB) + bytes(4 * MIB), timeout=30)
    check("upload 4 MiB (Size)", len(got) == 10)

    # 4. 100 concurrent calls
    reqs = [os.urandom(64 + i) for i in range(100)]
    futs = [echo.future(r, timeout=30) for r in reqs]
    bad = sum(1 for r, f in zip(reqs, futs) if f.result() != r)
    check("100 concurrent echo calls", bad == 0, "%d wrong" % bad if bad else "")
    print("all checks passed in %.2f s" % (time.monotonic() - t0))
    ch.close()


if __name__ == "__main__":
    main()
