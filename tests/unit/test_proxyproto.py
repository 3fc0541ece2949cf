"""The PROXY protocol parser (proxy/proxyproto.py): the spec's examples, broken headers,
and properties: what is encoded parses back, a reader asking ``more_needed`` never reads
past the header, and no input raises anything but BadProxyHeader."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from proxy.proxyproto import (V2_SIGNATURE, BadProxyHeader, encode_v1, encode_v2,
                              more_needed, parse)


def read_header(stream: bytes) -> tuple[bytes, bytes]:
    """What the shell does: read exactly what more_needed asks for; (header, the rest)."""
    got = b""
    while (n := more_needed(got)) > 0:
        if len(got) + n > len(stream):
            raise EOFError
        got += stream[len(got):len(got) + n]
    return got, stream[len(got):]


def test_v1_tcp4_from_the_spec() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    header = parse(data)
    assert header.version == 1
    assert header.source == ("192.168.0.1", 56324)
    assert header.destination == ("192.168.0.11", 443)
    assert header.length == len(data)


def test_v1_tcp6_and_unknown() -> None:
    header = parse(b"PROXY TCP6 2001:db8::1 ::1 65535 5222\r\n")
    assert header.source == ("2001:db8::1", 65535)
    assert parse(b"PROXY UNKNOWN\r\n").source is None
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").source is None  # rest ignored


def test_v2_inet_as_haproxy_writes_it() -> None:
    # 172.19.0.1:42578 -> 172.19.0.3:80, as captured from HAProxy (PROXY, INET, STREAM).
    data = V2_SIGNATURE + bytes.fromhex("2111000c ac130001 ac130003 a652 0050")
    header = parse(data)
    assert header.version == 2
    assert header.source == ("172.19.0.1", 42578)
    assert header.destination == ("172.19.0.3", 80)


def test_v2_local_and_tlvs() -> None:
    local = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    assert parse(local).source is None
    # A TLV (type 0x04 NOOP, 3 bytes) after the INET addresses is skipped.
    body = struct.pack("!4s4sHH", bytes([10, 0, 0, 7]), bytes([10, 0, 0, 1]), 1234, 5222)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"
    data = V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body + tlv)) + body + tlv
    assert parse(data).source == ("10.0.0.7", 1234)
    assert parse(data).length == len(data)


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.0\r\n", "no PROXY"),
    (b"<?xml version='1.0'?>", "no PROXY"),
    (b"\x16\x03\x01\x02\x00\x01", "no PROXY"),  # a TLS ClientHello: the balancer is missing
    (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.400 1.2.3.5 1 2\r\n", "not an address"),
    (b"PROXY TCP4 ::1 1.2.3.5 1 2\r\n", "not an IPv4"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 -1 2\r\n", "not a port"),
    (b"PROXY TCP4 1.2.3.4\n", "without CRLF"),
    (b"PROXY " + b"x" * 120, "without CRLF"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\r\nmore", "after"),
    (V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12), "version 1"),
    (V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), "command 2"),
    (V2_SIGNATURE + bytes([0x21, 0x41, 0, 12]) + bytes(12), "family 4"),
    (V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12), "12 address bytes"),
    (V2_SIGNATURE[:11] + b"X" + bytes(4), "no PROXY"),
])
def test_broken_headers_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(BadProxyHeader, match=why):
        parse(data)


def test_truncated_headers_ask_for_more_instead_of_failing() -> None:
    full = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    for cut in range(len(full)):
        assert more_needed(full[:cut]) > 0
        with pytest.raises(BadProxyHeader, match="truncated"):
            parse(full[:cut])


ipv4 = hs.ip_addresses(v=4).map(str)
ipv6 = hs.ip_addresses(v=6).map(str)
port = hs.integers(0, 65535)
endpoints = hs.one_of(
    hs.tuples(hs.tuples(ipv4, port), hs.tuples(ipv4, port)),
    hs.tuples(hs.tuples(ipv6, port), hs.tuples(ipv6, port)))


@given(endpoints, hs.sampled_from([encode_v1, encode_v2]), hs.binary(max_size=64))
def test_encoded_headers_parse_back_and_nothing_after_them_is_read(
        ends: tuple[tuple[str, int], tuple[str, int]], encode: object,
        after: bytes) -> None:
    source, destination = ends
    data = encode(source, destination)  # type: ignore[operator]
    header, rest = read_header(data + after)
    assert rest == after  # the TLS ClientHello or the first XML stays unread
    parsed = parse(header)
    assert parsed.source == source and parsed.destination == destination
    assert parsed.length == len(data)
    assert parsed.version == (1 if encode is encode_v1 else 2)
    assert len(data) <= 107 or encode is encode_v2


@given(endpoints, hs.sampled_from([encode_v1, encode_v2]), hs.data())
def test_any_truncation_asks_for_at_most_what_is_missing(
        ends: tuple[tuple[str, int], tuple[str, int]], encode: object,
        data: hs.DataObject) -> None:
    full = encode(*ends)  # type: ignore[operator]
    cut = data.draw(hs.integers(0, len(full) - 1))
    needed = more_needed(full[:cut])
    assert 0 < needed <= len(full) - cut


@given(hs.binary(max_size=300))
def test_arbitrary_bytes_raise_only_bad_proxy_header(data: bytes) -> None:
    try:
        header = parse(data)
    except BadProxyHeader:
        return
    assert header.length == len(data)


@given(hs.binary(max_size=40))
def test_arbitrary_bytes_after_a_v2_signature(data: bytes) -> None:
    candidate = V2_SIGNATURE + data
    try:
        needed = more_needed(candidate)
        if needed == 0:
            assert parse(candidate).version == 2
        else:  # what is missing is what the length field says
            assert len(candidate) < 16 or needed == 16 + int.from_bytes(
                candidate[14:16], "big") - len(candidate)
    except BadProxyHeader:
        pass
