"""Jabber IDs (RFC 7622): parsing, printing, comparing."""

from __future__ import annotations

import pytest

from proxy.xmpp.jid import MAX_PART_BYTES, InvalidJid, Jid


@pytest.mark.parametrize("text, local, domain, resource", [
    ("juliet@example.com", "juliet", "example.com", ""),
    ("juliet@example.com/balcony", "juliet", "example.com", "balcony"),
    ("example.com", "", "example.com", ""),
    ("example.com/service", "", "example.com", "service"),
    ("juliet@example.com/foo/bar", "juliet", "example.com", "foo/bar"),
    ("juliet@example.com/a@b", "juliet", "example.com", "a@b"),
    ("example.com/a@b/c", "", "example.com", "a@b/c"),
    ("juliet@example.com/ spaced res ", "juliet", "example.com", " spaced res "),
    ("jürgen@exämple.de/Wohnzimmer", "jürgen", "exämple.de", "Wohnzimmer"),
    ("juliet@[::1]/r", "juliet", "[::1]", "r"),
    ("juliet@192.0.2.1", "juliet", "192.0.2.1", ""),
])
def test_parse_and_str_round_trip(text: str, local: str, domain: str, resource: str) -> None:
    jid = Jid.parse(text)
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)
    assert str(jid) == text
    assert Jid.parse(str(jid)) == jid


def test_local_and_domain_are_lowercased_but_not_resource() -> None:
    jid = Jid.parse("Juliet@Example.COM/Balcony")
    assert jid == Jid("juliet", "example.com", "Balcony")
    assert str(jid) == "juliet@example.com/Balcony"
    assert Jid.parse("ÄNNE@EXAMPLE.com") == Jid("änne", "example.com", "")
    assert Jid.parse("a@b/R") != Jid.parse("a@b/r")


def test_trailing_dot_of_domain_is_stripped() -> None:
    assert Jid.parse("juliet@example.com./r") == Jid("juliet", "example.com", "r")
    assert str(Jid.parse("example.com.")) == "example.com"


def test_bare() -> None:
    full = Jid.parse("juliet@example.com/balcony")
    assert full.bare == Jid("juliet", "example.com", "")
    assert str(full.bare) == "juliet@example.com"
    assert full.bare.is_bare and not full.is_bare
    assert full.bare.bare == full.bare
    assert str(Jid.parse("example.com/r").bare) == "example.com"


def test_with_resource() -> None:
    bare = Jid.parse("juliet@example.com")
    full = bare.with_resource("Chamber/1")
    assert full == Jid("juliet", "example.com", "Chamber/1")
    assert str(full) == "juliet@example.com/Chamber/1"
    assert bare.resource == ""  # immutable: the original is untouched
    assert full.with_resource("other").resource == "other"
    assert full.with_resource("") == bare


def test_equality_and_hash() -> None:
    a = Jid.parse("Juliet@Example.com/r")
    b = Jid.parse("juliet@example.COM/r")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Jid.parse("juliet@example.com/R")}) == 2
    assert {a: 1}[b] == 1
    assert a != a.bare
    assert Jid.parse("example.com") != Jid.parse("example.com/r")


def test_jid_is_immutable() -> None:
    jid = Jid.parse("a@b/c")
    with pytest.raises(AttributeError):
        jid.local = "x"  # type: ignore[misc]


@pytest.mark.parametrize("text", [
    "@example.com",          # empty localpart before @
    "@example.com/r",
    "juliet@example.com/",   # empty resource after /
    "example.com/",
    "juliet@",               # empty domain
    "juliet@/r",
    "",
    "/r",
    ".",
    "juliet@.",
])
def test_empty_parts_are_invalid(text: str) -> None:
    with pytest.raises(InvalidJid):
        Jid.parse(text)


@pytest.mark.parametrize("local", ['ju"liet', "ju&liet", "ju'liet", "ju:liet", "ju<liet",
                                   "ju>liet", "ju liet", "ju@liet"])
def test_forbidden_characters_in_localpart(local: str) -> None:
    with pytest.raises(InvalidJid):
        Jid.parse(f"{local}@example.com/r")


def test_invalid_jid_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Jid.parse("@example.com")


def test_part_length_limit_is_counted_in_utf8_bytes() -> None:
    assert MAX_PART_BYTES == 1023
    # At the limit: accepted.
    assert Jid.parse("a" * 1023 + "@example.com").local == "a" * 1023
    assert Jid.parse("x@" + "d" * 1023).domain == "d" * 1023
    assert Jid.parse("x@example.com/" + "r" * 1023).resource == "r" * 1023
    # "é" is two bytes in UTF-8: 511 of them are 1022 bytes, 512 are 1024.
    assert Jid.parse("é" * 511 + "@example.com").local == "é" * 511
    for text in ("a" * 1024 + "@example.com",
                 "é" * 512 + "@example.com",
                 "x@" + "d" * 1024,
                 "x@example.com/" + "r" * 1024,
                 "x@example.com/" + "€" * 342):  # 1026 bytes
        with pytest.raises(InvalidJid):
            Jid.parse(text)
