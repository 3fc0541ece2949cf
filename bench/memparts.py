"""What the parts of an idle session cost outside Python, measured alone: ``python -m
bench.memparts [N]``.

tracemalloc (``python -m bench --only memory --memtrace DIR``) sees Python's objects only;
OpenSSL and libxml2 allocate with malloc. Here N of each part are made and glibc's in-use
bytes (``mallinfo2``) are read before and after: an lxml stream parser as the codec holds it
(after a header and a stanza, released, released while a stanza it produced is kept), and
a TLS endpoint of each kind (OpenSSL over memory BIOs, the proxy's own contexts' defaults, an
RSA-2048 certificate, TLS 1.3), after the handshake, after session tickets, after data.
"""

from __future__ import annotations

import gc
import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.xmpp import codec
from tests.peers.certs import make_cert

from .memtrace import heap

HEADER = codec.stream_header(to="localhost")
STANZA = b"<message to='a@localhost' id='1'><body>an ordinary message</body></message>"


def per_item(n: int, make: Callable[[], Any], after: Callable[[Any], Any] | None = None
             ) -> tuple[float, float | None]:
    """C heap bytes per item once made, and (with ``after``) once ``after`` ran on each."""
    gc.collect()
    start = heap()["in_use"]
    items = [make() for _ in range(n)]
    gc.collect()
    made = (heap()["in_use"] - start) / n
    if after is None:
        return made, None
    kept = [after(item) for item in items]
    gc.collect()
    then = (heap()["in_use"] - start) / n
    del kept
    return made, then


def parsers(n: int) -> list[tuple[str, float]]:
    def fed() -> tuple[codec.XmlStreamParser, Any]:
        parser = codec.XmlStreamParser()
        parser.feed(HEADER)
        (event,) = parser.feed(STANZA)
        return parser, event

    def release(item: tuple[codec.XmlStreamParser, Any]) -> None:
        assert item[0].release()

    def release_keeping_the_stanza(item: tuple[codec.XmlStreamParser, Any]) -> Any:
        assert item[0].release()
        return item[1]  # a stanza a feature keeps keeps its parser alive (lxml)

    rows = []
    held, released = per_item(n, lambda: fed()[0], lambda p: p.release())
    rows += [("stream parser, header and a stanza fed", held)]
    rows += [("  released (codec release)", released or 0.0)]
    _, pinned = per_item(n, fed, release_keeping_the_stanza)
    rows += [("  released, a stanza it produced kept (stanza included)", pinned or 0.0)]
    return rows


def _move(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


class _Pair:
    """A TLS server and client endpoint over memory BIOs, handshake done."""

    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        self.si, self.so, self.ci, self.co = (ssl.MemoryBIO() for _ in range(4))
        self.s: ssl.SSLObject | None = server.wrap_bio(self.si, self.so, server_side=True)
        self.c: ssl.SSLObject | None = client.wrap_bio(self.ci, self.co,
                                                       server_hostname="localhost")
        for _ in range(6):
            for end in (self.c, self.s):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            _move(self.co, self.si)
            _move(self.so, self.ci)

    def client_reads(self) -> None:
        assert self.c is not None
        try:
            self.c.read(4096)
        except ssl.SSLWantReadError:
            pass

    def exchange(self) -> None:
        """Data both ways, each side reading what it got."""
        assert self.s is not None and self.c is not None
        self.s.write(b"x" * 200)
        _move(self.so, self.ci)
        self.client_reads()
        self.c.write(b"y" * 200)
        _move(self.co, self.si)
        try:
            self.s.read(4096)
        except ssl.SSLWantReadError:
            pass
        self.s.write(b"z" * 200)
        _move(self.so, self.ci)
        self.client_reads()


def tls(n: int) -> list[tuple[str, float]]:
    folder = Path(tempfile.mkdtemp(prefix="memparts-"))
    cert, key = make_cert(folder)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    client = ssl.create_default_context(cafile=str(cert))
    rows = []
    for label, step in (("after the handshake", None),
                        ("after reading the session tickets only", _Pair.client_reads),
                        ("after data both ways", _Pair.exchange)):
        def make(step: Callable[[_Pair], None] | None = step) -> _Pair:
            pair = _Pair(server, client)
            if step is not None:
                step(pair)
            return pair

        def drop_client(pair: _Pair) -> _Pair:
            pair.c = None
            pair.ci = pair.co = ssl.MemoryBIO()
            return pair
        both, server_only = per_item(n, make, drop_client)
        assert server_only is not None
        rows += [(f"TLS server endpoint, {label}", server_only),
                 (f"TLS client endpoint (verifying), {label}", both - server_only)]
    return rows


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1000
    print(f"C heap in use (glibc mallinfo2) per item, {n} of each:")
    for label, size in [*parsers(n), *tls(n)]:
        print(f"  {size / 1024:6.2f} KiB  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
