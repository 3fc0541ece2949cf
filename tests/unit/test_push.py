"""Push notifications (XEP-0357): enable and disable, the notification, coalescing and
rate limiting on an injected clock, publish errors, and the registrations in the store."""

from __future__ import annotations

from lxml import etree

from proxy.commands import Log, StartTimer, ToAccount, ToServerDirect, WhenStored
from proxy.config import parse_config
from proxy.features.push import (PUBLISH_OPTIONS, PUSH, SUMMARY, TIMER, PushFactory,
                                 PushPolicy, Registration)
from proxy.session import Additions, Outputs, SessionCore
from proxy.store import Store
from proxy.xmpp.disco import DiscoInfo, ServerInfo
from proxy.xmpp.jid import Jid

PUBSUB = "http://jabber.org/protocol/pubsub"
DATA = "jabber:x:data"
CLIENT = "jabber:client"
ACCOUNT = "alice@example.org"
OPTIONS = (f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}"
           "</value></field><field var='secret'><value>s3cr3t</value></field></x>")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def xml(text: str) -> etree._Element:
    return etree.fromstring(text.replace("<iq", f"<iq xmlns='{CLIENT}'", 1)
                            .replace("<message", f"<message xmlns='{CLIENT}'", 1))


def make(policy: PushPolicy | None = None, *, mode: str = "auto", server_has: bool = False,
         store: Store | None = None, resource: str = "phone",
         factory: PushFactory | None = None,
         clock: Clock | None = None) -> tuple[SessionCore, PushFactory, Clock]:
    clock = clock or Clock()
    if factory is None:
        factory = PushFactory(mode, policy or PushPolicy(),  # type: ignore[arg-type]
                              store.push if store is not None else None, clock=clock)
    account = DiscoInfo(features=frozenset({PUSH} if server_has else ()))
    core = SessionCore(Jid.parse(f"{ACCOUNT}/{resource}"), [factory],
                       ServerInfo(domain=DiscoInfo(), account=account))
    return core, factory, clock


def enable(core: SessionCore, jid: str = "push.example", node: str = "N1",
           options: str = OPTIONS, iq_id: str = "e1") -> Outputs:
    return core.from_client(xml(f"<iq type='set' id='{iq_id}'><enable xmlns='{PUSH}' "
                                f"jid='{jid}' node='{node}'>{options}</enable></iq>"))


def message(n: int, sender: str = "bob@example.org/pc", body: str = "hello") -> etree._Element:
    return xml(f"<message from='{sender}' to='{ACCOUNT}/phone' id='m{n}' type='chat'>"
               f"<body>{body} {n}</body></message>")


def publishes(out: Outputs) -> list[etree._Element]:
    return [c.element for c in out.commands if isinstance(c, ToServerDirect)]


def summary(iq: etree._Element) -> dict[str, str]:
    form = iq.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish/{{{PUBSUB}}}item/"
                   f"{{{PUSH}}}notification/{{{DATA}}}x")
    assert form is not None
    return {f.get("var"): f.findtext(f"{{{DATA}}}value") for f in form.iter(f"{{{DATA}}}field")}


def held(out: Outputs) -> WhenStored:
    """The one reply held until the store's writer committed."""
    (when,) = [c for c in out.commands if isinstance(c, WhenStored)]
    return when


def hibernate(core: SessionCore, unacked: list[etree._Element] | None = None) -> Outputs:
    return core.client_detached(unacked or [])


# Enable and disable ---------------------------------------------------------------------------


def test_enable_is_answered_by_the_proxy_and_kept_in_the_store(tmp_path) -> None:
    store = Store(str(tmp_path / "s.sqlite3"))
    core, _factory, _ = make(store=store)
    out = enable(core)
    assert out.to_upstream == []  # never forwarded
    # The result is a promise that it is stored: held until the writer's commit.
    assert out.to_client == []
    when = held(out)
    (answer,) = when.then.to_client
    assert answer.get("type") == "result" and answer.get("id") == "e1"
    assert answer.get("to") == f"{ACCOUNT}/phone" and answer.get("from") is None
    # If the commit fails: an error to retry later, and an event saying so.
    (error,) = when.failed.to_client
    assert error.get("type") == "error" and error.get("id") == "e1"
    assert error.get("from") is None
    assert error.find(f"{{{CLIENT}}}error").get("type") == "wait"
    assert error.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}"
                      "internal-server-error") is not None
    assert [c.event for c in when.failed.commands if isinstance(c, Log)] == ["push_not_stored"]
    (reg,) = store.push.registrations(ACCOUNT)
    assert (reg.jid, reg.node) == ("push.example", "N1")
    assert reg.options is not None and b"s3cr3t" in reg.options
    # Another proxy run (a new factory on the same store) knows it, once the store's
    # writer has committed it (this run's next batch; at the latest its close).
    store.writer.flush()
    again = Store(str(tmp_path / "s.sqlite3"))
    core2, _, _ = make(store=again)
    hibernate(core2)
    assert len(publishes(core2.from_upstream(message(1)))) == 1


