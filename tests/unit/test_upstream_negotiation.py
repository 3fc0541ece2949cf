"""Our negotiation toward the server as a playbook: the server's stream events and the
results of what the core asked for in, the commands out (``proxy/upstream_negotiation.py``),
no sockets and no clock."""

from __future__ import annotations

import base64
import itertools
from typing import Any

import pytest
from lxml import etree

from proxy import proxyproto
from proxy.commands import (Connect, Log, OpenStream, PassOn, ServerDiscovered, StartTimer,
                            StartTlsToServer, ToServerDirect, UpstreamBound, UpstreamCommand,
                            UpstreamFailed, UpstreamReady)
from proxy.config import UpstreamConfig
from proxy.upstream_negotiation import UPSTREAM_TIMER, UpstreamNegotiation
from proxy.xmpp import codec, ns
from proxy.xmpp import stanza as st
from proxy.xmpp.disco import ServerInfo
from proxy.xmpp.stanza import Element

DOMAIN = "localhost"
JID = "user@localhost/phone"
# RFC 5802 §5 (user "user", password "pencil")
NONCE = "fyko+d2lbbFgONRv9qkxdawL"
SCRAM_FIRST = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
SCRAM_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SCRAM_FINAL = b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
SCRAM_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="
CLIENT = (("192.0.2.7", 40000), ("192.0.2.1", 5222))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def negotiation(own_ids: frozenset[str] = frozenset(), **config: Any) -> UpstreamNegotiation:
    config.setdefault("domain", DOMAIN)
    counter = itertools.count(1)
    return UpstreamNegotiation(UpstreamConfig(**config), "user", "pencil",
                               own_stream_ids=own_ids, client=CLIENT,
                               new_id=lambda prefix: f"{prefix}-{next(counter)}",
                               nonce=lambda: NONCE)


def header(stream_id: str = "server-1") -> codec.StreamOpened:
    return codec.StreamOpened({"from": DOMAIN, "id": stream_id, "version": "1.0"},
                              ns.CLIENT)


def got(el: Element) -> codec.StanzaReceived:
    return codec.StanzaReceived(el)


def features(*children: Element) -> codec.StanzaReceived:
    el = etree.Element(ns.qname(ns.STREAM, "features"), nsmap={"stream": ns.STREAM})
    el.extend(children)
    return got(el)


def starttls() -> Element:
    return st.element("starttls", namespace=ns.TLS)


def mechanisms(*names: str) -> Element:
    el = st.element("mechanisms", namespace=ns.SASL)
    for name in names:
        st.sub(el, "mechanism", text=name)
    return el


def bind_feature() -> Element:
    return st.element("bind", namespace=ns.BIND)


def session_feature(optional: bool) -> Element:
    el = st.element("session", namespace=ns.SESSION)
    if optional:
        st.sub(el, "optional")
    return el


def sasl(local: str, data: bytes | None = None, condition: str | None = None) -> Element:
    el = st.element(local, namespace=ns.SASL, text=b64(data) if data else None)
    if condition:
        st.sub(el, condition)
    return el


def stream_error(condition: str) -> Element:
    el = etree.Element(ns.qname(ns.STREAM, "error"), nsmap={"stream": ns.STREAM})
    el.append(st.element(condition, namespace=ns.STREAMS_ERRORS))
    return el


def sent(commands: list[UpstreamCommand]) -> list[Element]:
    return [c.element for c in commands if isinstance(c, ToServerDirect)]


def failure(commands: list[UpstreamCommand]) -> UpstreamFailed:
    last = commands[-1]
    assert isinstance(last, UpstreamFailed), commands
    return last


def wait(seconds: float = 10.0) -> StartTimer:
    return StartTimer(UPSTREAM_TIMER, seconds)


def at_features(core: UpstreamNegotiation) -> None:
    core.start()
    core.connected()
    core.receive(header())


