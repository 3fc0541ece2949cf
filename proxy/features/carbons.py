"""XEP-0280 message carbons, for a server that lacks them. Sans-IO.

When ``features.carbons`` says the proxy provides them (``emulates``), it answers
``<enable/>`` and ``<disable/>`` itself (never passed on) and copies, among the account's
sessions through the proxy, the messages eligible by §6 (``eligible``):

- sent: a message a session sends reaches each other carbons-enabled session as
  ``<sent/>`` (XEP-0297 forwarded), except the session it is addressed to (it gets the
  message itself);
- received: a message the server delivers to one session reaches the other enabled
  sessions as ``<received/>``. One to the bare JID may be delivered by the server to several
  sessions (RFC 6121 §8.5.2: the highest priority, one or all of them): its copies wait
  ``carbons.bare_wait`` seconds and skip every session that received the message itself;
- a ``<private/>`` (urn:xmpp:carbons:2) or ``<no-copy/>`` (urn:xmpp:hints) message is not
  copied; ``<private/>`` is removed from the messages the client receives (§7).

Copies go through ``ToAccount``: the hub hands them to the account's other sessions (the
hibernating ones too, queued by stream management), whose carbons feature delivers them
only when its client enabled carbons. Sessions of the account that do not go through the
proxy get no copies, and what only they send or receive is not copied to the others.

Two pipeline positions (one shared state per session): ``CarbonsFactory`` sits at the
server edge (after rules and blocking on the way out: a sent copy shows what was sent, and
nothing a block refused); ``CarbonsFactory.tap`` sits at the client edge before rules (on
the way in it sees what the client is given, after rules and blocking).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lxml import etree

from ..commands import StartTimer, ToAccount
from ..config import FeatureMode, emulates
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.disco import Additions, ServerInfo
from ..xmpp.jid import bare_of
from ..xmpp.stanza import Element

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
_ENABLE = ns.qname(CARBONS, "enable")
_DISABLE = ns.qname(CARBONS, "disable")
_PRIVATE = ns.qname(CARBONS, "private")
_SENT = ns.qname(CARBONS, "sent")
_RECEIVED = ns.qname(CARBONS, "received")
_NO_COPY = ns.qname(HINTS, "no-copy")
_BODY = ns.qname(ns.CLIENT, "body")
_MUC_USER = ns.qname(ns.MUC_USER, "x")
_FORWARDED = ns.qname(FORWARD, "forwarded")
# Payloads of instant messaging without a body (§6: chat states, receipts, markers).
_IM_NAMESPACES = frozenset(("http://jabber.org/protocol/chatstates", "urn:xmpp:receipts",
                            "urn:xmpp:chat-markers:0"))
KIND = "carbon"
TIMER = "carbons-bare"
RECENT_WINDOW = 60.0  # seconds a bare-JID message is remembered (late deliveries join it)
MAX_RECENT = 500      # such messages remembered per account
MAX_SENT_IDS = 100    # ids of a session's eligible messages, for the errors they bring back


def eligible(el: Element, *, outgoing: bool, account: str) -> bool:
    """§6 (and §6.1 for MUC): whether a message is copied. Errors are decided by the caller
    (only those answering an eligible message the session sent)."""
    if el.tag != st.MESSAGE:
        return False
    if (el.find(_PRIVATE) is not None or el.find(_NO_COPY) is not None
            or el.find(_SENT) is not None or el.find(_RECEIVED) is not None):
        return False  # the hints, and a copy is never copied again
    kind = el.get("type", "normal")
    if kind not in ("chat", "normal"):
        return False  # groupchat (§6.1), headline, error
    if not outgoing and el.find(_MUC_USER) is not None and el.get("to") != account:
        return False  # §6.1: a MUC private message to the one resource in the room
    if kind == "chat" or el.find(_BODY) is not None:
        return True
    return any(isinstance(c.tag, str) and etree.QName(c).namespace in _IM_NAMESPACES
               for c in el)


def wrap(direction: str, message: Element) -> Element:
    """``<sent/>`` or ``<received/>`` around a forwarded copy (XEP-0297)."""
    holder = st.element(direction, namespace=CARBONS)
    forwarded = st.sub(holder, "forwarded", namespace=FORWARD)
    forwarded.append(copy.deepcopy(message))
    return holder


def message_key(el: Element) -> tuple[str, str]:
    """Tells deliveries of one message apart from others: sender and id, or the content."""
    if el.get("id"):
        return (el.get("from", ""), "id:" + el.get("id", ""))
    return (el.get("from", ""), hashlib.sha256(etree.tostring(el)).hexdigest())


@dataclass
class _BareDelivery:
    """A message the server routed to the bare JID: which sessions got it themselves."""

    owner: str                      # the session that sends the copies
    at: float
    message: Element | None         # None once the copies went out
    receivers: set[str] = field(default_factory=set)


@dataclass
class _State:
    """One session's carbons, shared by its two pipeline features."""

    sent_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    timer_running: bool = False