def test_enable_needs_jid_and_node_and_a_publish_options_form() -> None:
    core, _, _ = make()
    cases = {
        f"<enable xmlns='{PUSH}' node='N'/>": "bad-request",
        f"<enable xmlns='{PUSH}' jid='push.example'/>": "bad-request",
        f"<enable xmlns='{PUSH}' jid='a@/x' node='N'/>": "jid-malformed",
        f"<enable xmlns='{PUSH}' jid='push.example' node='N'><x xmlns='{DATA}' type='submit'>"
        "<field var='FORM_TYPE'><value>urn:other</value></field></x></enable>": "bad-request",
        f"<disable xmlns='{PUSH}'/>": "bad-request",
    }
    for payload, condition in cases.items():
        out = core.from_client(xml(f"<iq type='set' id='x'>{payload}</iq>"))
        (answer,) = out.to_client
        assert answer.get("type") == "error", payload
        assert answer.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}"
                           f"{condition}") is not None, payload
        assert out.to_upstream == []
    hibernate(core)
    assert publishes(core.from_upstream(message(1))) == []  # nothing was registered


def test_disable_one_node_or_every_node_of_a_service() -> None:
    core, factory, _clock = make()
    enable(core, node="N1")
    enable(core, node="N2", iq_id="e2")
    enable(core, jid="other.example", node="N3", iq_id="e3")
    out = core.from_client(xml(f"<iq type='set' id='d1'><disable xmlns='{PUSH}' "
                               "jid='push.example' node='N1'/></iq>"))
    assert out.to_client == []
    assert held(out).then.to_client[0].get("type") == "result"
    assert set(factory.accounts[ACCOUNT].targets) == {("push.example", "N2"),
                                                      ("other.example", "N3")}
    core.from_client(xml(f"<iq type='set' id='d2'><disable xmlns='{PUSH}' "
                         "jid='push.example'/></iq>"))
    assert set(factory.accounts[ACCOUNT].targets) == {("other.example", "N3")}


def test_max_registrations_drops_the_oldest_and_a_renewal_keeps_its_place_as_newest() -> None:
    core, factory, _ = make(PushPolicy(max_registrations=2))
    enable(core, node="A")
    enable(core, node="B")
    enable(core, node="A", options="")  # renewed: the newest now, with no options
    enable(core, node="C")
    targets = factory.accounts[ACCOUNT].targets
    assert list(targets) == [("push.example", "A"), ("push.example", "C")]
    assert targets[("push.example", "A")].registration.options is None


def test_not_emulated_when_the_server_has_it_or_off() -> None:
    for mode, server_has in (("auto", True), ("off", False)):
        core, factory, _ = make(mode=mode, server_has=server_has)
        iq = xml(f"<iq type='set' id='e'><enable xmlns='{PUSH}' jid='p' node='N'/></iq>")
        out = core.from_client(iq)
        assert out.to_upstream == [iq] and out.to_client == []  # the server's to answer
        additions = Additions()
        factory.disco(core.server, additions)
        assert PUSH not in additions.account
    core, factory, _ = make(mode="on", server_has=True)
    assert PUSH in core.additions.account
    core, factory, _ = make()
    assert PUSH in core.additions.account and PUSH not in core.additions.domain


# Notifications --------------------------------------------------------------------------------


