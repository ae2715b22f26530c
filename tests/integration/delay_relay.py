"""A TCP relay that delays every byte by a fixed time, each way (the kernel
here has no sch_netem, so test_node_faults.py adds latency with this).

    /usr/bin/python3 delay_relay.py --listen 127.0.0.1:PORT --upstream HOST:PORT --delay 0.2

For each accepted connection it opens one to --upstream (a failed connect
closes the accepted one) and forwards bytes both ways, each chunk --delay
seconds after it was read, in order.  At most --buffer bytes are queued per
direction: beyond that it stops reading (TCP flow control pushes back on the
sender).  When either side closes or fails, what is already queued for the
other side is still delivered (after its delay), then both are closed.
Prints "listening PORT" once it accepts connections; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
               limit: int) -> None:
    """Copies reader -> writer, each chunk |delay| s after it arrived."""
    loop = asyncio.get_running_loop()
    queue: collections.deque = collections.deque()   # (due, bytes)
    queued = 0
    changed = asyncio.Event()
    eof = False

    async def read_side() -> None:
        nonlocal queued, eof
        try:
            while True:
                while queued >= limit:
                    changed.clear()
                    await changed.wait()
                data = await reader.read(65536)
                if not data:
                    break
                queue.append((loop.time() + delay, data))
                queued += len(data)
                changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            eof = True
            changed.set()

    async def write_side() -> None:
        nonlocal queued
        while True:
            if not queue:
                if eof:
                    return
                changed.clear()
                await changed.wait()
                continue
            due, data = queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            queue.popleft()
            queued -= len(data)
            changed.set()

    reading = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        reading.cancel()


async def relay(down_r, down_w, args) -> None:
    host, port = args.upstream.rsplit(":", 1)
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                            args.connect_timeout)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"connect to {args.upstream} failed: {e!r}", file=sys.stderr, flush=True)
        down_w.close()
        return
    pumps = [asyncio.ensure_future(pump(down_r, up_w, args.delay, args.buffer)),
             asyncio.ensure_future(pump(up_r, down_w, args.delay, args.buffer))]
    # Whichever direction ends first (a close, or an error) ends both.
    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    for p in pumps:
        p.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    for w in (down_w, up_w):
        w.close()


async def main(args) -> None:
    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(lambda r, w: relay(r, w, args), host, int(port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    p.add_argument("--delay", type=float, default=0.2, help="seconds added each way (0.2)")
    p.add_argument("--buffer", type=int, default=4 << 20,
                   help="bytes queued per direction before reading stops (4 MiB)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    asyncio.run(main(p.parse_args()))
