"""Roster versioning (RFC 6121 §2.6), subscription pre-approval (§3.4) and roster-set checks
(§2.3.3) in front of a legacy server that has none of them.

Sans-IO. ``RosterFactory`` is made once (it holds the store and the state shared by all
sessions of an account); ``RosterFactory.create`` gives each session a ``RosterFeature``.
See ``docs/roster.md`` for the behaviour, the decisions on RFC ambiguities and the wiring.

In short:

- The account's ``proxy.store.RosterBook`` is the cache shared by all sessions of an account:
  items, version, change log, pre-approvals, loaded from the store when its first session
  starts and read in memory; its writes go to the store's writer (off the event loop). Every
  change of an item (a server push, a difference found in a full roster, a pre-approval set
  or cleared) gets a new version.
- Each session keeps its upstream an *interested resource* (RFC 6121 §2.2) with a roster get
  of its own at its first stanza, so every roster push reaches the proxy in order and the
  cache stays current. The first full roster after start-up, after an upstream reconnect, or
  when no other session is keeping the account current, is diffed against the cache.
- Each session also knows up to which version its client is synchronised (``_client_seq``)
  and pushes it every change past that, in order of change, each with its ``ver``.
- Several sessions of one account each receive the same server pushes on their own upstream
  streams, in the same order. A per-account journal of recent upstream pushes and a cursor
  per session tell a push already applied by another session (an echo) from a new one, so a
  session lagging behind never rolls the cache back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field
from typing import TypeAlias

from lxml import etree

from ..commands import CatchUp
from ..fewsets import EMPTY, added, removed
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..store import (DEFAULT_MAX_CHANGES, RosterBook, RosterItem, RosterVersion, Store,
                     same_item)
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.jid import bare_of

Element: TypeAlias = etree._Element

QUERY = ns.qname(ns.ROSTER, "query")
ITEM = ns.qname(ns.ROSTER, "item")
GROUP = ns.qname(ns.ROSTER, "group")

DEFAULT_JOURNAL_LIMIT = 1000
_APPROVING = ("from", "both")  # subscription states in which the contact already has ours


# ---------------------------------------------------------------------- item helpers


def parse_item(el: Element) -> tuple[str, RosterItem | None] | None:
    """``(jid, item)`` from an ``<item/>``; item None for ``subscription='remove'``; None
    without a jid. ``approved`` from the server is ignored: the proxy's own record rules."""
    jid = el.get("jid")
    if not jid:
        return None
    subscription = el.get("subscription") or "none"
    if subscription == "remove":
        return jid, None
    groups = tuple(g.text or "" for g in el.findall(GROUP))
    return jid, RosterItem(jid, el.get("name"), subscription, el.get("ask"), groups)


def item_element(jid: str, item: RosterItem | None, *, approved: bool = False) -> Element:
    """The ``<item/>`` shown to a client (``subscription='remove'`` when there is none)."""
    el = st.element("item", {"jid": jid}, namespace=ns.ROSTER)
    if item is None:
        el.set("subscription", "remove")
        return el
    if item.name is not None:
        el.set("name", item.name)
    el.set("subscription", item.subscription)
    if item.ask is not None:
        el.set("ask", item.ask)
    if approved:
        el.set("approved", "true")
    for group in item.groups:
        st.sub(el, "group", text=group)
    return el


def check_roster_set(query: Element) -> str | None:
    """The stanza error condition a client roster set deserves (RFC 6121 §2.3.3), or None.

    ``bad-request``: not exactly one item (§2.1.5: one and only one), or two groups with the
    same character data. ``not-acceptable``: a group of zero length (checked first)."""
    items = query.findall(ITEM)
    if len(items) != 1:
        return "bad-request"
    groups = [g.text or "" for g in items[0].findall(GROUP)]
    if any(g == "" for g in groups):
        return "not-acceptable"
    if len(set(groups)) != len(groups):
        return "bad-request"
    return None


def _roster_query(el: Element) -> Element | None:
    return el.find(QUERY) if el.tag == st.IQ else None


# ---------------------------------------------------------------------- shared state


@dataclass
class _Fetch:
    """A full roster get of the proxy's own, in flight on one session's upstream."""

    ids: set[str]
    held_gets: list[Element] = field(default_factory=list)    # client gets to answer after
    held_pushes: list[Element] = field(default_factory=list)  # server pushes to apply after


