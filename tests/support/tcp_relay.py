"""A TCP relay: accepts connections on LISTEN_HOST:PORT and copies bytes both ways to TARGET_HOST:PORT.

    python -m tests.support.tcp_relay LISTEN_HOST:PORT TARGET_HOST:PORT [LISTEN_HOST:PORT TARGET_HOST:PORT ...]

tests.support.netns runs one in the root namespace so that network namespaces reach PostgreSQL and Redis, which
listen on 127.0.0.1 only. It prints "ready" once every listener is bound and stops on SIGTERM or SIGINT.

Each connection gets its own upstream connection. An end of file is passed on as a half-close, so a peer that
shuts down its sending side still gets its answer; a reset on either side resets the other one too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import socket
import struct
import sys
from collections.abc import Sequence

_CHUNK_BYTES = 64 * 1024
# Many clients may connect at once (a pool opening, a load test): the default backlog of 100 would drop SYNs.
_LISTEN_BACKLOG = 4096
_SHUTDOWN_SECONDS = 2.0

Endpoint = tuple[str, int]


def parse_endpoint(text: str) -> Endpoint:
    """'host:port' as (host, port)."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _relay(
    target: Endpoint,
    open_writers: set[asyncio.StreamWriter],
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
) -> None:
    writers = [client_writer]
    open_writers.add(client_writer)
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        writers.append(upstream_writer)
        open_writers.add(upstream_writer)
        async with asyncio.TaskGroup() as directions:
            directions.create_task(_copy(client_reader, upstream_writer))
            directions.create_task(_copy(upstream_reader, client_writer))
    except* OSError as errors:
        if len(writers) == 1:
            print(f"tcp_relay: cannot connect to {target[0]}:{target[1]}: {errors.exceptions[0]}", file=sys.stderr)
        # The target refused, or one side was reset: reset the other side too instead of leaving it waiting.
        for writer in writers:
            _reset(writer)
    finally:
        for writer in writers:
            writer.close()
            open_writers.discard(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    # abort() alone would close with a FIN, which reads as a clean end; a zero linger time makes it a RST.
    connection = writer.get_extra_info("socket")
    if connection is not None:
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve(routes: Sequence[tuple[Endpoint, Endpoint]]) -> None:
    """Relay every (listen, target) route until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    open_writers: set[asyncio.StreamWriter] = set()
    servers = [
        await asyncio.start_server(
            functools.partial(_relay, target, open_writers), host, port, backlog=_LISTEN_BACKLOG, reuse_address=True
        )
        for (host, port), target in routes
    ]
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    # Server.close() leaves accepted connections open (Python 3.11). Closing both sides of each (a FIN after what
    # is already buffered) ends its relay; cancelling the relays instead makes asyncio log each one as an error.
    for writer in list(open_writers):
        writer.close()
    relays = asyncio.all_tasks() - {asyncio.current_task()}
    if relays:
        await asyncio.wait(relays, timeout=_SHUTDOWN_SECONDS)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.tcp_relay", description=__doc__.splitlines()[0])
    parser.add_argument("endpoints", nargs="+", type=parse_endpoint, metavar="HOST:PORT", help="LISTEN TARGET pairs")
    endpoints = parser.parse_args().endpoints
    if len(endpoints) % 2:
        parser.error("endpoints come in pairs: LISTEN_HOST:PORT TARGET_HOST:PORT")
    asyncio.run(serve(list(zip(endpoints[::2], endpoints[1::2], strict=True))))


if __name__ == "__main__":
    main()
