"""Push notifications (XEP-0357) for a legacy server that has none.

Clients enable and disable push (``<enable xmlns='urn:xmpp:push:0' jid=... node=...>`` with
publish options, ``<disable jid=... [node=...]/>``, §5 and §6); the proxy answers them itself
and keeps the registrations per account in the store (``store.push``), at most
``max_registrations`` (the oldest goes first). When a message with a body reaches a session
whose client is gone (hibernating, XEP-0198), or is stored by the proxy for the account's
next login, every registered app server gets a publish (§7) through the account's upstream
link: an iq set from the session's full JID with a ``urn:xmpp:push:summary`` form (message
count, last sender, the body only with ``include_body``) and the client's publish options.

Rate limit and coalescing: at most one publish per app server and node every
``min_interval`` seconds; what comes in meanwhile is counted and goes out when the interval
is over (one timer per account, owned by one of its sessions). No usable upstream link (an
outage): it waits for the restore, or goes through another live session of the account.
An error reply to a publish disables that registration (§7.1), except ``wait`` errors,
which do so only after ``max_errors`` in a row; an affiliation change to ``none`` from the
app server (§8) does too.

Pure: the shared state (registrations and counts per account) lives in the factory; each
session's feature returns commands (``ToServerDirect``, ``StartTimer``, ``ToAccount``,
``Log``, ``WhenStored``). The registrations are read from the store once per account (its
first session) and each change hands its rows to the store's writer thread (``StoreWriter``),
like the roster's: the event loop never waits for SQLite. The client's result waits for
the writer's commit (``WhenStored``); a failed commit answers ``internal-server-error``
(type wait) instead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lxml import etree

from ..commands import Log, StartTimer, ToAccount, ToServerDirect, WhenStored
from ..config import FeatureMode, emulates
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.disco import Additions, ServerInfo
from ..xmpp.jid import InvalidJid, Jid
from ..xmpp.stanza import Element

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
SUMMARY = "urn:xmpp:push:summary"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
DATA_FORMS = "jabber:x:data"

TIMER = "push"  # the account's coalescing timer (a feature timer of one of its sessions)
FLUSH = "push-flush"  # ToAccount kind: another session, publish what is due
MAX_IN_FLIGHT = 64  # publishes of a session awaiting the app server's answer
RECENT_KEYS = 64  # (sender, id) of messages counted lately: one message, one count

_ENABLE, _DISABLE = ns.qname(PUSH, "enable"), ns.qname(PUSH, "disable")
_FORM = ns.qname(DATA_FORMS, "x")
_FIELD, _VALUE = ns.qname(DATA_FORMS, "field"), ns.qname(DATA_FORMS, "value")
_BODY = ns.qname(ns.CLIENT, "body")
_ERROR = ns.qname(ns.CLIENT, "error")
_PUBSUB = ns.qname(PUBSUB, "pubsub")
_AFFILIATION = ns.qname(PUBSUB, "affiliation")


@dataclass(frozen=True)
class PushPolicy:
    """The settings (``push`` in the configuration)."""

    min_interval: float = 10.0
    include_body: bool = False
    max_registrations: int = 5
    max_body: int = 256  # characters of a body put in a notification (include_body)
    max_errors: int = 3  # transient (type wait) publish errors in a row before disabling


@dataclass(frozen=True)
class Registration:
    """One app server and node a client enabled, with its publish options (a data form
    as XML, or None)."""

    jid: str
    node: str
    options: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.jid, self.node)


class RegistrationStore(Protocol):
    """Where registrations are kept (``proxy/store.py`` ``PushArea``), oldest first."""

    def registrations(self, account: str) -> list[Registration]: ...

    def save(self, account: str, registration: Registration) -> None: ...

    def delete(self, account: str, jid: str, node: str | None = None) -> int: ...


class MemoryRegistrations:
    """Registrations in memory only (no store: they do not survive a restart)."""

    def __init__(self) -> None:
        self._by_account: dict[str, dict[tuple[str, str], Registration]] = {}

    def registrations(self, account: str) -> list[Registration]:
        return list(self._by_account.get(account, {}).values())

    def save(self, account: str, registration: Registration) -> None:
        regs = self._by_account.setdefault(account, {})
        regs.pop(registration.key, None)
        regs[registration.key] = registration

    def delete(self, account: str, jid: str, node: str | None = None) -> int:
        regs = self._by_account.get(account, {})
        gone = [k for k in regs if k[0] == jid and (node is None or k[1] == node)]
        for k in gone:
            del regs[k]
        return len(gone)


@dataclass
class Target:
    """One registration's notification state: what was counted since the last publish."""

    registration: Registration
    count: int = 0
    sender: str = ""
    body: str | None = None
    last_sent: float | None = None  # clock() of the last publish
    errors: int = 0  # transient errors in a row