class _Account:
    """What all sessions of one account share in memory (the rest is in the store)."""

    def __init__(self, name: str, store: Store, journal_limit: int) -> None:
        self.name = name
        # The account's cache, loaded once here (a session's login); reads are in memory,
        # writes go to the store's writer (off the event loop for a file).
        self.book: RosterBook = store.roster.open(name)
        self.version: RosterVersion = self.book.version
        self.preapproved: Set[str] = self.book.preapprovals() or EMPTY
        # True while some session's full roster was applied and pushes have been followed
        # since: gets are answered from the store without waiting for the server.
        self.fresh = False
        # Contacts whose subscription request was delivered to the user and not answered.
        self.pending_in: Set[str] = EMPTY
        self.sessions: dict[str, RosterFeature] = {}
        # Recent server pushes (event number, jid, state) seen on any session's upstream.
        self.journal: list[tuple[int, str, RosterItem | None]] = []
        self.next_event = 1
        self.journal_limit = journal_limit

    def ver(self, seq: int) -> str:
        return str(RosterVersion(self.version.epoch, seq, self.version.floor))

    def trim_journal(self) -> None:
        cursors = [f.cursor for f in self.sessions.values() if f.tracking]
        if not cursors:
            self.journal.clear()
            return
        low = min(cursors)
        drop = 0
        while drop < len(self.journal) and self.journal[drop][0] <= low:
            drop += 1
        drop = max(drop, len(self.journal) - self.journal_limit)
        if drop > 0:
            del self.journal[:drop]


class RosterFactory(FeatureFactory):
    """Made once at start-up; shared by all sessions (several resources of one account share
    one cache).

    When a session changes the cache so that another session's client falls behind, the
    changing session's output carries a ``CatchUp`` command for that other session; the shell
    then soon asks it for its pushes (``Feature.catch_up``). Without that, a session catches
    up at its next stanza either way.
    """

    def __init__(self, store: Store, *, max_changes: int = DEFAULT_MAX_CHANGES,
                 journal_limit: int = DEFAULT_JOURNAL_LIMIT) -> None:
        if max_changes < 0:
            raise ValueError("max_changes must be >= 0")
        self.store = store
        self.max_changes = max_changes
        self.journal_limit = journal_limit
        self._accounts: dict[str, _Account] = {}

    def stream_features(self) -> list[Element]:
        """``<ver/>`` (RFC 6121 §2.6.1) and ``<sub/>`` (§3.4.1), for the post-authentication
        features, which are offered before any session exists (the hub asks factories)."""
        return [st.element("ver", namespace=ns.ROSTER_VER),
                st.element("sub", namespace=ns.PRE_APPROVAL)]

    def create(self, session: SessionCore) -> RosterFeature:
        name = str(session.account)
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account(name, self.store, self.journal_limit)
        feature = RosterFeature(self, acct, session)
        acct.sessions[session.id] = feature
        return feature

    def account_fresh(self, account: str) -> bool:
        """For tests and metrics: whether gets of ``account`` are answered from the cache."""
        acct = self._accounts.get(account)
        return bool(acct and acct.fresh)

    def _release(self, acct: _Account, feature: RosterFeature) -> None:
        acct.sessions.pop(feature.session_id, None)
        if not acct.sessions:
            self._accounts.pop(acct.name, None)
            self.store.roster.release(acct.name)
            return
        if not any(f.tracking for f in acct.sessions.values()):
            acct.fresh = False
        acct.trim_journal()

    def _changed(self, acct: _Account, by: RosterFeature) -> None:
        """The cache moved on: the other sessions whose clients are behind are woken by the
        changing session's output (``CatchUp``)."""
        for feature in list(acct.sessions.values()):
            if feature is not by and feature.behind() and feature.session_id not in by.wake:
                by.wake.append(feature.session_id)


# ---------------------------------------------------------------------- the feature


