"""Several served domains (issue 15): the ``domains:`` schema (inheritance from
``upstream:``, errors named by key), the choice of a domain by the stream header's ``to``
(case and IDNA), and the preflight of each domain's pair and upstream."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from proxy.commands import CheckLogin, FailNegotiation, Log, SendHeader
from proxy.config import (ConfigError, DomainConfig, UpstreamConfig, check_files, domain_key,
                          parse_config)
from proxy.negotiation import NegotiationCore
from proxy.net.certificates import ServerCertificates, upstream_contexts
from proxy.reload import plan_reload
from proxy.preflight import errors, handshake_in_memory, preflight
from proxy.xmpp import codec, ns
from tests.peers.certs import make_cert


def config(text: str) -> Any:
    return parse_config(yaml.safe_load(text))


TWO = """
upstream: {host: 10.0.0.1, port: 5223, domain: a.example, ca: a-ca.pem, connect_timeout: 4}
domains:
  - domain: b.example
  - domain: Bücher.example
    upstream: {host: 10.0.0.2, ca: null, tls: direct}
    tls: {cert: c.pem, key: c.key}
"""


def test_one_upstream_alone_serves_its_domain_as_before() -> None:
    plain = parse_config(None)
    assert plain.domains == []
    assert list(plain.served) == ["localhost"]
    default = plain.default_domain
    assert (default.name, default.index, default.config) == ("localhost", None, plain)
    assert default.tls == plain.tls
    assert parse_config({"domains": None}).domains == []
    assert parse_config({"domains": []}) == plain


def test_a_domain_inherits_what_it_does_not_give_and_overrides_the_rest() -> None:
    c = config(TWO)
    assert list(c.served) == ["a.example", "b.example", "xn--bcher-kva.example"]
    b = c.served["b.example"]
    assert b.config.upstream == dataclasses.replace(c.upstream, domain="b.example")
    assert (b.tls, b.own_tls, b.tls_prefix) == (c.tls, False, "tls")
    u = c.served["xn--bcher-kva.example"]
    assert (u.config.upstream.host, u.config.upstream.port, u.config.upstream.tls) == (
        "10.0.0.2", 5223, "direct")
    assert u.config.upstream.ca is None  # an explicit null is this domain's own
    assert u.config.upstream.connect_timeout == 4
    assert (u.tls.cert, u.own_tls, u.tls_prefix) == ("c.pem", True, "domains[1].tls")
    assert u.key_prefix == "domains[1].upstream"
    # The session's view differs only in its upstream.
    assert dataclasses.replace(u.config, upstream=c.upstream) == c


def test_the_schema_of_an_entry_has_every_upstream_key_but_the_domain() -> None:
    fields = {f.name for f in dataclasses.fields(UpstreamConfig)}
    c = config(TWO)
    assert isinstance(c.domains[0], DomainConfig)
    assert {f.name for f in dataclasses.fields(c.domains[0].upstream)} == fields


@pytest.mark.parametrize("name,key", [
    ("a.example", "a.example"), ("A.Example.", "a.example"), (" b.EXAMPLE ", "b.example"),
    ("bücher.example", "xn--bcher-kva.example"), ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"), ("", None), (".", None),
])
def test_domain_names_compare_in_lower_case_ascii(name: str, key: str | None) -> None:
    assert domain_key(name) == key


def test_the_served_domain_is_found_by_any_spelling_of_its_name() -> None:
    c = config(TWO)
    assert c.domain("B.EXAMPLE.").name == "b.example"
    assert c.domain("xn--bcher-kva.example").name == "bücher.example"
    assert c.domain("bücher.example").index == 1
    assert c.domain("c.example") is None and c.domain("") is None


@pytest.mark.parametrize("text,message", [
    ("domains: {b.example: {}}", "domains: must be a list"),
    ("domains: [b.example]", "domains[0]: must be a mapping with domain: NAME"),
    ("domains: [{upstream: {port: 5222}}]", "domains[0].domain: required"),
    ("domains: [{domain: ''}]", "domains[0].domain: required"),
    ("domains: [{domain: localhost}]",
     "domains[0].domain: 'localhost' is already served (upstream.domain)"),
    ("domains: [{domain: b.example}, {domain: B.Example.}]",
     "domains[1].domain: 'B.Example.' is already served (domains[0].domain)"),
    ("domains: [{domain: 'a@b'}]", "domains[0].domain: not a valid domain name"),
    ("domains: [{domain: b.example, upstream: {domain: c.example}}]",
     "domains[0].upstream.domain: not an option here"),
    ("domains: [{domain: b.example, upstream: {port: 0}}]",
     "domains[0].upstream.port: must be a port number 1-65535"),
    ("domains: [{domain: b.example, upstream: {tls: maybe}}]",
     "domains[0].upstream.tls: must be one of"),
    ("domains: [{domain: b.example, upstream: {prot: 1}}]",
     "domains[0].upstream.prot: unknown option"),
    ("domains: [{domain: b.example, upstream: 5}]", "domains[0].upstream: must be a mapping"),
    ("domains: [{domain: b.example, tls: {cert: b.pem}}]",
     "domains[0].tls.key: required with domains[0].tls"),
    ("domains: [{domain: b.example, tls: {key: b.key}}]",
     "domains[0].tls.cert: required with domains[0].tls"),
    ("domains: [{domain: b.example, port: 5222}]", "domains[0].port: unknown option"),
    # A bad inherited value is named where it is written, not in the entry.
    ("domains: [{domain: b.example}]\nupstream: {port: 0}",
     "upstream.port: must be a port number"),
])
def test_domain_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(text)
    assert str(info.value).startswith(message), str(info.value)


def test_missing_files_of_a_domain_are_named(tmp_path: Path) -> None:
    c = parse_config(yaml.safe_load(TWO), base_dir=tmp_path)
    problems = check_files(c)
    assert f"domains[1].tls.cert: no such file: {tmp_path / 'c.pem'}" in problems
    assert f"domains[0].upstream.ca: no such file: {tmp_path / 'a-ca.pem'}" in problems
    assert not any(p.startswith("domains[1].upstream.ca") for p in problems)  # null: none


# -------------------------------------------------------------------- the choice by 'to'


SERVED = {"a.example": "a.example", "xn--bcher-kva.example": "bücher.example"}


def header(to: str) -> codec.StreamOpened:
    return codec.StreamOpened({"to": to, "version": "1.0"}, "jabber:client")


def core() -> NegotiationCore:
    return NegotiationCore("a.example", direct_tls=True, timeout=30, served=SERVED)


def error_condition(commands: list[Any]) -> str:
    fail = commands[-1]
    assert isinstance(fail, FailNegotiation) and fail.error is not None
    el = etree.fromstring(b"<stream:x xmlns:stream='http://etherx.jabber.org/streams'>"
                          + fail.error + b"</stream:x>")
    return etree.QName(el[0][0]).localname


def login(c: NegotiationCore) -> CheckLogin:
    import base64
    token = base64.b64encode(b"\0juliet\0pw").decode()
    el = etree.Element(ns.qname(ns.SASL, "auth"), mechanism="PLAIN")
    el.text = token
    (check,) = c.receive(codec.StanzaReceived(el))
    assert isinstance(check, CheckLogin)
    return check


@pytest.mark.parametrize("to,domain", [("a.example", "a.example"), ("A.EXAMPLE", "a.example"),
                                       ("Bücher.example", "bücher.example"),
                                       ("xn--bcher-kva.example.", "bücher.example")])
def test_the_headers_to_chooses_the_domain_of_the_account(to: str, domain: str) -> None:
    c = core()
    (opened,) = c.receive(header(to))
    assert isinstance(opened, SendHeader) and opened.features is not None
    assert c.domain == domain
    assert str(login(c).account) == f"juliet@{domain}"


def test_an_unknown_to_is_host_unknown_with_an_event() -> None:
    c = core()
    out = c.receive(header("c.example"))
    assert isinstance(out[0], SendHeader) and out[0].features is None
    (log,) = [x for x in out if isinstance(x, Log)]
    assert log.event == "host_unknown" and log.fields["to"] == "c.example"
    assert error_condition(out) == "host-unknown"
    assert c.domain == "a.example"  # our header's from: the default domain


def test_a_restarted_stream_must_name_the_domain_it_chose() -> None:
    c = NegotiationCore("a.example", direct_tls=False, timeout=30, served=SERVED)
    c.receive(header("bücher.example"))
    c.receive(codec.StanzaReceived(etree.Element(ns.qname(ns.TLS, "starttls"))))
    c.tls_started({})
    out = c.receive(header("a.example"))
    assert error_condition(out) == "host-unknown"
    c = NegotiationCore("a.example", direct_tls=False, timeout=30, served=SERVED)
    c.receive(header("bücher.example"))
    c.receive(codec.StanzaReceived(etree.Element(ns.qname(ns.TLS, "starttls"))))
    c.tls_started({})
    (opened,) = c.receive(header("XN--BCHER-KVA.example"))  # the same one, spelt otherwise
    assert isinstance(opened, SendHeader) and opened.features is not None


# -------------------------------------------------------------------- preflight


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return {"localhost": make_cert(tmp_path_factory.mktemp("l"), "localhost"),
            "b.example": make_cert(tmp_path_factory.mktemp("b"), "b.example")}


def with_domains(tmp_path: Path, pairs: dict[str, tuple[Path, Path]],
                 *entries: dict[str, Any], **top: Any) -> Any:
    cert, key = pairs["localhost"]
    data: dict[str, Any] = {"listen": [{"host": "127.0.0.1", "port": 0}],
                            "tls": {"cert": str(cert), "key": str(key)},
                            "upstream": {"host": "127.0.0.1", "port": 15222},
                            "domains": list(entries), **top}
    return parse_config(data, base_dir=tmp_path)


def found(c: Any) -> list[tuple[str, bool, str]]:
    return [(f.key, f.warning, f.message) for f in preflight(
        c, probe=False, resolve_listen=lambda host, port: ["127.0.0.1"])]


def test_each_domains_own_pair_is_checked_and_named(tmp_path: Path, pairs) -> None:
    b_cert, b_key = pairs["b.example"]
    good = {"domain": "b.example", "tls": {"cert": str(b_cert), "key": str(b_key)}}
    assert found(with_domains(tmp_path, pairs, good)) == []
    mismatched = {"domain": "b.example", "tls": {"cert": str(b_cert),
                                                  "key": str(pairs["localhost"][1])}}
    (key, warning, message), = found(with_domains(tmp_path, pairs, mismatched))
    assert (key, warning) == ("domains[0].tls.key", False)
    assert "is not the key of the certificate in domains[0].tls.cert" in message
    swapped = {"domain": "b.example", "tls": {"cert": str(b_key), "key": str(b_cert)}}
    (key, _, message), = found(with_domains(tmp_path, pairs, swapped))
    assert key == "domains[0].tls.cert" and "are swapped" in message


def test_a_domain_on_the_default_certificate_it_is_not_named_in_is_a_warning(
        tmp_path: Path, pairs) -> None:
    (key, warning, message), = found(with_domains(tmp_path, pairs, {"domain": "b.example"}))
    assert (key, warning) == ("tls.cert", True)
    assert "does not name domains[0].domain 'b.example'" in message
    b_cert, b_key = pairs["b.example"]
    wrong = {"domain": "c.example", "tls": {"cert": str(b_cert), "key": str(b_key)}}
    (key, warning, message), = found(with_domains(tmp_path, pairs, wrong))
    assert (key, warning) == ("domains[0].tls.cert", True)
    assert "does not name domains[0].domain 'c.example'" in message


def test_each_domains_upstream_is_checked_under_its_own_key(tmp_path: Path, pairs) -> None:
    b_cert, b_key = pairs["b.example"]
    own = {"cert": str(b_cert), "key": str(b_key)}
    broken_ca = {"domain": "b.example", "tls": own, "upstream": {"ca": str(b_key)}}
    (key, warning, message), = found(with_domains(tmp_path, pairs, broken_ca))
    assert (key, warning) == ("domains[0].upstream.ca", False)
    assert "it holds a private key" in message
    # Its upstream on one of the proxy's own listeners: the loop check names its keys.
    loop = {"domain": "b.example", "tls": own, "upstream": {"port": 5999}}
    c = with_domains(tmp_path, pairs, loop, listen=[{"host": "127.0.0.1", "port": 5999}])
    problems = [f for f in found(c) if not f[1]]
    assert [p[0] for p in problems] == ["domains[0].upstream.host/domains[0].upstream.port"]
    slow = {"domain": "b.example", "tls": own, "upstream": {"connect_timeout": 40}}
    (key, warning, _), = found(with_domains(tmp_path, pairs, slow))
    assert (key, warning) == ("domains[0].upstream.connect_timeout", True)


def test_the_probe_tries_each_domains_server(tmp_path: Path, pairs) -> None:
    import socket
    with socket.create_server(("127.0.0.1", 0)) as listening:
        up = listening.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as closed:
            down = closed.getsockname()[1]
        b_cert, b_key = pairs["b.example"]
        own = {"cert": str(b_cert), "key": str(b_key)}
        c = with_domains(tmp_path, pairs, {"domain": "b.example", "tls": own,
                                           "upstream": {"port": down}},
                         upstream={"host": "127.0.0.1", "port": up})
        probed = preflight(c, bind_ports=False, resolve_listen=lambda h, p: ["127.0.0.1"])
    assert not errors(probed)
    (warning,) = probed
    assert warning.key == "domains[0].upstream.host/domains[0].upstream.port"
    assert f"127.0.0.1:{down}" in warning.message and "b.example" in warning.message


# -------------------------------------------------------------------- SNI


def handshake(server: ssl.SSLContext, server_name: str | None) -> bytes:
    """A TLS handshake in memory; the certificate the client got (DER)."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    c = handshake_in_memory(client, server, server_name)
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_sni_gives_a_domain_its_own_certificate_and_the_rest_the_default(
        tmp_path: Path, pairs) -> None:
    b_cert, b_key = pairs["b.example"]
    c = with_domains(tmp_path, pairs,
                     {"domain": "b.example", "tls": {"cert": str(b_cert), "key": str(b_key)}},
                     {"domain": "c.example"})
    certificates = ServerCertificates(c)
    default = der(pairs["localhost"][0])
    assert handshake(certificates.context, "b.example") == der(b_cert)
    assert handshake(certificates.context, "B.Example") == der(b_cert)
    assert handshake(certificates.context, "c.example") == default  # no pair of its own
    assert handshake(certificates.context, "localhost") == default
    assert handshake(certificates.context, "unknown.example") == default
    assert handshake(certificates.context, None) == default