@dataclass
class AccountPush:
    """The shared push state of one account (while it has sessions)."""

    account: str
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)  # ids of the account's open sessions
    timer_owner: str | None = None  # the session whose timer will flush what waits
    # Made at the first message counted (an empty deque is 760 bytes; most accounts have
    # no push registration).
    recent: deque[tuple[str, str]] | None = None

    @property
    def pending(self) -> int:
        return sum(t.count for t in self.targets.values())


def notable(el: Element) -> bool:
    """A message worth a notification: it has a body, and is no error."""
    if el.tag != st.MESSAGE or el.get("type") == "error":
        return False
    body = el.find(_BODY)
    return body is not None and bool((body.text or "").strip())


def form_type(form: Element) -> str | None:
    for f in form.iter(_FIELD):
        if f.get("var") == "FORM_TYPE":
            value = f.find(_VALUE)
            return (value.text or "") if value is not None else ""
    return None


def parse_enable(el: Element) -> Registration | str:
    """The registration an ``<enable/>`` asks for, or the stanza error condition."""
    jid, node = el.get("jid"), el.get("node")
    if not jid or not node:
        return "bad-request"
    try:
        Jid.parse(jid)
    except InvalidJid:
        return "jid-malformed"
    forms = el.findall(_FORM)
    if len(forms) > 1:
        return "bad-request"
    options = None
    if forms:
        if form_type(forms[0]) != PUBLISH_OPTIONS:
            return "bad-request"
        options = etree.tostring(forms[0])
    return Registration(jid, node, options)


def summary_form(target: Target, policy: PushPolicy) -> Element:
    """The §7 summary: FORM_TYPE, message-count, last-message-sender (and the body)."""
    form = st.element("x", {"type": "submit"}, namespace=DATA_FORMS)
    fields = [("FORM_TYPE", SUMMARY), ("message-count", str(target.count)),
              ("last-message-sender", target.sender)]
    if policy.include_body and target.body is not None:
        fields.append(("last-message-body", target.body[:policy.max_body]))
    for var, value in fields:
        f = st.sub(form, "field", {"var": var})
        if var == "FORM_TYPE":
            f.set("type", "hidden")
        st.sub(f, "value", text=value)
    return form


def publish_iq(target: Target, policy: PushPolicy, from_jid: str, iq_id: str) -> Element:
    reg = target.registration
    iq = st.element("iq", {"type": "set", "from": from_jid, "to": reg.jid, "id": iq_id})
    pubsub = st.sub(iq, "pubsub", namespace=PUBSUB)
    publish = st.sub(pubsub, "publish", {"node": reg.node})
    item = st.sub(publish, "item")
    notification = st.sub(item, "notification", namespace=PUSH)
    notification.append(summary_form(target, policy))
    if reg.options is not None:
        st.sub(pubsub, "publish-options").append(etree.fromstring(reg.options))
    return iq


