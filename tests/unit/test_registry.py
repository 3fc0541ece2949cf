"""The hub's decisions as a playbook (``proxy/registry.py``): an element from a client that
is authenticated but not bound, what the shell's look-ups found, commands out; our clock."""

from __future__ import annotations

from lxml import etree

from proxy.commands import (BindUpstream, Count, FailNegotiation, Log, LookUpBind, LookUpResume,
                            NewSession, RegistryCommand, ReplacePrevious, Resume, TakeOver,
                            ToClient)
from proxy.config import AbuseConfig
from proxy.features.stream_management import HandledCountTooHigh
from proxy.registry import Registry
from proxy.xmpp import ns
from proxy.xmpp import stanza as st
from proxy.xmpp.jid import Jid

ACCOUNT = Jid.parse("juliet@localhost")


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def registry(**abuse: int) -> tuple[Registry, Clock]:
    clock = Clock()
    return Registry(AbuseConfig(**abuse), max_resume_timeout=300, clock=clock,  # type: ignore[arg-type]
                    max_tombstones=3), clock


def bind_iq(resource: str | None = None) -> st.Element:
    iq = st.element("iq", {"type": "set", "id": "b1"})
    bind = st.sub(iq, "bind", namespace=ns.BIND)
    if resource is not None:
        st.sub(bind, "resource", text=resource)
    return iq


def resume_el(previd: str = "sm1", h: str = "3") -> st.Element:
    return st.element("resume", {"previd": previd, "h": h}, namespace=ns.SM)


def to_client(commands: list[RegistryCommand]) -> st.Element:
    (el,) = [c.element for c in commands if isinstance(c, ToClient)]
    return el


def condition(el: st.Element) -> str:
    return etree.QName(el[0]).localname


def logged(commands: list[RegistryCommand]) -> list[str]:
    return [c.event for c in commands if isinstance(c, Log)]


def bind(core: Registry, request: st.Element, *, live: Jid | None = None, sessions: int = 0,
         reachable: bool = True, finishing: bool = False) -> list[RegistryCommand]:
    return core.bind(request, ACCOUNT, live_resource=live, sessions_of_account=sessions,
                     server_reachable=reachable, finishing=finishing)


# ---------------------------------------------------------------- before bind


def test_enable_before_bind_is_refused_and_the_stream_goes_on() -> None:
    core, _ = registry()
    out = core.element(st.element("enable", namespace=ns.SM))
    assert condition(to_client(out)) == "unexpected-request" and len(out) == 1


def test_other_elements_before_bind() -> None:
    core, _ = registry()
    assert condition(to_client(core.element(st.element("iq", {"type": "get", "id": "q"}))
                               )[0]) == "not-authorized"
    assert condition(to_client(core.element(st.element("iq", {"type": "result", "id": "q"}))
                               )[0]) == "bad-request"
    (fail,) = core.element(st.element("message", {"to": "romeo@localhost"}))
    assert isinstance(fail, FailNegotiation) and fail.error is not None
    assert b"not-authorized" in fail.error


def test_bind_and_resume_ask_the_shell_to_look_up() -> None:
    core, _ = registry()
    assert core.element(bind_iq("balcony")) == [LookUpBind("balcony")]
    assert core.element(bind_iq()) == [LookUpBind("")]
    assert core.element(resume_el("sm9", "7")) == [LookUpResume("sm9", 7)]


def test_resume_without_previd_or_with_a_bad_h_is_a_bad_request() -> None:
    core, _ = registry()
    for el in (resume_el(previd=""), resume_el(h="x"), resume_el(h="-1")):
        out = core.element(el)
        assert Count("resumes", "failed") in out
        assert condition(to_client(out)) == "bad-request"


# ---------------------------------------------------------------- resume


def test_a_resumable_session_is_resumed() -> None:
    core, _ = registry()
    assert core.resume("juliet@localhost", "sm1", 3, resumable=True) == [Resume("sm1", 3)]


def test_an_unknown_id_is_item_not_found_without_h() -> None:
    core, _ = registry()
    out = core.resume("juliet@localhost", "sm1", 3, resumable=False)
    failed = to_client(out)
    assert condition(failed) == "item-not-found" and failed.get("h") is None
    assert logged(out) == ["resume_failed"] and Count("resumes", "failed") in out


def test_an_ended_session_tells_its_last_h_until_the_tombstone_expires() -> None:
    core, clock = registry()
    core.sm_ended(("juliet@localhost", "sm1"), 41)
    failed = to_client(core.resume("juliet@localhost", "sm1", 3, resumable=False))
    assert condition(failed) == "item-not-found" and failed.get("h") == "41"
    # only under the same account: another user's id is simply not found
    assert to_client(core.resume("romeo@localhost", "sm1", 3, resumable=False)).get("h") is None
    clock.now += 2 * 300 + 1
    assert to_client(core.resume("juliet@localhost", "sm1", 3, resumable=False)).get("h") is None


