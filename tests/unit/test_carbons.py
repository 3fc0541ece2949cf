"""Message carbons (XEP-0280) as the proxy emulates them: playbooks of stanzas in and out
against SessionCores of one account, with the ToAccount hand-over done as the hub does it
(a deep copy to each other session)."""

from __future__ import annotations

import copy

from lxml import etree

from proxy.commands import StartTimer, ToAccount
from proxy.features.carbons import CARBONS, TIMER, CarbonsFactory, eligible
from proxy.session import Outputs, SessionCore
from proxy.xmpp import ns
from proxy.xmpp.codec import StanzaReceived, XmlStreamParser
from proxy.xmpp.disco import DiscoInfo, ServerInfo
from proxy.xmpp.jid import Jid

Element = etree._Element
HEADER = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
          b" version='1.0'>")
ACCOUNT = "romeo@example.net"
SENT = ns.qname(CARBONS, "sent")
RECEIVED = ns.qname(CARBONS, "received")
FWD_MSG = "{urn:xmpp:forward:0}forwarded/{jabber:client}message"


def parse(raw: str) -> Element:
    events = XmlStreamParser().feed(HEADER + raw.encode())
    (el,) = [e.element for e in events if isinstance(e, StanzaReceived)]
    return el


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Account:
    """Sessions of one account behind the proxy; ToAccount delivered like the hub does."""

    def __init__(self, *resources: str, server: ServerInfo | None = None,
                 mode: str = "auto") -> None:
        self.clock = Clock()
        self.factory = CarbonsFactory(mode, bare_wait=0.3, clock=self.clock)  # type: ignore[arg-type]
        self.sessions = {r: SessionCore(Jid.parse(f"{ACCOUNT}/{r}"),
                                        [self.factory.tap, self.factory], server)
                         for r in resources}
        self.client: dict[str, list[Element]] = {r: [] for r in resources}
        self.upstream: dict[str, list[Element]] = {r: [] for r in resources}
        self.timers: dict[str, float] = {}

    def _run(self, resource: str, out: Outputs) -> None:
        self.client[resource].extend(out.to_client)
        self.upstream[resource].extend(out.to_upstream)
        for command in out.commands:
            if isinstance(command, ToAccount):
                for other, core in self.sessions.items():
                    if other != resource:
                        self._run(other, core.from_account(command.kind,
                                                           copy.deepcopy(command.payload)))
            elif isinstance(command, StartTimer):
                self.timers[resource] = self.clock.now + command.seconds

    def send(self, resource: str, raw: str) -> None:
        self._run(resource, self.sessions[resource].from_client(parse(raw)))

    def receive(self, resource: str, raw: str) -> None:
        self._run(resource, self.sessions[resource].from_upstream(parse(raw)))

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        for resource, due in list(self.timers.items()):
            if due <= self.clock.now:
                del self.timers[resource]
                self._run(resource, self.sessions[resource].timer_fired(TIMER))

    def enable(self, *resources: str) -> None:
        for r in resources:
            self.send(r, f"<iq type='set' id='en-{r}'><enable xmlns='{CARBONS}'/></iq>")
            answer = self.client[r].pop()
            assert answer.get("type") == "result" and answer.get("id") == f"en-{r}"

    def carbons(self, resource: str) -> list[Element]:
        return [el for el in self.client[resource]
                if el.find(SENT) is not None or el.find(RECEIVED) is not None]


def test_enable_disable_answered_by_the_proxy_never_forwarded() -> None:
    acct = Account("home", "garden")
    acct.send("home", f"<iq type='set' id='e1'><enable xmlns='{CARBONS}'/></iq>")
    assert acct.upstream["home"] == []
    (answer,) = acct.client["home"]
    assert answer.get("type") == "result" and answer.get("id") == "e1"
    assert acct.factory.enabled(ACCOUNT, acct.sessions["home"].id)
    acct.send("home", f"<iq type='set' id='e2'><enable xmlns='{CARBONS}'/></iq>")  # §8.1
    assert acct.client["home"][-1].get("type") == "result"
    acct.send("home", f"<iq type='set' id='d1' to='{ACCOUNT}'><disable xmlns='{CARBONS}'/></iq>")
    assert acct.client["home"][-1].get("type") == "result"
    assert not acct.factory.enabled(ACCOUNT, acct.sessions["home"].id)
    acct.send("home", f"<iq type='get' id='g1'><enable xmlns='{CARBONS}'/></iq>")
    assert acct.client["home"][-1].get("type") == "error"
    assert acct.upstream["home"] == []