def test_a_message_to_a_hibernating_session_is_published_with_the_summary_form() -> None:
    core, _, _ = make()
    enable(core)
    passed = core.from_upstream(message(1))
    assert publishes(passed) == [] and len(passed.to_client) == 1  # active: nothing
    hibernate(core)
    out = core.from_upstream(message(2))
    assert len(out.to_client) == 1  # the message still goes to the session (queued)
    (iq,) = publishes(out)
    assert (iq.get("type"), iq.get("to"), iq.get("from")) == (
        "set", "push.example", f"{ACCOUNT}/phone")
    publish = iq.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish")
    assert publish is not None and publish.get("node") == "N1"
    assert summary(iq) == {"FORM_TYPE": SUMMARY, "message-count": "1",
                           "last-message-sender": "bob@example.org/pc"}
    options = iq.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish-options/{{{DATA}}}x")
    assert options is not None and b"s3cr3t" in etree.tostring(options)
    # Nothing without a body (a chat state) or an error.
    assert publishes(core.from_upstream(xml(
        "<message from='b@x' type='chat'><active xmlns='http://jabber.org/protocol/"
        "chatstates'/></message>"))) == []
    # Back: nothing any more.
    core.client_attached()
    assert publishes(core.from_upstream(message(3))) == []


def test_the_body_only_when_configured_and_cut_at_max_body() -> None:
    core, _, _ = make(PushPolicy(include_body=True, max_body=5))
    enable(core)
    hibernate(core)
    (iq,) = publishes(core.from_upstream(message(1, body="wherefore art thou")))
    assert summary(iq)["last-message-body"] == "where"


def test_coalescing_and_rate_limiting_on_the_clock() -> None:
    core, _, clock = make(PushPolicy(min_interval=10))
    enable(core)
    hibernate(core)
    assert len(publishes(core.from_upstream(message(1)))) == 1
    clock.now += 2
    out = core.from_upstream(message(2))
    assert publishes(out) == []
    assert StartTimer(TIMER, 8.0) in out.commands
    clock.now += 3
    out = core.from_upstream(message(3, sender="carol@example.org/x"))
    assert publishes(out) == [] and StartTimer(TIMER, 5.0) in out.commands
    clock.now += 5
    (iq,) = publishes(core.timer_fired(TIMER))
    assert summary(iq)["message-count"] == "2"
    assert summary(iq)["last-message-sender"] == "carol@example.org/x"
    clock.now += 1
    assert publishes(core.timer_fired(TIMER)) == []  # nothing left to say
    clock.now += 20
    (iq,) = publishes(core.from_upstream(message(4)))
    assert summary(iq)["message-count"] == "1"


def test_unacked_messages_at_hibernation_are_counted_and_the_same_message_once() -> None:
    core, factory, clock = make()
    enable(core)
    unacked = [message(1), message(2), xml("<message from='x@y' type='chat'/>")]
    (iq,) = publishes(hibernate(core, unacked))
    assert summary(iq)["message-count"] == "2"
    # A second session of the account gets the same message (sent to the bare JID).
    other, _, _ = make(factory=factory, resource="tablet", clock=clock)
    hibernate(other)
    clock.now += 60
    assert len(publishes(core.from_upstream(message(7)))) == 1
    assert publishes(other.from_upstream(message(7))) == []  # counted once


def test_stored_messages_notify_unless_counted_while_hibernating() -> None:
    core, _factory, _clock = make(PushPolicy(min_interval=0))
    enable(core)
    # An active session that ends (a clean close): what it stores is notified.
    assert len(publishes(core.offline_stored(message(1), upstream_usable=True))) == 1
    # A hibernating session that times out: its queue was counted already.
    hibernate(core)
    core.from_upstream(message(2))
    assert publishes(core.offline_stored(message(2), upstream_usable=True)) == []
    # Ended, still reading the server (finishing): a new message is notified...
    core.closed()
    assert len(publishes(core.offline_stored(message(3), upstream_usable=True))) == 1
    # ... and with no usable link, another session of the account is asked to.
    out = core.offline_stored(message(4), upstream_usable=False)
    assert publishes(out) == []
    assert any(isinstance(c, ToAccount) for c in out.commands)


def test_an_outage_holds_the_notification_until_the_restore() -> None:
    core, _, _ = make()
    enable(core)
    hibernate(core)
    core.upstream_lost()
    assert publishes(core.from_upstream(message(1))) == []
    (iq,) = publishes(core.upstream_restored())
    assert summary(iq)["message-count"] == "1"


def test_another_session_flushes_when_asked() -> None:
    core, factory, clock = make()
    enable(core)
    other, _, _ = make(factory=factory, resource="desk", clock=clock)
    core.closed()
    out = core.offline_stored(message(1), upstream_usable=False)
    (ask,) = [c for c in out.commands if isinstance(c, ToAccount)]
    (iq,) = publishes(other.from_account(ask.kind, ask.payload))
    assert iq.get("from") == f"{ACCOUNT}/desk"