class Push(Feature):
    client_tags = frozenset((st.IQ,))
    upstream_tags = frozenset((st.IQ, st.MESSAGE))

    def __init__(self, factory: PushFactory, state: AccountPush, active: bool) -> None:
        self.factory = factory
        self.state = state
        self.active = active  # emulated for this session (else everything passes)
        self.hibernating = False
        self.ended = False
        self._in_flight: dict[str, tuple[str, str]] = {}

    # Enable and disable ---------------------------------------------------------------------

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if (not self.active or el.tag != st.IQ or el.get("type") != "set" or len(el) != 1
                or el[0].tag not in (_ENABLE, _DISABLE)
                or el.get("to") not in (None, str(session.account))):
            return el
        request = el[0]
        if request.tag == _ENABLE:
            outcome = parse_enable(request)
            if isinstance(outcome, str):
                out.to_client.append(_own(st.error_reply(el, outcome), el))
                out.commands.append(Log("push_enable_refused", {"condition": outcome}))
                return None
            self.factory.enable(self.state, outcome, out)
        else:
            jid = request.get("jid")
            if not jid:
                out.to_client.append(_own(st.error_reply(el, "bad-request"), el))
                return None
            self.factory.disable(self.state, jid, request.get("node"), "disabled by the client",
                                 out)
        # The result once the writer committed the registration's rows (a disable's too:
        # the client must not believe it gone while a restart would bring it back).
        then, failed = Outputs(), Outputs()
        then.to_client.append(_own(st.iq_result(el), el))
        failed.to_client.append(_own(st.error_reply(
            el, "internal-server-error", error_type="wait",
            text="The push registration could not be stored; try again"), el))
        failed.commands.append(Log("push_not_stored", {
            "action": "enable" if request.tag == _ENABLE else "disable",
            "app_server": request.get("jid")}, "error"))
        out.commands.append(WhenStored(then, failed))
        return None

    # What the server sends -----------------------------------------------------------------

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if not self.active:
            return el
        if el.tag == st.IQ and self._in_flight:
            key = self._in_flight.pop(el.get("id", ""), None)
            if key is not None:
                self._answered(el, key, out)
                return None
        if el.tag != st.MESSAGE:
            return el
        if self.hibernating and notable(el):
            self._count(el)
            self._flush(session, out, usable=session.upstream_up)
        else:
            self._remote_disable(el, out)
        return el

    def _answered(self, el: Element, key: tuple[str, str], out: Outputs) -> None:
        target = self.state.targets.get(key)
        if target is None:
            return
        if el.get("type") != "error":
            target.errors = 0
            return
        condition = st.error_condition(el) or "undefined-condition"
        error = el.find(_ERROR)
        transient = error is not None and error.get("type") == "wait"
        target.errors += 1
        if transient and target.errors < self.factory.policy.max_errors:
            out.commands.append(Log("push_error", {"app_server": key[0], "node": key[1],
                                                   "condition": condition,
                                                   "errors": target.errors}, "warning"))
            return
        self.factory.disable(self.state, key[0], key[1], f"publish error: {condition}", out)

    def _remote_disable(self, el: Element, out: Outputs) -> None:
        """§8: the app server took our publishing right away (affiliation none)."""
        if not self.state.targets:
            return  # no registration to take away (and find() is a path search per call)
        pubsub = el.find(_PUBSUB)
        sender = el.get("from")
        if pubsub is None or sender is None:
            return
        node = pubsub.get("node")
        affiliation = pubsub.find(_AFFILIATION)
        if (node and affiliation is not None and affiliation.get("affiliation") == "none"
                and (sender, node) in self.state.targets):
            self.factory.disable(self.state, sender, node, "the app server removed it", out)

    # Triggers ------------------------------------------------------------------------------

    def client_detached(self, session: SessionCore, unacked: Sequence[Element],
                        out: Outputs) -> None:
        """The client is gone, the session hibernates: what it never acknowledged may
        never have been seen (a suspended phone's dead link)."""
        self.hibernating = True
        if not self.active:
            return
        counted = 0
        for el in unacked:
            if notable(el):
                counted += self._count(el)
        if counted:
            self._flush(session, out, usable=session.upstream_up)

    def client_attached(self, session: SessionCore, out: Outputs) -> None:
        self.hibernating = False

    def offline_stored(self, session: SessionCore, el: Element, upstream_usable: bool,
                       out: Outputs) -> None:
        """A stanza of this session went to the proxy's store for the account's next
        login. While the session ends from hibernation, its queue was counted already."""
        if not self.active or not notable(el) or (self.hibernating and not self.ended):
            return
        if self._count(el):
            self._flush(session, out, usable=upstream_usable)

    def timer_fired(self, session: SessionCore, name: str, out: Outputs) -> None:
        if name == TIMER and self.active:
            if self.state.timer_owner == session.id:
                self.state.timer_owner = None
            self._flush(session, out, usable=session.upstream_up)

    def upstream_restored(self, session: SessionCore, out: Outputs) -> None:
        if self.active and self.state.pending:
            self._flush(session, out, usable=True)

    def from_account(self, session: SessionCore, kind: str, payload: Element,
                     out: Outputs) -> None:
        if kind == FLUSH and self.active:
            self._flush(session, out, usable=session.upstream_up)

    def closed(self, session: SessionCore) -> None:
        self.ended = True
        self.factory.release(self.state, session.id)

    # Counting and publishing ---------------------------------------------------------------

    def _count(self, el: Element) -> int:
        """Count a message for every registration; 0 if it was counted already (the same
        message to the bare JID reaches each of the account's sessions)."""
        state = self.state
        if not state.targets:
            return 0
        sender, msg_id = el.get("from", ""), el.get("id")
        if msg_id:
            recent = state.recent
            if recent is None:
                recent = state.recent = deque(maxlen=RECENT_KEYS)
            elif (sender, msg_id) in recent:
                return 0
            recent.append((sender, msg_id))
        body = el.findtext(_BODY)
        for target in state.targets.values():
            target.count += 1
            target.sender = sender
            target.body = body
        return 1

    def _flush(self, session: SessionCore, out: Outputs, *, usable: bool) -> None:
        """Publish what is due; arm the account's timer for what must wait."""
        state, policy = self.state, self.factory.policy
        now = self.factory.clock()
        wait: float | None = None
        for key, target in state.targets.items():
            if not target.count:
                continue
            due = now if target.last_sent is None else target.last_sent + policy.min_interval
            if due > now:
                wait = due - now if wait is None else min(wait, due - now)
                continue
            if not usable:
                continue
            iq_id = session.new_id("push")
            if len(self._in_flight) >= MAX_IN_FLIGHT:  # answers that never came
                del self._in_flight[next(iter(self._in_flight))]
            self._in_flight[iq_id] = key
            out.commands.append(ToServerDirect(publish_iq(target, policy, str(session.jid),
                                                          iq_id)))
            out.commands.append(Log("push_published", {"app_server": key[0], "node": key[1],
                                                       "count": target.count}))
            target.count = 0
            target.last_sent = now
        if not any(t.count for t in state.targets.values()):
            return
        if self.ended:  # it can neither wait nor send much longer: another session may
            out.commands.append(ToAccount(FLUSH, st.element("flush", namespace=PUSH)))
            return
        if wait is not None and state.timer_owner in (None, session.id):
            state.timer_owner = session.id
            out.commands.append(StartTimer(TIMER, wait))
        # Due but no usable link (an outage): upstream_restored publishes it.


