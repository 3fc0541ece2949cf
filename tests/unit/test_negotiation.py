"""Client negotiation as a playbook: the stream's events and the login's outcome in, the
commands out (``proxy/negotiation.py``), no sockets and no clock but ours."""

from __future__ import annotations

import base64

from lxml import etree

from proxy.abuse import LoginThrottle
from proxy.commands import (Authenticated, CheckLogin, FailNegotiation, Log,
                            NegotiationCommand, Pause, Received, SendHeader, StartTimer,
                            StartTls, ToClient)
from proxy.config import AbuseConfig
from proxy.negotiation import MAX_AUTH_ATTEMPTS, LoginOutcome, NegotiationCore
from proxy.xmpp import codec, ns
from proxy.xmpp import stanza as st

DOMAIN = "localhost"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def header(to: str = DOMAIN) -> codec.StreamOpened:
    return codec.StreamOpened({"to": to, "from": "juliet@localhost", "version": "1.0"},
                              "jabber:client")


def got(el: st.Element) -> codec.StanzaReceived:
    return codec.StanzaReceived(el)


def tls(local: str) -> codec.StanzaReceived:
    return got(st.element(local, namespace=ns.TLS))


def auth(user: str = "juliet", password: str = "secret", mechanism: str = "PLAIN",
         authzid: str = "") -> codec.StanzaReceived:
    text = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
    return got(st.element("auth", {"mechanism": mechanism}, namespace=ns.SASL, text=text))


def kinds(commands: list[NegotiationCommand]) -> list[str]:
    return [type(c).__name__ for c in commands]


def sent(commands: list[NegotiationCommand]) -> list[str]:
    """The local names of what goes to the client."""
    return [etree.QName(c.element).localname for c in commands if isinstance(c, ToClient)]


def failure_condition(commands: list[NegotiationCommand]) -> str:
    (failure,) = [c.element for c in commands if isinstance(c, ToClient)
                  and c.element.tag == ns.qname(ns.SASL, "failure")]
    return etree.QName(failure[0]).localname


def stream_error(commands: list[NegotiationCommand]) -> bytes:
    fail = commands[-1]
    assert isinstance(fail, FailNegotiation) and fail.error is not None, commands
    return fail.error


def at_sasl(**kw: object) -> NegotiationCore:
    core = NegotiationCore(DOMAIN, direct_tls=True, timeout=30, **kw)  # type: ignore[arg-type]
    core.receive(header())
    return core


def test_the_deadline_is_the_configured_timeout_and_ends_with_connection_timeout() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=False, timeout=12.5)
    assert core.start() == [StartTimer("negotiation", 12.5)]
    assert b"connection-timeout" in stream_error(core.timed_out())


def test_starttls_is_required_first_then_sasl_plain_only() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=False, timeout=30)
    (opened,) = core.receive(header())
    assert isinstance(opened, SendHeader) and opened.to == "juliet@localhost"
    assert opened.features is not None
    (starttls,) = opened.features
    assert starttls.tag == ns.qname(ns.TLS, "starttls") and len(starttls) == 1  # <required/>
    out = core.receive(tls("starttls"))
    assert sent(out) == ["proceed"] and isinstance(out[-1], StartTls)
    assert [c.event for c in core.tls_started({"version": "TLSv1.3"})
            if isinstance(c, Log)] == ["tls_established"]
    (opened,) = core.receive(header())
    assert isinstance(opened, SendHeader) and opened.features is not None
    (mechanisms,) = opened.features
    assert [m.text for m in mechanisms] == ["PLAIN"]


def test_sasl_before_starttls_is_a_policy_violation() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=False, timeout=30)
    core.receive(header())
    assert b"policy-violation" in stream_error(core.receive(auth()))


def test_direct_tls_offers_sasl_at_once() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=True, timeout=30)
    (opened,) = core.receive(header())
    assert isinstance(opened, SendHeader) and opened.features is not None
    assert opened.features[0].tag == ns.qname(ns.SASL, "mechanisms")


def test_plaintext_after_starttls_is_not_authorized() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=False, timeout=30)
    core.receive(header())
    core.receive(tls("starttls"))
    out = core.tls_injection(buffered=40, events=1)
    assert isinstance(out[0], Log) and out[0].event == "starttls_injection"
    assert b"not-authorized" in stream_error(out)


def test_a_wrong_host_gets_our_header_then_host_unknown() -> None:
    core = NegotiationCore(DOMAIN, direct_tls=True, timeout=30)
    out = core.receive(header("example.org"))
    assert isinstance(out[0], SendHeader) and out[0].features is None
    assert b"host-unknown" in stream_error(out)