def authenticated(core: UpstreamNegotiation, *extra: Element) -> None:
    """Plain (``tls: none``), PLAIN, success, restart, features: ready."""
    at_features(core)
    core.receive(features(mechanisms("PLAIN")))
    core.receive(got(sasl("success")))
    core.receive(header("server-2"))
    (ready,) = core.receive(features(bind_feature(), *extra))
    assert isinstance(ready, UpstreamReady)


def bound(core: UpstreamNegotiation) -> None:
    authenticated(core)
    core.bind("phone")
    (done,) = core.receive(got(bind_result("bind-1")))
    assert done == UpstreamBound(JID)


def bind_result(iq_id: str, jid: str | None = JID) -> Element:
    iq = st.element("iq", {"type": "result", "id": iq_id})
    if jid is not None:
        st.sub(st.sub(iq, "bind", namespace=ns.BIND), "jid", text=jid)
    return iq


def error_iq(iq_id: str, condition: str, kind: str = "cancel") -> Element:
    iq = st.element("iq", {"type": "error", "id": iq_id})
    error = st.sub(iq, "error", {"type": kind})
    st.sub(error, condition, namespace=ns.STANZA_ERRORS)
    return iq


def disco_result(iq_id: str, sender: str, *variables: str) -> Element:
    iq = st.element("iq", {"type": "result", "id": iq_id, "from": sender})
    query = st.sub(iq, "query", namespace=ns.DISCO_INFO)
    st.sub(query, "identity", {"category": "server", "type": "im"})
    for var in variables:
        st.sub(query, "feature", {"var": var})
    return iq


# ------------------------------------------------------------------ the connection's plan


def test_the_connection_plan_follows_the_configuration() -> None:
    starttls_plan = negotiation(host="10.0.0.5", port=5299, connect_timeout=4).start()
    assert starttls_plan == [Connect("10.0.0.5", 5299, 4, direct_tls=False,
                                     server_hostname=DOMAIN, track_trailing=True)]
    (direct,) = negotiation(tls="direct").start()
    assert isinstance(direct, Connect) and direct.direct_tls and not direct.track_trailing
    (plain,) = negotiation(tls="none").start()
    assert isinstance(plain, Connect) and not plain.direct_tls and not plain.track_trailing
    assert plain.proxy_header is None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_proxy_protocol_header_names_the_client(version: str) -> None:
    (plan,) = negotiation(proxy_protocol=version, tls="direct").start()
    encode = proxyproto.encode_v1 if version == "v1" else proxyproto.encode_v2
    assert isinstance(plan, Connect) and plan.proxy_header == encode(*CLIENT)
    assert plan.direct_tls  # TLS after the header


def test_a_failed_connect_is_unavailable() -> None:
    core = negotiation(host="10.0.0.5", port=5299)
    core.start()
    fail = failure(core.connect_failed("Connection refused"))
    assert fail.kind == "unavailable"
    assert fail.reason == "cannot connect to 10.0.0.5:5299: Connection refused"


# ------------------------------------------------------------- the whole way: STARTTLS, SCRAM