def _own(reply: Element, request: Element) -> Element:
    """An answer of the account's: from nobody when the request had no ``to``."""
    if request.get("to") is None:
        reply.attrib.pop("from", None)
    return reply


class PushFactory(FeatureFactory):
    def __init__(self, mode: FeatureMode, policy: PushPolicy,
                 registrations: RegistrationStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.policy = policy
        self.registrations = registrations if registrations is not None \
            else MemoryRegistrations()
        self.clock = clock
        self.accounts: dict[str, AccountPush] = {}

    def _emulated(self, server: ServerInfo) -> bool:
        return emulates(self.mode, server.account_has(PUSH))

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        if self._emulated(server):
            additions.account.add(PUSH)

    def create(self, session: SessionCore) -> Feature:
        account = str(session.account)
        state = self.accounts.get(account)
        if state is None:
            state = AccountPush(account)
            for reg in self.registrations.registrations(account):
                state.targets[reg.key] = Target(reg)
            self.accounts[account] = state
        state.sessions.add(session.id)
        return Push(self, state, self._emulated(session.server))

    def release(self, state: AccountPush, session_id: str) -> None:
        """A session closed; the account's state is forgotten with its last session (what
        it still counted has nobody to go through: see docs/push.md)."""
        state.sessions.discard(session_id)
        if state.timer_owner == session_id:
            state.timer_owner = None
        if not state.sessions and self.accounts.get(state.account) is state:
            del self.accounts[state.account]

    def enable(self, state: AccountPush, reg: Registration, out: Outputs) -> None:
        """§5: a new registration, or new publish options for a known one (the last
        request wins); beyond ``max_registrations`` the oldest is dropped."""
        known = state.targets.pop(reg.key, None)
        state.targets[reg.key] = Target(reg) if known is None else Target(
            reg, known.count, known.sender, known.body, known.last_sent)
        self.registrations.save(state.account, reg)
        out.commands.append(Log("push_enabled", {"app_server": reg.jid, "node": reg.node,
                                                 "renewed": known is not None}))
        while len(state.targets) > max(1, self.policy.max_registrations):
            oldest = next(iter(state.targets))
            self.disable(state, oldest[0], oldest[1], "max_registrations reached", out)

    def disable(self, state: AccountPush, jid: str, node: str | None, why: str,
                out: Outputs) -> None:
        """§6: one node of an app server, or all of its nodes (no ``node``)."""
        gone = [k for k in state.targets if k[0] == jid and (node is None or k[1] == node)]
        for key in gone:
            del state.targets[key]
        self.registrations.delete(state.account, jid, node)
        if gone:
            out.commands.append(Log("push_disabled", {"app_server": jid, "node": node,
                                                      "removed": len(gone), "why": why}))