def test_sent_copy_to_other_enabled_sessions_only() -> None:
    acct = Account("home", "garden", "car")
    acct.enable("home", "garden")  # car never enabled
    acct.send("car", "<message to='juliet@example.com/balcony' type='chat' id='m1'>"
                     "<body>Neither, fair saint</body></message>")
    assert [m.get("id") for m in acct.upstream["car"]] == ["m1"]  # it still goes out
    (copy_home,) = acct.carbons("home")
    (copy_garden,) = acct.carbons("garden")
    assert acct.carbons("car") == []
    assert copy_home.get("from") == ACCOUNT and copy_home.get("to") == f"{ACCOUNT}/home"
    assert copy_home.get("type") == "chat"
    inner = copy_home.find(f"{{{CARBONS}}}sent/{FWD_MSG}")
    assert inner is not None and inner.get("from") == f"{ACCOUNT}/car"
    assert inner.findtext("{jabber:client}body") == "Neither, fair saint"
    assert copy_garden.get("to") == f"{ACCOUNT}/garden"


def test_no_copy_is_made_once_the_enabled_sessions_disabled_or_closed() -> None:
    """The relay path's check (anyone enabled but the sender?) follows enable, disable
    and a session's end."""
    acct = Account("home", "garden", "car")

    def copies_made(resource: str, n: int) -> int:
        out = acct.sessions[resource].from_client(parse(
            f"<message to='juliet@example.com' type='chat' id='x{n}'><body>b</body></message>"))
        return sum(isinstance(c, ToAccount) for c in out.commands)
    assert copies_made("car", 0) == 0
    acct.enable("home", "garden")
    assert copies_made("car", 1) == 1 and copies_made("home", 2) == 1
    acct.send("home", f"<iq type='set' id='d1'><disable xmlns='{CARBONS}'/></iq>")
    assert copies_made("car", 3) == 1 and copies_made("garden", 4) == 0
    acct.sessions["garden"].closed()
    assert copies_made("car", 5) == 0
    acct.enable("home")
    assert copies_made("car", 6) == 1 and copies_made("home", 7) == 0


def test_received_copy_for_full_jid_at_once() -> None:
    acct = Account("home", "garden")
    acct.enable("home", "garden")
    acct.receive("home", f"<message from='juliet@example.com/balcony' to='{ACCOUNT}/home'"
                         " type='chat' id='j1'><body>What man art thou</body></message>")
    assert [m.get("id") for m in acct.client["home"]] == ["j1"]
    (carbon,) = acct.carbons("garden")
    inner = carbon.find(f"{{{CARBONS}}}received/{FWD_MSG}")
    assert inner is not None and inner.get("id") == "j1"
    assert acct.carbons("home") == []


def test_private_and_no_copy_are_not_copied_and_private_is_stripped_inbound() -> None:
    acct = Account("home", "garden")
    acct.enable("home", "garden")
    acct.send("home", "<message to='juliet@example.com' type='chat' id='p1'><body>x</body>"
                      f"<private xmlns='{CARBONS}'/></message>")
    acct.send("home", "<message to='juliet@example.com' type='chat' id='p2'><body>x</body>"
                      "<no-copy xmlns='urn:xmpp:hints'/></message>")
    assert acct.carbons("garden") == []
    assert len(acct.upstream["home"]) == 2
    acct.receive("home", f"<message from='juliet@example.com/b' to='{ACCOUNT}/home'"
                         f" type='chat' id='p3'><body>y</body><private xmlns='{CARBONS}'/>"
                         "</message>")
    assert acct.carbons("garden") == []
    (got,) = acct.client["home"]
    assert got.find(f"{{{CARBONS}}}private") is None


