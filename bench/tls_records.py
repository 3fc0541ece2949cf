"""Instructions per TLS round trip: asyncio's TLS (``sslproto``) against ``TlsTransport``.

``python -m bench.tls_records [--rounds N] [--size BYTES]``

One process, one loopback connection, TLS at both ends with the same implementation: the
client writes ``size`` bytes, the server's protocol writes them back as they come, the
client writes again once it has them all. So each round trip is two TLS writes and two TLS
reads (and their syscalls), with protocols that do nothing else. Counted under valgrind's
callgrind with ``N`` and ``3N`` round trips, which cancels start-up and the handshake:

    instructions per round trip = (I(3N) - I(N)) / 2N
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.peers.certs import make_cert

_COLLECTED = re.compile(rb"Collected : (\d+)")


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Client(asyncio.Protocol):
    def __init__(self, rounds: int, size: int, done: asyncio.Future[None]) -> None:
        self.left = rounds
        self.message = b"x" * size
        self.waiting = 0
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.waiting = len(self.message)
        self.transport.write(self.message)

    def data_received(self, data: bytes) -> None:
        self.waiting -= len(data)
        if self.waiting > 0:
            return
        self.left -= 1
        if self.left:
            self._send()
        elif not self.done.done():
            self.done.set_result(None)


async def _run(kind: str, rounds: int, size: int, cert: Path, key: Path) -> None:
    from proxy.net.tls_transport import TlsTransport, handshake

    loop = asyncio.get_running_loop()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    done: asyncio.Future[None] = loop.create_future()
    if kind == "asyncio":
        server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(lambda: _Client(rounds, size, done),
                                                    "127.0.0.1", port, ssl=client_ctx,
                                                    server_hostname="localhost")
        await done
        transport.close()
        server.close()
        return
    with socket.create_server(("127.0.0.1", 0)) as listener:
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
    s_tls, c_tls = await asyncio.gather(
        handshake(s, server_ctx, server_side=True, timeout=10),
        handshake(c, client_ctx, server_side=False, server_hostname="localhost", timeout=10))
    echo = TlsTransport(loop, s_tls, _Echo(), call_connection_made=True)
    client = TlsTransport(loop, c_tls, _Client(rounds, size, done), call_connection_made=True)
    await done
    client.close()
    echo.close()


def _count(kind: str, rounds: int, size: int, cert: Path, key: Path) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "bench.tls_records", "--inner", kind, "--rounds", str(rounds),
         "--size", str(size), "--cert", str(cert), "--key", str(key)],
        capture_output=True, check=True, timeout=1800)
    found = _COLLECTED.search(out.stderr)
    if found is None:
        raise RuntimeError(out.stderr.decode(errors="replace")[-2000:])
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_records", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1000, help="N (1000)")
    p.add_argument("--size", type=int, default=2000,
                   help="bytes per message (2000: about what one read brings the relay)")
    p.add_argument("--inner", choices=("asyncio", "own"), help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.inner:
        asyncio.run(_run(opts.inner, opts.rounds, opts.size, Path(opts.cert), Path(opts.key)))
        return 0
    if shutil.which("valgrind") is None:
        print("bench.tls_records needs valgrind", file=sys.stderr)
        return 2
    cert, key = make_cert(Path(tempfile.mkdtemp(prefix="xmpp-front-tls-")), "localhost")
    for kind in ("asyncio", "own"):
        small = _count(kind, opts.rounds, opts.size, cert, key)
        large = _count(kind, 3 * opts.rounds, opts.size, cert, key)
        per = (large - small) / (2 * opts.rounds)
        name = "asyncio sslproto" if kind == "asyncio" else "TlsTransport"
        print(f"{name}: {per:,.0f} instructions per round trip of {opts.size} bytes "
              "(two TLS writes, two TLS reads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