def test_tombstones_are_bounded_oldest_first() -> None:
    core, _ = registry()
    for n in range(4):
        core.sm_ended(("juliet@localhost", f"sm{n}"), n)
    assert to_client(core.resume("juliet@localhost", "sm0", 0, resumable=False)).get("h") is None
    assert to_client(core.resume("juliet@localhost", "sm1", 0, resumable=False)).get("h") == "1"


def test_h_too_high_ends_the_stream() -> None:
    core, _ = registry()
    out = core.resume("juliet@localhost", "sm1", 9, resumable=True,
                      problem=HandledCountTooHigh(9, 2))
    assert Count("resumes", "failed") in out
    fail = out[-1]
    assert isinstance(fail, FailNegotiation) and fail.error is not None
    assert b"undefined-condition" in fail.error and b"handled-count-too-high" in fail.error


# ---------------------------------------------------------------- bind


def test_a_new_resource_is_bound_upstream() -> None:
    core, _ = registry()
    assert bind(core, bind_iq("balcony")) == [BindUpstream("balcony")]
    assert bind(core, bind_iq()) == [BindUpstream(None)]


def test_a_live_session_of_the_resource_is_taken_over() -> None:
    core, _ = registry()
    live = ACCOUNT.with_resource("balcony")
    (take,) = bind(core, bind_iq("balcony"), live=live, sessions=10)  # no limit on a takeover
    assert isinstance(take, TakeOver) and take.jid == "juliet@localhost/balcony"
    assert take.result.get("type") == "result" and take.result.get("id") == "b1"
    assert take.result.findtext(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}jid") == str(live)


def test_the_session_limit_refuses_one_more_resource() -> None:
    core, _ = registry(max_sessions_per_account=2)
    assert isinstance(bind(core, bind_iq("a"), sessions=1)[0], BindUpstream)
    out = bind(core, bind_iq("c"), sessions=2)
    reply = to_client(out)
    error = reply.find(ns.qname(ns.CLIENT, "error"))
    assert reply.get("type") == "error" and error is not None and error.get("type") == "wait"
    assert error.find("{urn:xmpp:errors}resource-limit-exceeded") is not None
    assert logged(out) == ["session_refused"]


def test_no_new_resource_while_the_server_is_away() -> None:
    core, _ = registry()
    out = bind(core, bind_iq("balcony"), reachable=False)
    reply = to_client(out)
    error = reply.find(ns.qname(ns.CLIENT, "error"))
    assert error is not None and error.get("type") == "wait"
    assert etree.QName(error[0]).localname == "remote-server-timeout"
    assert logged(out) == ["bind_failed"]


def test_a_finishing_session_of_the_resource_hands_over_first() -> None:
    core, _ = registry()
    assert bind(core, bind_iq("balcony"), finishing=True) == [
        BindUpstream("balcony", hand_over_from="juliet@localhost/balcony")]


def test_what_the_server_bound_is_checked() -> None:
    core, _ = registry()
    out = core.bound(bind_iq(), ACCOUNT, "juliet@localhost/abc", previous=False,
                     domain_known=True, account_known=True)
    (new,) = out
    assert isinstance(new, NewSession) and str(new.jid) == "juliet@localhost/abc"
    for full in ("romeo@localhost/x", "not a jid@@"):
        fail = core.bound(bind_iq(), ACCOUNT, full, previous=False, domain_known=True,
                          account_known=True)[-1]
        assert isinstance(fail, FailNegotiation) and fail.error is not None
        assert b"internal-server-error" in fail.error


def test_a_session_already_under_the_bound_jid_is_replaced() -> None:
    core, _ = registry()
    out = core.bound(bind_iq("pc"), ACCOUNT, "juliet@localhost/pc", previous=True,
                     domain_known=False, account_known=True)
    assert logged(out) == ["discovery_incomplete"]
    assert ReplacePrevious("juliet@localhost/pc", "resource bound again") in out
    assert isinstance(out[-1], NewSession)


def test_a_bind_the_server_refused_reaches_the_client_with_its_id() -> None:
    core, _ = registry()
    reply = st.element("iq", {"type": "error", "id": "upstream-7", "to": "x", "from": "y"})
    error = st.sub(reply, "error", {"type": "cancel"})
    st.sub(error, "conflict", namespace="urn:ietf:params:xml:ns:xmpp-stanzas")
    out = core.bind_refused_upstream(bind_iq("pc"), reply, "conflict")
    sent = to_client(out)
    assert sent.get("id") == "b1" and sent.get("to") is None and sent.get("from") is None
    assert logged(out) == ["bind_failed"]
    (fail,) = core.bind_broke()
    assert isinstance(fail, FailNegotiation) and fail.error is not None
    assert b"remote-connection-failed" in fail.error


def test_a_reload_applies_the_new_session_limit_from_the_next_bind() -> None:
    core, _ = registry(max_sessions_per_account=5)
    core.sm_ended(("juliet@localhost", "sm1"), 4)
    core.reconfigure(AbuseConfig(max_sessions_per_account=1), max_resume_timeout=300)
    assert logged(bind(core, bind_iq("b"), sessions=1)) == ["session_refused"]
    assert to_client(core.resume("juliet@localhost", "sm1", 0, resumable=False)).get("h") == "4"
