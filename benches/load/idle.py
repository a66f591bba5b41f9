#!/usr/bin/env python3
"""Opens N keep-alive TLS connections to a target, sends one request on each (so the server has set up
its per-connection HTTP state, as on any idle keep-alive connection), then holds them all idle.

Prints one JSON line {"opened": .., "ok": .., "failed": .., "seconds": ..} once every connection is open and
idle, then keeps them until stdin is closed (or --hold seconds pass), and exits.

usage: idle.py HOST PORT CA_FILE TOKEN_FILE [-n 1000] [--concurrency 50] [--hold 60]
"""

import argparse
import asyncio
import json
import os
import ssl
import sys
import time


async def open_one(host, port, ctx, request, sem, conns, stats):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"), 20
            )
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), 20)
            stats["ok" if head.startswith(b"HTTP/1.1 200") else "bad_status"] += 1
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - a failed connection is counted, not fatal
            stats["failed"] += 1
            stats.setdefault("error", repr(e))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("ca")
    ap.add_argument("tokens")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--hold", type=float, default=60)
    a = ap.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    with open(a.tokens) as f:
        tokens = [line.strip() for line in f if line.strip()]
    sem = asyncio.Semaphore(a.concurrency)
    conns, stats = [], {"ok": 0, "bad_status": 0, "failed": 0}
    t0 = time.time()
    jobs = []
    for i in range(a.n):
        req = (
            f"GET /orders/idle-{i} HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens[i % len(tokens)]}\r\n\r\n"
        ).encode()
        jobs.append(open_one(a.host, a.port, ctx, req, sem, conns, stats))
    await asyncio.gather(*jobs)
    stats["opened"] = len(conns)
    stats["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(stats), flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), a.hold)
    except asyncio.TimeoutError:
        pass
    for _, w in conns:
        w.close()
    # Exit at once: the executor thread may still sit in stdin.read(), and no close_notify needs awaiting.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