# Publish errors -------------------------------------------------------------------------------


def reply(iq: etree._Element, error: str | None = None,
          error_type: str = "cancel") -> etree._Element:
    if error is None:
        return xml(f"<iq type='result' id='{iq.get('id')}' from='{iq.get('to')}'/>")
    return xml(f"<iq type='error' id='{iq.get('id')}' from='{iq.get('to')}'><error "
               f"type='{error_type}'><{error} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
               "</error></iq>")


def test_an_error_reply_disables_the_registration(tmp_path) -> None:
    store = Store(str(tmp_path / "s.sqlite3"))
    core, _factory, _clock = make(PushPolicy(min_interval=0), store=store)
    enable(core)
    hibernate(core)
    (iq,) = publishes(core.from_upstream(message(1)))
    ok = core.from_upstream(reply(iq))
    assert ok.to_client == []  # the proxy's own: consumed
    (iq,) = publishes(core.from_upstream(message(2)))
    out = core.from_upstream(reply(iq, "item-not-found"))
    assert out.to_client == []
    assert any(isinstance(c, Log) and c.event == "push_disabled" for c in out.commands)
    assert store.push.registrations(ACCOUNT) == []
    assert publishes(core.from_upstream(message(3))) == []


def test_transient_errors_disable_only_after_max_errors_in_a_row() -> None:
    core, factory, _ = make(PushPolicy(min_interval=0, max_errors=2))
    enable(core)
    hibernate(core)
    (iq,) = publishes(core.from_upstream(message(1)))
    core.from_upstream(reply(iq, "resource-constraint", "wait"))
    (iq,) = publishes(core.from_upstream(message(2)))
    core.from_upstream(reply(iq))  # a success resets the count
    (iq,) = publishes(core.from_upstream(message(3)))
    core.from_upstream(reply(iq, "resource-constraint", "wait"))
    assert factory.accounts[ACCOUNT].targets
    (iq,) = publishes(core.from_upstream(message(4)))
    core.from_upstream(reply(iq, "remote-server-timeout", "wait"))
    assert not factory.accounts[ACCOUNT].targets


def test_the_app_server_removing_our_affiliation_disables_it() -> None:
    core, factory, _ = make()
    enable(core)
    notice = xml(f"<message from='push.example' to='{ACCOUNT}'><pubsub xmlns='{PUBSUB}' "
                 f"node='N1'><affiliation jid='{ACCOUNT}' affiliation='none'/></pubsub>"
                 "</message>")
    out = core.from_upstream(notice)
    assert out.to_client == [notice]
    assert not factory.accounts[ACCOUNT].targets


def test_the_account_state_goes_with_its_last_session() -> None:
    core, factory, clock = make()
    other, _, _ = make(factory=factory, resource="desk", clock=clock)
    core.closed()
    assert ACCOUNT in factory.accounts
    other.closed()
    assert ACCOUNT not in factory.accounts


def test_push_configuration_keys() -> None:
    config = parse_config({"push": {"min_interval": 30, "include_body": True,
                                    "max_registrations": 2}})
    assert (config.push.min_interval, config.push.include_body,
            config.push.max_registrations) == (30.0, True, 2)
    assert parse_config({}).push.include_body is False
    for bad in ({"max_registrations": 0}, {"min_interval": -1}, {"max_errors": 0}):
        try:
            parse_config({"push": bad})
        except ValueError as exc:
            assert "push." in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")


def test_registration_store_round_trip(tmp_path) -> None:
    store = Store(str(tmp_path / "s.sqlite3"))
    area = store.push
    area.save(ACCOUNT, Registration("p.example", "A", b"<x/>"))
    area.save(ACCOUNT, Registration("p.example", "B"))
    area.save(ACCOUNT, Registration("p.example", "A", None))  # renewed: newest
    area.save("bob@example.org", Registration("p.example", "Z"))
    assert [r.node for r in area.registrations(ACCOUNT)] == ["B", "A"]
    assert area.registrations(ACCOUNT)[1].options is None
    assert area.delete(ACCOUNT, "p.example", "B") == 1
    assert area.delete(ACCOUNT, "p.example") == 1
    assert area.registrations(ACCOUNT) == []
    assert len(area.registrations("bob@example.org")) == 1