def test_a_reload_swaps_in_every_domains_new_pair_or_none(tmp_path: Path, pairs) -> None:
    b_cert, b_key = pairs["b.example"]
    own = {"domain": "b.example", "tls": {"cert": str(b_cert), "key": str(b_key)}}
    old = with_domains(tmp_path, pairs, own)
    certificates = ServerCertificates(old)
    renewed = make_cert(tmp_path / "renewed", "b.example")
    new = with_domains(tmp_path, pairs, {"domain": "b.example", "tls": {
        "cert": str(renewed[0]), "key": str(renewed[1])}})
    certificates.take_on(new, old, certificates.prepare(new))
    assert handshake(certificates.context, "b.example") == der(renewed[0])
    broken = with_domains(tmp_path, pairs, {"domain": "b.example", "tls": {
        "cert": str(renewed[0]), "key": str(b_key)}})
    with pytest.raises(ssl.SSLError):
        certificates.prepare(broken)
    assert handshake(certificates.context, "b.example") == der(renewed[0])  # unchanged
    certificates.take_on(old, new, certificates.prepare(with_domains(tmp_path, pairs)))
    assert handshake(certificates.context, "b.example") == der(pairs["localhost"][0])


def test_upstream_contexts_are_kept_across_a_reload_unless_their_tls_changed(
        tmp_path: Path, pairs) -> None:
    old = with_domains(tmp_path, pairs, {"domain": "b.example"}, {"domain": "c.example"})
    first = upstream_contexts(old)
    assert set(first) == {"localhost", "b.example", "c.example"}
    assert len({id(x) for x in first.values()}) == 3  # each domain its own
    new = with_domains(tmp_path, pairs, {"domain": "b.example", "upstream": {"port": 5333}},
                       {"domain": "c.example", "upstream": {"verify": False}},
                       {"domain": "d.example", "upstream": {"tls": "none"}})
    second = upstream_contexts(new, old, first)
    assert second["localhost"] is first["localhost"]
    assert second["b.example"] is first["b.example"]  # only its port changed
    assert second["c.example"] is not first["c.example"]
    assert second["d.example"] is None
    assert plan_reload(old, new).applied == ["domains"]


def test_what_a_domain_inherits_is_named_once_where_it_is_written(tmp_path: Path,
                                                                   pairs) -> None:
    b_cert, b_key = pairs["b.example"]
    own = {"cert": str(b_cert), "key": str(b_key)}
    c = with_domains(tmp_path, pairs, {"domain": "b.example", "tls": own},
                     upstream={"host": "127.0.0.1", "port": 15222, "ca": str(b_key)})
    assert [(k, w) for k, w, _ in found(c)] == [("upstream.ca", False)]
    # A domain that changes what the CA check depends on (verify) is named for it too.
    c = with_domains(tmp_path, pairs, {"domain": "b.example", "tls": own,
                                       "upstream": {"ca": str(b_key), "verify": False}},
                     upstream={"host": "127.0.0.1", "port": 15222, "ca": str(b_key)})
    assert [(k, w) for k, w, _ in found(c)] == [("upstream.ca", False),
                                                ("domains[0].upstream.ca", False)]