def test_starttls_scram_and_the_restart_as_rfc_6120_orders_them() -> None:
    core = negotiation(connect_timeout=7)
    core.start()
    assert core.connected() == [OpenStream(DOMAIN), wait(7)]
    assert core.receive(header()) == [wait(7)]
    out = core.receive(features(starttls(), mechanisms("PLAIN")))
    assert [el.tag for el in sent(out)] == [ns.qname(ns.TLS, "starttls")] and out[-1] == wait(7)
    assert core.receive(got(st.element("proceed", namespace=ns.TLS))) == [
        StartTlsToServer(DOMAIN, 7)]
    assert core.tls_started() == [OpenStream(DOMAIN), wait(7)]  # TLS restarted the stream
    assert core.receive(header("server-2")) == [wait(7)]
    out = core.receive(features(mechanisms("PLAIN", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1")))
    (auth,) = sent(out)
    assert auth.get("mechanism") == "SCRAM-SHA-1"  # the best offered, never -PLUS
    assert base64.b64decode(auth.text or "") == SCRAM_FIRST
    out = core.receive(got(sasl("challenge", SCRAM_SERVER_FIRST)))
    (response,) = sent(out)
    assert response.tag == ns.qname(ns.SASL, "response")
    assert base64.b64decode(response.text or "") == SCRAM_FINAL
    assert core.receive(got(sasl("success", SCRAM_SERVER_FINAL))) == [
        OpenStream(DOMAIN, restart=True), wait(7)]
    assert core.receive(header("server-3")) == [wait(7)]
    final = features(bind_feature())
    assert core.receive(final) == [UpstreamReady("SCRAM-SHA-1", final.element)]
    assert core.mechanism == "SCRAM-SHA-1"


def test_plain_sends_its_initial_response_and_tls_none_never_asks_for_starttls() -> None:
    core = negotiation(tls="none")
    at_features(core)
    (auth,) = sent(core.receive(features(starttls(), mechanisms("PLAIN"))))
    assert auth.tag == ns.qname(ns.SASL, "auth") and auth.get("mechanism") == "PLAIN"
    assert base64.b64decode(auth.text or "") == b"\0user\0pencil"


def test_direct_tls_goes_straight_to_sasl() -> None:
    core = negotiation(tls="direct")
    at_features(core)
    (auth,) = sent(core.receive(features(mechanisms("PLAIN"))))
    assert auth.tag == ns.qname(ns.SASL, "auth")


# ------------------------------------------------------------------ failures before SASL


def test_no_starttls_offered_when_required_fails_without_sending_anything() -> None:
    core = negotiation()
    at_features(core)
    out = core.receive(features(mechanisms("PLAIN")))
    assert sent(out) == []  # no credentials in the clear
    assert failure(out) == UpstreamFailed("unavailable", "the server does not offer STARTTLS")
    assert core.phase == "failed"


def test_starttls_refused_by_the_server() -> None:
    core = negotiation()
    at_features(core)
    core.receive(features(starttls()))
    fail = failure(core.receive(got(st.element("failure", namespace=ns.TLS))))
    assert fail.kind == "unavailable" and "refused STARTTLS" in fail.reason


def test_a_broken_tls_handshake_fails() -> None:
    core = negotiation()
    at_features(core)
    core.receive(features(starttls()))
    core.receive(got(st.element("proceed", namespace=ns.TLS)))
    fail = failure(core.tls_failed("CERTIFICATE_VERIFY_FAILED"))
    assert fail.kind == "unavailable" and "CERTIFICATE_VERIFY_FAILED" in fail.reason


def test_plaintext_after_proceed_is_logged_and_never_used() -> None:
    core = negotiation()
    at_features(core)
    core.receive(features(starttls()))
    core.receive(got(st.element("proceed", namespace=ns.TLS)))
    out = core.tls_injection(120, 1)
    assert out[0] == Log("starttls_injection", {"side": "upstream", "bytes": 120,
                                                "elements": 1}, level="warning")
    fail = failure(out)
    assert fail.kind == "unavailable" and fail.reason.startswith("starttls_injection")


def test_our_own_stream_id_means_the_upstream_is_this_proxy() -> None:
    core = negotiation(own_ids=frozenset({"ours-1"}))
    core.start()
    core.connected()
    fail = failure(core.receive(header("ours-1")))
    assert fail.kind == "loop" and "lead back to this proxy" in fail.reason


@pytest.mark.parametrize("event, words", [
    (got(stream_error("host-unknown")), "stream error from the server: host-unknown"),
    (got(st.element("message")), "expected stream features"),
    (codec.StreamClosed(), "closed the stream"),
    (codec.StreamViolation("not-well-formed", "bad"), "not-well-formed"),
])
def test_anything_but_features_after_the_header_fails(event: codec.StreamEvent,
                                                       words: str) -> None:
    core = negotiation()
    at_features(core)
    fail = failure(core.receive(event))
    assert fail.kind == "unavailable" and words in fail.reason


def test_anything_but_a_header_first_fails() -> None:
    core = negotiation()
    core.start()
    core.connected()
    fail = failure(core.receive(got(st.element("message"))))
    assert "did not open a stream" in fail.reason


# ------------------------------------------------------------------ SASL


def test_no_usable_mechanism_sends_no_credentials() -> None:
    core = negotiation(tls="none")
    at_features(core)
    out = core.receive(features(mechanisms("SCRAM-SHA-1-PLUS", "EXTERNAL")))
    assert sent(out) == []
    assert "no usable SASL mechanism" in failure(out).reason


@pytest.mark.parametrize("condition", ["not-authorized", "account-disabled",
                                       "credentials-expired"])
def test_refused_credentials_are_an_auth_failure_with_the_servers_condition(
        condition: str) -> None:
    core = negotiation(tls="none")
    at_features(core)
    core.receive(features(mechanisms("PLAIN")))
    fail = failure(core.receive(got(sasl("failure", condition=condition))))
    assert (fail.kind, fail.condition) == ("auth", condition)


def test_a_failure_without_a_condition_counts_as_not_authorized() -> None:
    core = negotiation(tls="none")
    at_features(core)
    core.receive(features(mechanisms("PLAIN")))
    fail = failure(core.receive(got(sasl("failure"))))
    assert (fail.kind, fail.condition) == ("auth", "not-authorized")


@pytest.mark.parametrize("condition", ["temporary-auth-failure", "aborted",
                                       "malformed-request", "mechanism-too-weak"])
def test_other_sasl_failures_are_the_servers_trouble_not_the_users(condition: str) -> None:
    core = negotiation(tls="none")
    at_features(core)
    core.receive(features(mechanisms("PLAIN")))
    fail = failure(core.receive(got(sasl("failure", condition=condition))))
    assert fail.kind == "unavailable" and condition in fail.reason


def scram_started() -> UpstreamNegotiation:
    core = negotiation(tls="none")
    at_features(core)
    core.receive(features(mechanisms("SCRAM-SHA-1")))
    return core


def test_a_challenge_that_breaks_scram_is_aborted() -> None:
    core = scram_started()
    out = core.receive(got(sasl("challenge", b"r=someone-elses-nonce,s=QSXCR+Q6sek8bf92,i=4096")))
    assert [el.tag for el in sent(out)] == [ns.qname(ns.SASL, "abort")]
    assert "SASL exchange broken" in failure(out).reason


def test_a_wrong_server_signature_in_success_fails_mutual_auth() -> None:
    core = scram_started()
    core.receive(got(sasl("challenge", SCRAM_SERVER_FIRST)))
    out = core.receive(got(sasl("success", b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAA=")))
    assert not any(isinstance(c, OpenStream) for c in out)
    fail = failure(out)
    assert fail.kind == "unavailable" and "mutual auth" in fail.reason


def test_an_unexpected_element_during_sasl_fails() -> None:
    core = scram_started()
    fail = failure(core.receive(got(st.element("message"))))
    assert "unexpected <message/> during SASL" in fail.reason


# ------------------------------------------------------------------ waits and losses


def _phase_header(core: UpstreamNegotiation) -> None:
    core.start()
    core.connected()


def _phase_features(core: UpstreamNegotiation) -> None:
    at_features(core)


def _phase_proceed(core: UpstreamNegotiation) -> None:
    at_features(core)
    core.receive(features(starttls()))


def _phase_sasl(core: UpstreamNegotiation) -> None:
    at_features(core)
    core.receive(features(starttls()))
    core.receive(got(st.element("proceed", namespace=ns.TLS)))
    core.tls_started()
    core.receive(header())
    core.receive(features(mechanisms("PLAIN")))


def _phase_restart(core: UpstreamNegotiation) -> None:
    _phase_sasl(core)
    core.receive(got(sasl("success")))


@pytest.mark.parametrize("reach", [_phase_header, _phase_features, _phase_proceed, _phase_sasl,
                                   _phase_restart])
def test_every_wait_of_the_negotiation_is_bounded_and_so_is_every_loss(reach: Any) -> None:
    core = negotiation()
    reach(core)
    fail = failure(core.timed_out())
    assert fail.kind == "unavailable" and "did not answer in time" in fail.reason
    core = negotiation()
    reach(core)
    fail = failure(core.lost("eof"))
    assert fail.kind == "unavailable" and fail.reason.startswith("lost during")


# ------------------------------------------------------------------ bind and session


def test_bind_asks_for_the_resource_and_gives_the_jid_the_server_chose() -> None:
    core = negotiation(tls="none", connect_timeout=6)
    authenticated(core)
    out = core.bind("phone")
    (iq,) = sent(out)
    assert iq.get("type") == "set" and iq.get("id") == "bind-1"
    assert iq.findtext(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}resource") == "phone"
    assert out[-1] == wait(6)
    assert core.receive(got(bind_result("bind-1", "user@localhost/other"))) == [
        UpstreamBound("user@localhost/other")]
    assert core.jid == "user@localhost/other"


def test_bind_without_a_resource_lets_the_server_pick_within_the_given_time() -> None:
    core = negotiation(tls="none")
    authenticated(core)
    out = core.bind(None, timeout=2.5)
    (iq,) = sent(out)
    assert iq.find(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}resource") is None
    assert out[-1] == wait(2.5)


def test_a_required_session_is_opened_after_the_bind() -> None:
    core = negotiation(tls="none")
    authenticated(core, session_feature(optional=False))
    core.bind("phone")
    out = core.receive(got(bind_result("bind-1")))
    (iq,) = sent(out)
    assert iq.find(ns.qname(ns.SESSION, "session")) is not None and iq.get("id") == "sess-2"
    assert core.receive(got(st.element("iq", {"type": "result", "id": "sess-2"}))) == [
        UpstreamBound(JID)]


def test_an_optional_session_is_not_opened() -> None:
    core = negotiation(tls="none")
    authenticated(core, session_feature(optional=True))
    core.bind("phone")
    assert core.receive(got(bind_result("bind-1"))) == [UpstreamBound(JID)]


@pytest.mark.parametrize("condition", ["conflict", "not-allowed", "resource-constraint"])
def test_a_refused_bind_gives_the_servers_error(condition: str) -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    reply = error_iq("bind-1", condition)
    fail = failure(core.receive(got(reply)))
    assert (fail.kind, fail.condition) == ("bind", condition) and fail.error_reply is reply


def test_after_a_refused_bind_another_may_be_asked_on_the_same_stream() -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    assert failure(core.receive(got(error_iq("bind-1", "conflict")))).kind == "bind"
    (iq,) = sent(core.bind("laptop"))
    assert iq.get("id") == "bind-2"
    assert core.receive(got(bind_result("bind-2", "user@localhost/laptop"))) == [
        UpstreamBound("user@localhost/laptop")]


def test_a_refused_session_is_a_refused_bind() -> None:
    core = negotiation(tls="none")
    authenticated(core, session_feature(optional=False))
    core.bind("phone")
    core.receive(got(bind_result("bind-1")))
    fail = failure(core.receive(got(error_iq("sess-2", "internal-server-error", "wait"))))
    assert (fail.kind, fail.condition) == ("bind", "internal-server-error")


def test_a_bind_result_without_a_jid_is_unavailable() -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    fail = failure(core.receive(got(bind_result("bind-1", jid=None))))
    assert fail.kind == "unavailable" and "no JID" in fail.reason


def test_what_is_not_the_bind_answer_is_passed_over_and_the_wait_goes_on() -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    out = core.receive(got(st.element("iq", {"type": "result", "id": "someone-else"})))
    assert [type(c) for c in out] == [Log] and core.phase == "bind"
    assert core.receive(got(bind_result("bind-1"))) == [UpstreamBound(JID)]


@pytest.mark.parametrize("event", [codec.StreamClosed(),
                                   codec.StreamViolation("policy-violation", "")])
def test_the_stream_ending_during_the_bind_is_unavailable(event: codec.StreamEvent) -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    assert failure(core.receive(event)).kind == "unavailable"


def test_the_bind_and_the_session_are_bounded() -> None:
    core = negotiation(tls="none")
    authenticated(core)
    core.bind("phone")
    assert "during bind" in failure(core.timed_out()).reason
    core = negotiation(tls="none")
    authenticated(core, session_feature(optional=False))
    core.bind("phone")
    core.receive(got(bind_result("bind-1")))
    assert "during session" in failure(core.timed_out()).reason


# ------------------------------------------------------------------ discovery after the bind


def test_discovery_asks_the_domain_and_the_account_together() -> None:
    core = negotiation(tls="none", discovery_timeout=1.5)
    bound(core)
    out = core.discover()
    queries = sent(out)
    assert [(q.get("to"), q.get("id")) for q in queries] == [
        (DOMAIN, "disco-2"), ("user@localhost", "disco-3")]
    assert all(q.find(ns.qname(ns.DISCO_INFO, "query")) is not None for q in queries)
    assert out[-1] == StartTimer(UPSTREAM_TIMER, 1.5)
    assert core.receive(got(disco_result("disco-3", "user@localhost", "urn:xmpp:push:0"))) == []
    (done,) = core.receive(got(disco_result("disco-2", DOMAIN, "urn:xmpp:blocking")))
    assert isinstance(done, ServerDiscovered)
    assert done.info.domain_has("urn:xmpp:blocking") and done.info.account_has("urn:xmpp:push:0")


def test_an_error_answer_is_an_unknown_entity_not_a_failure() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    core.receive(got(disco_result("disco-2", DOMAIN, "urn:xmpp:carbons:2")))
    (done,) = core.receive(got(error_iq("disco-3", "service-unavailable")))
    assert isinstance(done, ServerDiscovered)
    assert done.info.domain is not None and done.info.account is None


def test_what_arrives_during_discovery_is_passed_on_in_order() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    first = got(st.element("message", {"from": "romeo@localhost", "id": "m1"}))
    second = got(st.element("presence", {"from": "romeo@localhost"}))
    assert core.receive(first) == [PassOn(first)]
    assert core.receive(got(disco_result("disco-2", DOMAIN))) == []
    assert core.receive(second) == [PassOn(second)]
    (done,) = core.receive(got(disco_result("disco-3", "user@localhost")))
    assert isinstance(done, ServerDiscovered)


def test_a_discovery_timeout_keeps_what_answered() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    core.receive(got(disco_result("disco-2", DOMAIN, "urn:xmpp:blocking")))
    out = core.timed_out()
    assert isinstance(out[0], Log) and out[0].fields["missing"] == ["user@localhost"]
    (done,) = out[1:]
    assert isinstance(done, ServerDiscovered)
    assert done.info.domain_has("urn:xmpp:blocking") and done.info.account is None
    assert core.phase == "ready"


def test_nothing_answered_in_time_is_an_empty_server_info() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    assert core.timed_out()[-1] == ServerDiscovered(ServerInfo())


def test_the_stream_ending_stops_the_discovery_and_goes_to_the_session() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    closed = codec.StreamClosed()
    assert core.receive(closed) == [PassOn(closed), ServerDiscovered(ServerInfo())]


def test_a_connection_lost_during_discovery_is_unavailable() -> None:
    core = negotiation(tls="none")
    bound(core)
    core.discover()
    fail = failure(core.lost("eof"))
    assert fail.kind == "unavailable" and "during discovery" in fail.reason
