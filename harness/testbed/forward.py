"""A TCP forwarder that runs inside a host namespace and accepts on sockets it inherited from
outside: how a test (or an operator's shell) reaches services that listen only on addresses of
the bed's namespaces, with no address added to its own namespace.

The bed binds ``127.0.0.1:<free>`` listeners in the caller's namespace and passes their file
descriptors; this process, started with ``ip netns exec <host>``, accepts on them (a socket
stays in the namespace it was made in) and connects each connection to its target inside the
host (the host's own address, or its loopback for the Consul agent's HTTP API):

    python -m harness.testbed.forward 5=10.77.0.1:8080 6=127.0.0.1:8500

Bytes are copied both ways, half-closes passed on; a target that refuses or does not answer
within 5 s closes the client's connection. A partitioned host is still reachable this way,
since the forwarder runs on the host itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

CONNECT_TIMEOUT_S = 5.0
CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


async def _serve_one(
    target: tuple[str, int], client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*target), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
    finally:
        for w in (up_w, client_w):
            w.close()
            with contextlib.suppress(OSError, RuntimeError):
                await w.wait_closed()


def parse(spec: str) -> tuple[int, tuple[str, int]]:
    """``"5=10.77.0.1:8080"`` -> ``(5, ("10.77.0.1", 8080))``."""
    fd, _, target = spec.partition("=")
    host, _, port = target.rpartition(":")
    if not fd.isdigit() or not host or not port.isdigit():
        raise ValueError(f"{spec!r}: expected FD=HOST:PORT")
    return int(fd), (host, int(port))


async def main(specs: list[str]) -> None:
    servers = []
    for fd, target in map(parse, specs):
        sock = socket.socket(fileno=fd)

        async def handle(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: tuple[str, int] = target
        ) -> None:
            await _serve_one(target, r, w)

        servers.append(await asyncio.start_server(handle, sock=sock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("forwarding " + " ".join(specs), flush=True)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