def test_good_credentials_are_checked_upstream_then_succeed() -> None:
    core = at_sasl()
    (check,) = core.receive(auth(authzid="juliet@localhost"))
    assert isinstance(check, CheckLogin)
    assert (str(check.account), check.authcid, check.password) == (
        "juliet@localhost", "juliet", "secret")
    out = core.login_result(LoginOutcome("ok", mechanism="SCRAM-SHA-1"))
    assert sent(out) == ["success"] and isinstance(out[-1], Authenticated)
    assert str(out[-1].account) == "juliet@localhost" and out[-1].password == "secret"
    core.open_bound_stream([st.element("bind", namespace=ns.BIND)])
    (opened,) = core.receive(header())
    assert isinstance(opened, SendHeader) and opened.features is not None
    assert opened.features[0].tag == ns.qname(ns.BIND, "bind")
    bind = st.element("iq", {"type": "set", "id": "b1"})
    assert core.receive(got(bind)) == [Received(bind)]


def test_three_failures_close_the_stream() -> None:
    core = at_sasl()
    for attempt in range(1, MAX_AUTH_ATTEMPTS + 1):
        core.receive(auth(password="wrong"))
        out = core.login_result(LoginOutcome("refused", condition="not-authorized"))
        assert failure_condition(out) == "not-authorized"
        if attempt < MAX_AUTH_ATTEMPTS:
            assert not isinstance(out[-1], FailNegotiation)
    assert b"policy-violation" in stream_error(out)


def test_local_refusals_count_as_failures_and_ask_no_server() -> None:
    core = at_sasl()
    out = core.receive(auth(mechanism="DIGEST-MD5"))
    assert failure_condition(out) == "invalid-mechanism"
    out = core.receive(got(st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL,
                                      text="not base64!")))
    assert failure_condition(out) == "incorrect-encoding"
    out = core.receive(auth(authzid="romeo@localhost"))
    assert failure_condition(out) == "invalid-authzid"
    assert b"policy-violation" in stream_error(out)


def test_abort_is_answered_and_costs_nothing() -> None:
    core = at_sasl()
    for _ in range(MAX_AUTH_ATTEMPTS + 1):
        out = core.receive(got(st.element("abort", namespace=ns.SASL)))
        assert failure_condition(out) == "aborted" and len(out) == 1
    assert isinstance(core.receive(auth())[0], CheckLogin)


def test_plain_without_initial_response_gets_an_empty_challenge() -> None:
    core = at_sasl()
    out = core.receive(got(st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL)))
    assert sent(out) == ["challenge"] and out[0].element.text == "="  # type: ignore[union-attr]
    text = base64.b64encode(b"\0juliet\0secret").decode()
    (check,) = core.receive(got(st.element("response", namespace=ns.SASL, text=text)))
    assert isinstance(check, CheckLogin) and check.password == "secret"


def test_stream_management_before_auth_is_refused_recoverably() -> None:
    core = at_sasl()
    out = core.receive(got(st.element("enable", namespace=ns.SM)))
    assert sent(out) == ["failed"] and len(out) == 1
    assert b"not-authorized" in stream_error(core.receive(got(st.element("iq", {"type": "get"}))))


def test_an_unreachable_server_fails_unless_a_live_session_vouches() -> None:
    core = at_sasl()
    core.receive(auth())
    out = core.login_result(LoginOutcome("unavailable", detail="refused"))
    assert failure_condition(out) == "temporary-auth-failure"
    core.receive(auth())
    out = core.login_result(LoginOutcome("unavailable", detail="refused", vouched=True))
    assert isinstance(out[-1], Authenticated)


def test_a_loop_is_a_temporary_failure() -> None:
    core = at_sasl()
    core.receive(auth())
    out = core.login_result(LoginOutcome("loop", detail="our own stream id"))
    assert [c.event for c in out if isinstance(c, Log)] == ["loop_refused"]
    assert failure_condition(out) == "temporary-auth-failure"


def test_the_throttle_delays_then_refuses_without_a_login() -> None:
    clock = Clock()
    config = AbuseConfig(login_failures_free=1, login_delay=2, login_failures_per_account=3,
                         login_lockout=60)
    throttle = LoginThrottle(config, clock)
    for delays in ([], [2.0], [4.0]):
        core = at_sasl(throttle=throttle, client_address="192.0.2.1")
        core.receive(auth(password="wrong"))
        out = core.login_result(LoginOutcome("refused", condition="not-authorized"))
        assert [c.seconds for c in out if isinstance(c, Pause)] == delays
        if delays:  # the answer itself waits
            assert kinds(out).index("Pause") < kinds(out).index("ToClient")
    core = at_sasl(throttle=throttle, client_address="192.0.2.1")
    out = core.receive(auth())  # locked out: no CheckLogin
    assert not any(isinstance(c, CheckLogin) for c in out)
    assert [c.event for c in out if isinstance(c, Log)] == ["login_refused"]
    clock.now += 61
    core = at_sasl(throttle=throttle, client_address="192.0.2.1")
    assert isinstance(core.receive(auth())[0], CheckLogin)


def test_the_stream_ending_or_breaking_ends_the_negotiation() -> None:
    core = at_sasl()
    (fail,) = core.receive(codec.StreamClosed())
    assert isinstance(fail, FailNegotiation) and fail.error is None
    core = at_sasl()
    assert b"not-well-formed" in stream_error(core.receive(header()))
    core = at_sasl()
    assert b"policy-violation" in stream_error(
        core.receive(codec.StreamViolation("policy-violation", "too deep")))
