"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2), socket-free.

A load balancer in front of the proxy writes one header first on each connection, before
TLS, saying whom it accepted the connection from. This module reads and writes such
headers; it knows nothing of sockets. The shell asks :func:`more_needed` how many bytes to
read next (never more than the header has, so what follows it, a TLS ClientHello or the
first XML, stays unread), then :func:`parse` on the complete header.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes, CRLF included (the spec's worst case, TCP6 with five-digit ports)
_V2_FIXED = 16  # signature, version/command, family/transport, length
_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_COMMON = min(len(V1_PREFIX), len(V2_SIGNATURE))  # what both versions' starts are told apart by


class BadProxyHeader(ValueError):
    """Not a PROXY header, or a broken one: the connection must be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """``source``/``destination``: (address, port) as the balancer saw the connection, or
    None when the header carries none (v1 ``UNKNOWN``, v2 ``LOCAL``, an unspecified or
    UNIX family): then the connection's own addresses stand."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took on the wire


def more_needed(data: bytes) -> int:
    """How many more bytes the header starting ``data`` needs at least: 0 when ``data``
    holds a complete header (and nothing after it). Never more than the header still
    has, so a reader asking for exactly this many never reads past it. Raises
    BadProxyHeader as soon as ``data`` cannot begin a header."""
    if len(data) < _COMMON:
        if not (V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data)):
            raise BadProxyHeader("no PROXY protocol header")
        return _COMMON - len(data)
    if data.startswith(V1_PREFIX):
        end = data.find(b"\r\n")
        if end >= 0:
            if end + 2 != len(data):
                raise BadProxyHeader("bytes after the header's CRLF")  # a caller's mistake
            return 0
        if len(data) >= V1_MAX or b"\n" in data:
            raise BadProxyHeader("v1 header without CRLF within 107 bytes")
        return 1  # a line: its end is known only when seen
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise BadProxyHeader("no PROXY protocol header")
    if len(data) < _V2_FIXED:
        return _V2_FIXED - len(data)
    total = _V2_FIXED + struct.unpack_from("!H", data, 14)[0]
    if len(data) > total:
        raise BadProxyHeader("bytes after the header")
    return total - len(data)


def parse(data: bytes) -> ProxyHeader:
    """A complete header (``more_needed(data) == 0``) → what it says."""
    if more_needed(data) != 0:
        raise BadProxyHeader("truncated header")
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


def _parse_v1(data: bytes) -> ProxyHeader:
    try:
        line = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise BadProxyHeader("v1 header is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, len(data))  # the rest of the line is ignored
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise BadProxyHeader(f"v1 header: expected PROXY TCP4|TCP6 src dst sport dport, "
                             f"got {line[:60]!r}")
    version = 4 if parts[1] == "TCP4" else 6
    source = (_v1_address(parts[2], version), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], version), _v1_port(parts[5]))
    return ProxyHeader(1, source, destination, len(data))


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise BadProxyHeader(f"v1 header: {text[:45]!r} is not an address") from None
    if address.version != version:
        raise BadProxyHeader(f"v1 header: {text!r} is not an IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    # Decimal, 0-65535, no sign and no leading zero (the spec's form).
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise BadProxyHeader(f"v1 header: {text[:8]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader:
    version_command, family_transport = data[12], data[13]
    if version_command >> 4 != 2:
        raise BadProxyHeader(f"v2 header: version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0x0, 0x1):  # LOCAL, PROXY
        raise BadProxyHeader(f"v2 header: command {command}")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > 0x3 or transport > 0x2:
        raise BadProxyHeader(f"v2 header: family {family}, transport {transport}")
    body = data[_V2_FIXED:]
    needed = _V2_ADDRESS_BYTES.get(family, 0)
    if len(body) < needed:
        raise BadProxyHeader(f"v2 header: {len(body)} address bytes for family {family}")
    if command == 0x0 or family in (0x0, 0x3):
        # LOCAL (the balancer's own health check), or no IP address: the connection's
        # own addresses stand. TLVs after the addresses are ignored.
        return ProxyHeader(2, None, None, len(data))
    if family == 0x1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport), len(data))
    src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    return ProxyHeader(2, (str(ipaddress.IPv6Address(src)), sport),
                       (str(ipaddress.IPv6Address(dst)), dport), len(data))


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header; ``UNKNOWN`` when either end is not known (or their families differ)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v2 header over TCP; ``LOCAL`` when either end is not known."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if src.version == 4:
        body = struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x11  # INET, STREAM
    else:
        body = struct.pack("!16s16sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x21  # INET6, STREAM
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