class _Account:
    def __init__(self) -> None:
        self.sessions: dict[str, _State] = {}
        # The sessions that enabled carbons (the only record of it: anyone_enabled, asked
        # for every message both ways, is a look at this set, not a walk of the sessions).
        self.enabled: set[str] = set()
        self.recent: OrderedDict[tuple[str, str], _BareDelivery] = OrderedDict()

    def set_enabled(self, session_id: str, enabled: bool) -> None:
        if enabled:
            self.enabled.add(session_id)
        else:
            self.enabled.discard(session_id)

    def anyone_enabled(self, except_session: str | None = None) -> bool:
        """Whether a copy could go anywhere: the relay path asks this first."""
        enabled = self.enabled
        return len(enabled) > 1 or (bool(enabled) and except_session not in enabled)

    def trim(self, now: float) -> None:
        while self.recent and (len(self.recent) > MAX_RECENT
                               or next(iter(self.recent.values())).at < now - RECENT_WINDOW):
            self.recent.popitem(last=False)


class CarbonsFactory(FeatureFactory):
    """The server-edge part (iqs, sent copies, delivery of copies); ``tap`` is the
    client-edge part (received copies)."""

    def __init__(self, mode: FeatureMode = "auto", bare_wait: float = 0.3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.bare_wait = bare_wait
        self.clock = clock
        self._accounts: dict[str, _Account] = {}
        self.tap = _TapFactory(self)

    def emulated(self, server: ServerInfo) -> bool:
        return emulates(self.mode, server.domain_has(CARBONS))

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        if self.emulated(server):
            additions.domain.add(CARBONS)

    def _share(self, session: SessionCore) -> tuple[_Account, _State]:
        acct = self._accounts.setdefault(str(session.account), _Account())
        return acct, acct.sessions.setdefault(session.id, _State())

    def create(self, session: SessionCore) -> Feature:
        if not self.emulated(session.server):
            return Feature()
        acct, state = self._share(session)
        return Carbons(self, acct, state, session)

    def enabled(self, account: str, session_id: str) -> bool:
        """For tests: whether a session enabled carbons."""
        acct = self._accounts.get(account)
        return bool(acct and session_id in acct.enabled)

    def _release(self, account: str, session_id: str) -> None:
        acct = self._accounts.get(account)
        if acct is None:
            return
        acct.sessions.pop(session_id, None)
        acct.enabled.discard(session_id)
        if not acct.sessions:
            del self._accounts[account]


class _TapFactory(FeatureFactory):
    def __init__(self, main: CarbonsFactory) -> None:
        self.main = main

    def create(self, session: SessionCore) -> Feature:
        main = self.main
        if not main.emulated(session.server):
            return Feature()
        acct, state = main._share(session)
        return CarbonsTap(main, acct, state, session)


class _CarbonsPart(Feature):
    """What both pipeline parts of a session's carbons share."""

    def __init__(self, factory: CarbonsFactory, acct: _Account, state: _State,
                 session: SessionCore) -> None:
        self._factory = factory
        self._acct = acct
        self.state = state
        self._account = str(session.account)
        self._domain = session.account.domain
        self._jid = str(session.jid)
        self._id = session.id


class Carbons(_CarbonsPart):
    """Enable and disable, sent copies, and the copies other sessions send this one."""

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag == st.IQ:
            if len(el) == 1 and el[0].tag in (_ENABLE, _DISABLE) \
                    and el.get("to") in (None, self._account, self._domain):
                if el.get("type") != "set":
                    out.to_client.append(st.error_reply(el, "bad-request"))
                else:
                    self._acct.set_enabled(self._id, el[0].tag == _ENABLE)
                    out.to_client.append(st.iq_result(el))
                return None
            return el
        if not self._acct.anyone_enabled(except_session=self._id):
            return el  # no other session would get a copy
        if eligible(el, outgoing=True, account=self._account):
            if el.get("id"):
                ids = self.state.sent_ids
                ids[el.get("id", "")] = None
                while len(ids) > MAX_SENT_IDS:
                    ids.popitem(last=False)
            out.commands.append(ToAccount(KIND, wrap("sent", el)))
        return el

    def from_account(self, session: SessionCore, kind: str, payload: Element,
                     out: Outputs) -> None:
        if kind != KIND or self._id not in self._acct.enabled:
            return
        inner = payload.find(f"{_FORWARDED}/{st.MESSAGE}")
        if inner is None:
            return
        if payload.tag == _SENT:
            if inner.get("to") == self._jid:
                return  # addressed to this session: it gets the message itself
        else:
            delivery = self._acct.recent.get(message_key(inner))
            if delivery is not None and self._id in delivery.receivers:
                return  # the server delivered it here too
            if delivery is not None:
                delivery.receivers.add(self._id)  # a late delivery here is then known
        carbon = st.element("message", {"from": self._account, "to": self._jid,
                                        "type": inner.get("type", "normal")})
        carbon.append(payload)
        out.to_client.append(carbon)

    def closed(self, session: SessionCore) -> None:
        self._factory._release(self._account, self._id)


class CarbonsTap(_CarbonsPart):
    """Received copies, made from what the client is given (after rules and blocking)."""
    upstream_tags = frozenset((st.MESSAGE,))


    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.MESSAGE:
            return el
        for child in el:  # not find(): it parses its path on every call
            if child.tag == _PRIVATE:
                el.remove(child)  # §7: the receiving server removes it; never copied
                return el
        if not self._acct.anyone_enabled():
            return el  # (this session too: an enabled one must note what it got itself)
        if bare_of(el.get("from")) == self._account:
            return el  # the account's own: its sent copies went out already
        if el.get("type") == "error":
            if el.get("id") not in self.state.sent_ids:
                return el
        elif not eligible(el, outgoing=False, account=self._account):
            return el
        if el.get("to") == self._jid:
            out.commands.append(ToAccount(KIND, wrap("received", el)))
            return el
        self._bare_delivery(el, out)
        return el

    def _bare_delivery(self, el: Element, out: Outputs) -> None:
        """To the bare JID (or a resource that is gone): the server may hand it to other
        sessions too; the copies wait for them."""
        acct, now = self._acct, self._factory.clock()
        acct.trim(now)
        key = message_key(el)
        delivery = acct.recent.get(key)
        if delivery is not None:
            delivery.receivers.add(self._id)
            return
        acct.recent[key] = _BareDelivery(self._id, now, copy.deepcopy(el), {self._id})
        if not self.state.timer_running:
            self.state.timer_running = True
            out.commands.append(StartTimer(TIMER, self._factory.bare_wait))

    def timer_fired(self, session: SessionCore, name: str, out: Outputs) -> None:
        if name != TIMER:
            return
        self.state.timer_running = False
        now, wait = self._factory.clock(), self._factory.bare_wait
        later = False
        for delivery in self._acct.recent.values():
            if delivery.owner != self._id or delivery.message is None:
                continue
            if delivery.at + wait <= now + 1e-6:
                out.commands.append(ToAccount(KIND, wrap("received", delivery.message)))
                delivery.message = None
            else:
                later = True
        if later:
            self.state.timer_running = True
            out.commands.append(StartTimer(TIMER, wait))

    def closed(self, session: SessionCore) -> None:
        # Copies this session still owed are not sent: the shell takes no output from a
        # closing session. They were at most bare_wait old.
        for delivery in self._acct.recent.values():
            if delivery.owner == self._id:
                delivery.message = None
