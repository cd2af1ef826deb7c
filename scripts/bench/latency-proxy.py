#!/usr/bin/env python3
"""A TCP proxy that adds latency, for zfsync's benchmark (`make bench`).

    latency-proxy.py proxy --target HOST:PORT [--listen PORT] [--delay-ms 25]
                           [--connect-delay-ms MS] [--port-file FILE]
    latency-proxy.py echo [--listen PORT] [--port-file FILE]
    latency-proxy.py ping HOST:PORT [--count 20]

`proxy` accepts connections on 127.0.0.1 and forwards each to the target. Every
chunk read from one side is written to the other side DELAY ms after it
arrived, in both directions (25 ms each way: a 50 ms round trip). It is a delay
line, not a throttle: a reader keeps reading while earlier chunks wait for
their time, so order is kept and throughput is not limited (up to 64 MiB per
direction may be in flight; beyond that the reader waits). End of stream (a
half close) travels through the line like data. The upstream connection is
opened CONNECT_DELAY ms after the client connected (default: one round trip,
what the TCP handshake of a real link costs); data the client sends meanwhile
waits in the line.

`echo` is an echo server and `ping` measures round trips through whatever it
connects to (1-byte messages, prints the median and the spread in ms): the
benchmark uses the two to check the proxy's delay.

Listening port 0 (the default) takes a free port; --port-file receives the
port number once the socket listens. Standard library only.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

CHUNK = 256 * 1024
MAX_IN_FLIGHT = 64 << 20


async def delay_line(reader, writer, delay, start_at, stats):
    """Copies reader to writer, each chunk delay seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    room = asyncio.Condition()
    in_flight = [0]
    dead = [False]

    async def pump_in():
        try:
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                async with room:
                    await room.wait_for(lambda: in_flight[0] < MAX_IN_FLIGHT or dead[0])
                if dead[0]:
                    return
                    in_flight[0] += len(data)
                queue.put_nowait((now + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time(), None))

    async def pump_out():
        await start_at
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:  # the reading side failed: abort
                writer.transport.abort()
                return
            if not data:
                if writer.can_write_eof():
                    try:
                        writer.write_eof()
                    except (ConnectionError, OSError):
                        pass
                return
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                async with room:
                    dead[0] = True
                    room.notify_all()
                return
            stats[0] += len(data)
            async with room:
                in_flight[0] -= len(data)
                room.notify_all()

    await asyncio.gather(pump_in(), pump_out())


async def serve_proxy(args):
    host, port = args.target.rsplit(":", 1)
    delay = args.delay_ms / 1000.0
    connect_delay = (args.connect_delay_ms if args.connect_delay_ms is not None else 2 * args.delay_ms) / 1000.0

    async def handle(c_reader, c_writer):
        loop = asyncio.get_running_loop()
        up = loop.create_future()

        async def connect():
            await asyncio.sleep(connect_delay)
            try:
                u = await asyncio.open_connection(host, int(port))
                up.set_result(u)
            except OSError as e:
                up.set_exception(e)

        asyncio.ensure_future(connect())
        try:
            u_reader, u_writer = await up
        except OSError as e:
            print(f"latency-proxy: cannot connect to {args.target}: {e}", file=sys.stderr)
            c_writer.transport.abort()
            return
        ready = loop.create_future()
        ready.set_result(None)
        stats = [0]
        try:
            await asyncio.gather(
                delay_line(c_reader, u_writer, delay, ready, stats),
                delay_line(u_reader, c_writer, delay, ready, stats),
            )
        finally:
            for w in (u_writer, c_writer):
                try:
                    w.close()
                except Exception:
                    pass

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen, limit=CHUNK)
    announce(server, args)
    async with server:
        await server.serve_forever()


async def serve_echo(args):
    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    announce(server, args)
    async with server:
        await server.serve_forever()


def announce(server, args):
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.rename(tmp, args.port_file)
    else:
        print(port, flush=True)


async def ping(args):
    host, port = args.target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    rtts = []
    for i in range(args.count + 1):
        t0 = time.monotonic()
        writer.write(b"x")
        await writer.drain()
        got = await reader.readexactly(1)
        assert got == b"x"
        if i > 0:  # the first one also waits for the upstream connection
            rtts.append((time.monotonic() - t0) * 1000.0)
    writer.close()
    print(f"rtt ms: median {statistics.median(rtts):.1f}, min {min(rtts):.1f}, max {max(rtts):.1f} ({args.count} pings)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("proxy")
    pp.add_argument("--target", required=True, help="HOST:PORT to forward to")
    pp.add_argument("--listen", type=int, default=0)
    pp.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (each direction)")
    pp.add_argument("--connect-delay-ms", type=float, default=None, help="default: 2 x delay (one round trip)")
    pp.add_argument("--port-file")
    pe = sub.add_parser("echo")
    pe.add_argument("--listen", type=int, default=0)
    pe.add_argument("--port-file")
    pg = sub.add_parser("ping")
    pg.add_argument("target", help="HOST:PORT")
    pg.add_argument("--count", type=int, default=20)
    args = p.parse_args()
    try:
        if args.cmd == "proxy":
            asyncio.run(serve_proxy(args))
        elif args.cmd == "echo":
            asyncio.run(serve_echo(args))
        else:
            asyncio.run(ping(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