def test_eligibility_rules() -> None:
    def ok(raw: str, outgoing: bool = False) -> bool:
        return eligible(parse(raw), outgoing=outgoing, account=ACCOUNT)

    assert ok("<message type='chat' to='romeo@example.net/a'/>")
    assert ok("<message to='romeo@example.net/a'><body>hi</body></message>")  # normal + body
    assert not ok("<message to='romeo@example.net/a'><subject>s</subject></message>")
    assert ok("<message to='romeo@example.net/a'><received xmlns='urn:xmpp:receipts' id='x'/>"
              "</message>")
    assert ok("<message to='romeo@example.net/a'>"
              "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
    assert not ok("<message type='groupchat' to='romeo@example.net/a'><body>b</body></message>")
    assert not ok("<message type='headline' to='romeo@example.net/a'><body>b</body></message>")
    assert not ok("<message type='error' to='romeo@example.net/a'><body>b</body></message>")
    muc_pm = ("<message type='chat' to='{to}'><body>pm</body>"
              "<x xmlns='http://jabber.org/protocol/muc#user'/></message>")
    # §6.1: a received MUC-PM to the resource in the room is not copied; a sent one is.
    assert not ok(muc_pm.format(to="romeo@example.net/a"))
    assert ok(muc_pm.format(to="room@muc.example.com/nick"), outgoing=True)
    assert ok(muc_pm.format(to=ACCOUNT))
    # A copy is never copied again.
    assert not ok(f"<message type='chat'><received xmlns='{CARBONS}'/></message>")


def test_groupchat_and_headline_not_copied() -> None:
    acct = Account("home", "garden")
    acct.enable("home", "garden")
    acct.receive("home", f"<message from='room@muc.example.com/n' to='{ACCOUNT}/home'"
                         " type='groupchat' id='g'><body>all</body></message>")
    acct.send("home", "<message to='room@muc.example.com' type='groupchat' id='g2'>"
                      "<body>b</body></message>")
    acct.receive("home", f"<message from='news.example.com' to='{ACCOUNT}/home'"
                         " type='headline' id='h'><body>news</body></message>")
    assert acct.carbons("garden") == []


def test_bare_jid_message_copies_skip_sessions_the_server_delivered_to() -> None:
    acct = Account("home", "garden", "car")
    acct.enable("home", "garden", "car")
    raw = (f"<message from='juliet@example.com/balcony' to='{ACCOUNT}' type='chat' id='b1'>"
           "<body>to all of you</body></message>")
    acct.receive("home", raw)
    acct.receive("garden", raw)  # the server gave it to both (same priority)
    assert acct.carbons("car") == []  # the copies wait
    acct.advance(0.31)
    assert acct.carbons("home") == [] and acct.carbons("garden") == []
    (carbon,) = acct.carbons("car")
    assert carbon.find(f"{{{CARBONS}}}received/{FWD_MSG}").get("id") == "b1"
    acct.receive("car", raw)  # a late delivery makes no new copies for the others
    acct.advance(1.0)
    assert acct.carbons("home") == [] and acct.carbons("garden") == []


def test_error_copied_only_for_an_eligible_message_the_session_sent() -> None:
    acct = Account("home", "garden")
    acct.enable("home", "garden")
    acct.send("home", "<message to='nobody@example.com' type='chat' id='s1'><body>x</body>"
                      "</message>")
    assert len(acct.carbons("garden")) == 1
    acct.receive("home", f"<message from='nobody@example.com' to='{ACCOUNT}/home' type='error'"
                         " id='s1'><error type='cancel'><service-unavailable"
                         " xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
    acct.receive("home", f"<message from='nobody@example.com' to='{ACCOUNT}/home' type='error'"
                         " id='other'><error type='cancel'><service-unavailable"
                         " xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
    received = [c for c in acct.carbons("garden") if c.find(RECEIVED) is not None]
    assert [c.find(f"{RECEIVED}/{FWD_MSG}").get("id") for c in received] == ["s1"]


def test_messages_to_own_resources() -> None:
    acct = Account("home", "garden", "car")
    acct.enable("home", "garden", "car")
    acct.send("home", f"<message to='{ACCOUNT}/garden' type='chat' id='o1'><body>self</body>"
                      "</message>")
    assert acct.carbons("garden") == []  # it gets the message itself
    assert len(acct.carbons("car")) == 1
    # The delivery to garden comes from the account itself: no received copies on top.
    acct.receive("garden", f"<message from='{ACCOUNT}/home' to='{ACCOUNT}/garden' type='chat'"
                           " id='o1'><body>self</body></message>")
    assert len(acct.carbons("car")) == 1 and acct.carbons("home") == []


def test_server_with_carbons_passes_everything_through() -> None:
    server = ServerInfo(domain=DiscoInfo(features=frozenset({CARBONS})))
    acct = Account("home", "garden", server=server)
    acct.send("home", f"<iq type='set' id='e'><enable xmlns='{CARBONS}'/></iq>")
    assert [e.get("id") for e in acct.upstream["home"]] == ["e"]  # the server's to answer
    acct.send("garden", "<message to='juliet@example.com' type='chat' id='m'><body>x</body>"
                        "</message>")
    assert acct.carbons("home") == []
    assert CARBONS not in acct.sessions["home"].additions.domain
    # on: the proxy provides them even so, and never passes the enable on
    acct = Account("home", "garden", server=server, mode="on")
    assert CARBONS in acct.sessions["home"].additions.domain
    acct.enable("home")
    assert acct.upstream["home"] == []


def test_disco_advertises_when_emulated() -> None:
    acct = Account("home")
    assert CARBONS in acct.sessions["home"].disco_features()
    off = CarbonsFactory("off")
    core = SessionCore(Jid.parse(f"{ACCOUNT}/x"), [off.tap, off])
    assert CARBONS not in core.disco_features()