class RosterFeature(Feature):
    """One session's share of roster versioning and pre-approval."""

    __slots__ = (
        "_acct", "_client_seq", "_factory", "_fetch", "_fetch_refused", "_interested_upstream",
        "_jid", "_own_ids", "_own_push_ids", "_swallow_subscribe", "cursor", "session",
        "session_id", "wake",
    )

    def __init__(self, factory: RosterFactory, acct: _Account, session: SessionCore) -> None:
        self._factory = factory
        self._acct = acct
        self.session = session
        self.session_id = session.id
        self._jid = str(session.jid)
        # The version this session's client is synchronised to; None until it asks for the
        # roster (RFC 6121 §2.2: only interested resources get pushes).
        self._client_seq: int | None = None
        # This session's upstream answered a roster get: the server pushes to it.
        self._interested_upstream = False
        self._fetch: _Fetch | None = None
        self._fetch_refused = False  # the server refused our get: no retry until a reconnect
        self._own_ids: dict[str, str] = {}  # id of a request of ours upstream -> purpose
        self._own_push_ids: Set[str] = EMPTY  # pushes of ours to the client: swallow replies
        self._swallow_subscribe: Set[str] = EMPTY  # approved on our behalf by another session
        self.cursor = 0  # the last journal event this session's upstream has delivered
        self.wake: list[str] = []  # other sessions this one's changes left behind

    # -------------------------------------------------------------- Feature hooks

    def stream_features(self) -> Iterable[Element]:
        return self._factory.stream_features()

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        self._ensure_interest(session, out)
        result = self._from_client(session, el, out)
        self.sync(session, out)
        self._wake_others(out)
        return result

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        result = self._from_upstream(session, el, out)
        self._ensure_interest(session, out)
        self.sync(session, out)
        self._wake_others(out)
        return result

    def catch_up(self, session: SessionCore, out: Outputs) -> None:
        self.sync(session, out)

    def _wake_others(self, out: Outputs) -> None:
        if self.wake:
            out.commands.extend(CatchUp(session_id) for session_id in self.wake)
            self.wake.clear()

    def upstream_restored(self, session: SessionCore, out: Outputs) -> None:
        # Pushes may have been missed while the link was down: whoever fetches next diffs.
        self._acct.fresh = False
        self._interested_upstream = False
        self._fetch_refused = False
        self._swallow_subscribe = EMPTY
        if self._fetch is None:
            self._fetch = _Fetch(set())
        else:
            # Pushes held from the old connection predate the coming full roster: into the
            # cache now (the diff corrects them), never after it.
            held, self._fetch.held_pushes = self._fetch.held_pushes, []
            for push in held:
                query = push.find(QUERY)
                parsed = [p for p in (parse_item(i) for i in query.findall(ITEM))
                          if p is not None] if query is not None else []
                self._apply_push(parsed)
        self.cursor = self._acct.next_event - 1
        self._send_fetch(session, out)
        self._wake_others(out)

    def closed(self, session: SessionCore) -> None:
        self._factory._release(self._acct, self)

    # -------------------------------------------------------------- state for the factory

    @property
    def tracking(self) -> bool:
        """Whether this session's upstream receives (or is about to receive) server pushes."""
        return self._interested_upstream or self._fetch is not None

    def behind(self) -> bool:
        return self._client_seq is not None and self._client_seq < self._acct.version.seq

    # -------------------------------------------------------------- client side

    def _from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag == st.IQ:
            typ = el.get("type")
            if typ in ("result", "error") and el.get("id") in self._own_push_ids:
                self._own_push_ids = removed(self._own_push_ids, el.get("id", ""))
                return None  # the client's answer to a push of ours: not the server's business
            query = _roster_query(el)
            if query is None or not self._own_roster(el.get("to")):
                return el
            if typ == "get":
                self._client_get(session, el, out)
                return None
            if typ == "set":
                condition = check_roster_set(query)
                if condition is not None:
                    out.to_client.append(st.error_reply(el, condition))
                    return None
            return el
        if el.tag == st.PRESENCE:
            typ = el.get("type")
            if typ == "subscribed":
                return self._client_subscribed(session, el, out)
            if typ == "unsubscribed":
                return self._client_unsubscribed(session, el, out)
        return el

    def _own_roster(self, to: str | None) -> bool:
        return to is None or bare_of(to) == self._acct.name

    def _client_get(self, session: SessionCore, req: Element, out: Outputs) -> None:
        if self._acct.fresh:
            self._answer_get(session, req, out)
            return
        if self._fetch is None:
            self._fetch = _Fetch(set())
            self._send_fetch(session, out)
        self._fetch.held_gets.append(req)

    def _answer_get(self, session: SessionCore, req: Element, out: Outputs) -> None:
        """RFC 6121 §2.6.3, from the cache: the current version → an empty result; an older
        version the change log reaches → an empty result, then one push per changed item in
        its final state, in order of change; anything else → the full roster with ``ver``."""
        acct = self._acct
        version = acct.version
        query = req.find(QUERY)
        ver = query.get("ver") if query is not None else None
        known = version.known(ver)
        changes = (self._acct.book.changes_since(known)
                   if known is not None else None)
        if changes is not None:
            out.to_client.append(st.iq_result(req))
            for seq, jid in changes:
                out.to_client.append(self._own_push(jid, seq))
        else:
            payload = st.element("query", {"ver": str(version)}, namespace=ns.ROSTER)
            for item in self._acct.book.items():
                payload.append(self._view(item.jid, item))
            out.to_client.append(st.iq_result(req, payload))
        self._client_seq = version.seq

    def _client_subscribed(self, session: SessionCore, el: Element,
                           out: Outputs) -> Element | None:
        """RFC 6121 §3.4.2 (and §3.1.5 when a request is pending)."""
        acct = self._acct
        contact = bare_of(el.get("to"))
        if contact is None or contact == acct.name:
            return el
        if contact in acct.pending_in:
            acct.pending_in = removed(acct.pending_in, contact)  # the server does the rest
            return el
        item = self._acct.book.item(contact)
        if item is not None and item.subscription in _APPROVING:
            return el  # nothing to pre-approve; the server ignores or re-confirms it
        if self._acct.book.add_preapproval(contact):
            acct.preapproved = added(acct.preapproved, contact)
            if item is None:
                # §3.4.2: the item is created (state None) so the approval has a home and
                # survives; the server's push for it comes back with approved='true'.
                rid = session.new_id("roster-preapprove")
                self._own_ids[rid] = "set"
                iq = st.element("iq", {"type": "set", "id": rid, "from": self._jid})
                query = st.sub(iq, "query", namespace=ns.ROSTER)
                query.append(st.element("item", {"jid": contact}, namespace=ns.ROSTER))
                out.to_upstream.append(iq)
            else:
                self._touch(contact)
        return None  # never forwarded: a legacy server would drop or misapply it

    def _client_unsubscribed(self, session: SessionCore, el: Element,
                             out: Outputs) -> Element | None:
        """RFC 6121 §3.2.2: cancelling a pre-approval is not routed to the contact."""
        acct = self._acct
        contact = bare_of(el.get("to"))
        if contact is None:
            return el
        pending = contact in acct.pending_in
        acct.pending_in = removed(acct.pending_in, contact)
        if contact not in acct.preapproved:
            return el
        self._acct.book.remove_preapproval(contact)
        acct.preapproved = removed(acct.preapproved, contact)
        self._touch(contact)
        item = self._acct.book.item(contact)
        if pending or (item is not None and item.subscription in _APPROVING):
            return el  # also a real denial or cancellation: the server must see it
        return None

    # -------------------------------------------------------------- server side

    def _from_upstream(self, session: SessionCore, el: Element,
                       out: Outputs) -> Element | None:
        if el.tag == st.IQ:
            rid = el.get("id")
            typ = el.get("type")
            if typ in ("result", "error") and rid is not None and rid in self._own_ids:
                purpose = self._own_ids.pop(rid)
                if purpose == "fetch" and self._fetch is not None and rid in self._fetch.ids:
                    self._fetch_done(session, el, out)
                return None  # replies to the proxy's own requests never reach the client
            query = _roster_query(el)
            if (typ == "set" and query is not None
                    and el.get("from") in (None, "", self._acct.name)):
                return self._server_push(session, el, query, out)
            return el
        if el.tag == st.PRESENCE:
            typ = el.get("type")
            if typ == "subscribe":
                return self._server_subscribe(session, el, out)
            if typ == "unsubscribe":
                contact = bare_of(el.get("from"))
                if contact is not None:
                    acct = self._acct  # the contact withdrew its request
                    acct.pending_in = removed(acct.pending_in, contact)
        return el

    def _server_push(self, session: SessionCore, el: Element, query: Element,
                     out: Outputs) -> Element | None:
        """RFC 6121 §2.1.6 with §2.6: update the cache, then the client gets the push with
        ``ver`` (the server's id kept: the client's answer goes upstream unchanged)."""
        parsed = [p for p in (parse_item(i) for i in query.findall(ITEM)) if p is not None]
        if not parsed:
            return el  # not a push we understand: relay as is
        if self._fetch is not None:
            self._fetch.held_pushes.append(el)  # applied after the full roster, not lost
            return None
        self._apply_push(parsed)
        self._emit(session, out, push=el, pushed=[jid for jid, _ in parsed])
        return None

    def _apply_push(self, parsed: list[tuple[str, RosterItem | None]]) -> None:
        acct = self._acct
        changed = False
        for jid, state in parsed:
            contact = bare_of(jid) or jid
            self._swallow_subscribe = removed(self._swallow_subscribe, contact)
            if state is None or state.subscription in _APPROVING:
                acct.pending_in = removed(acct.pending_in, contact)
            if self._echo(jid, state):
                continue
            before = acct.version.seq
            acct.version = acct.book.update(
                [(jid, state)], max_changes=self._factory.max_changes)
            if state is None and contact in acct.preapproved:
                # The approved flag lives on the item (§2.1.2.1): removing it removes both.
                self._acct.book.remove_preapproval(contact)
                acct.preapproved = removed(acct.preapproved, contact)
            changed = changed or acct.version.seq != before
            acct.journal.append((acct.next_event, jid, state))
            self.cursor = acct.next_event
            acct.next_event += 1
        acct.trim_journal()
        if changed:
            self._factory._changed(acct, self)

    def _echo(self, jid: str, state: RosterItem | None) -> bool:
        """Whether another session already applied this push (same jid and state, delivered
        on its upstream after this session's cursor): then it is not applied twice."""
        for event, ejid, estate in self._acct.journal:
            if event > self.cursor and ejid == jid and same_item(estate, state):
                self.cursor = event
                return True
        return False

    def _server_subscribe(self, session: SessionCore, el: Element,
                          out: Outputs) -> Element | None:
        """RFC 6121 §3.1.3 with §3.4: a pre-approved contact is approved on the user's
        behalf and the request never reaches the client."""
        acct = self._acct
        contact = bare_of(el.get("from"))
        if contact is None or contact == acct.name:
            return el
        if contact in self._swallow_subscribe:
            # another session approved it already
            self._swallow_subscribe = removed(self._swallow_subscribe, contact)
            return None
        if contact not in acct.preapproved:
            acct.pending_in = added(acct.pending_in, contact)
            return el
        out.to_upstream.append(st.element(
            "presence", {"type": "subscribed", "to": contact, "from": self._jid}))
        self._acct.book.remove_preapproval(contact)
        acct.preapproved = removed(acct.preapproved, contact)
        for other in acct.sessions.values():
            if other is not self:
                # its copy of this request, if any
                other._swallow_subscribe = added(other._swallow_subscribe, contact)
        self._touch(contact)
        return None

    # -------------------------------------------------------------- fetching

    def _ensure_interest(self, session: SessionCore, out: Outputs) -> None:
        """At a session's first stanza: a roster get of our own, so the server treats the
        upstream as an interested resource and pushes every change to it."""
        if not self._interested_upstream and self._fetch is None and not self._fetch_refused:
            self._fetch = _Fetch(set())
            self._send_fetch(session, out)

    def _send_fetch(self, session: SessionCore, out: Outputs) -> None:
        assert self._fetch is not None
        if not self._fetch.ids:
            self.cursor = self._acct.next_event - 1
        rid = session.new_id("roster")
        self._fetch.ids.add(rid)
        self._own_ids[rid] = "fetch"
        iq = st.element("iq", {"type": "get", "id": rid, "from": self._jid})
        st.sub(iq, "query", namespace=ns.ROSTER)  # never a 'ver': the full roster
        out.to_upstream.append(iq)

    def _fetch_done(self, session: SessionCore, el: Element, out: Outputs) -> None:
        fetch = self._fetch
        assert fetch is not None
        self._fetch = None  # a late answer to a twin get (after a reconnect) is swallowed
        acct = self._acct
        query = el.find(QUERY)
        if el.get("type") == "error" or query is None:
            self._fetch_refused = True
            condition = st.error_condition(el) or "service-unavailable"
            err = el.find(ns.qname(ns.CLIENT, "error"))
            for req in fetch.held_gets:
                out.to_client.append(st.error_reply(
                    req, condition, error_type=err.get("type") if err is not None else None))
            for push in fetch.held_pushes:
                self._server_push(session, push, push.find(QUERY), out)
            acct.trim_journal()
            return
        self._interested_upstream = True
        if not acct.fresh:
            items = [p[1] for p in (parse_item(i) for i in query.findall(ITEM))
                     if p is not None and p[1] is not None]
            before = acct.version.seq
            acct.version = acct.book.replace(
                items, max_changes=self._factory.max_changes)
            acct.fresh = True
            if acct.version.seq != before:
                self._factory._changed(acct, self)
        for req in fetch.held_gets:
            self._answer_get(session, req, out)
        for push in fetch.held_pushes:
            self._server_push(session, push, push.find(QUERY), out)
        acct.trim_journal()

    # -------------------------------------------------------------- pushes to the client

    def sync(self, session: SessionCore, out: Outputs) -> None:
        """Push the client every change past its version (changes made by other sessions or
        by the proxy itself)."""
        if self.behind():
            self._emit(session, out)

    def _emit(self, session: SessionCore, out: Outputs, *, push: Element | None = None,
              pushed: list[str] | None = None) -> None:
        """Bring the client to the current version, in order of change. A server ``push``
        goes out (with its id) at the place of its items' change; if the client already has
        them, the proxy answers the server itself and the client is spared a duplicate."""
        acct = self._acct
        if self._client_seq is None:
            if push is not None:
                self._answer_push(push, out)
            return
        current = acct.version.seq
        changes: list[tuple[int, str]] = []
        if self._client_seq < current:
            since = self._acct.book.changes_since(self._client_seq)
            if since is None:  # the log no longer reaches back: everything, at the end
                jids = [it.jid for it in self._acct.book.items()]
                jids += [j for j in pushed or () if j not in jids]
                since = [(current, j) for j in jids]
            changes = since
        in_push = set(pushed or ())
        at = max((seq for seq, jid in changes if jid in in_push), default=None)
        if push is not None and at is None:
            self._answer_push(push, out)
            push = None
        for seq, jid in changes:
            if jid in in_push:
                continue
            if push is not None and at is not None and seq > at:
                out.to_client.append(self._server_push_view(push, pushed or [], at))
                push = None
            out.to_client.append(self._own_push(jid, seq))
        if push is not None and at is not None:
            out.to_client.append(self._server_push_view(push, pushed or [], at))
        self._client_seq = max(self._client_seq, current)

    def _answer_push(self, push: Element, out: Outputs) -> None:
        reply = st.element("iq", {"type": "result", "from": self._jid})
        if push.get("id") is not None:
            reply.set("id", push.get("id", ""))
        if push.get("from"):
            reply.set("to", push.get("from", ""))
        out.to_upstream.append(reply)

    def _own_push(self, jid: str, seq: int) -> Element:
        pid = self.session.new_id("roster-push")
        self._own_push_ids = added(self._own_push_ids, pid)
        iq = st.element("iq", {"type": "set", "id": pid, "to": self._jid})
        query = st.sub(iq, "query", {"ver": self._acct.ver(seq)}, namespace=ns.ROSTER)
        query.append(self._view(jid, self._acct.book.item(jid)))
        return iq

    def _server_push_view(self, push: Element, jids: list[str], seq: int) -> Element:
        iq = st.element("iq", dict(push.attrib))
        query = st.sub(iq, "query", {"ver": self._acct.ver(seq)}, namespace=ns.ROSTER)
        for jid in _unique(jids):
            query.append(self._view(jid, self._acct.book.item(jid)))
        return iq

    def _view(self, jid: str, item: RosterItem | None) -> Element:
        return item_element(jid, item,
                            approved=(bare_of(jid) or jid) in self._acct.preapproved)

    def _touch(self, contact: str) -> None:
        """The approved flag of ``contact`` changed: a new version for its item."""
        acct = self._acct
        item = self._acct.book.item(contact)
        if item is None:
            return
        acct.version = self._acct.book.touch([item.jid],
                                                max_changes=self._factory.max_changes)
        self._factory._changed(acct, self)


def _unique(jids: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for jid in jids:
        if jid not in seen:
            seen.add(jid)
            yield jid


__all__ = ["RosterFactory", "RosterFeature", "check_roster_set", "item_element", "parse_item"]
