"""XEP-0191 blocking command, for a server that lacks it. Sans-IO.

When ``features.blocking`` says the proxy provides it (``emulates``), the proxy answers the
blocking iqs itself (never passed on) and applies the blocklist to the stanzas of the
account's sessions through it:

- the blocklist is per account, in the store (``store.blocklist``), read once when the
  account's first session starts and kept in memory, shared by its sessions (each stanza is
  checked against that set; a block or an unblock hands its rows to the store's writer
  thread, so the event loop never waits for SQLite);
- ``<blocklist/>`` gets: the list; the session then gets pushes (§3.3: only resources that
  requested the list);
- ``<block/>``, ``<unblock/>`` (empty: unblock all) sets: in force at once, stored, then
  answered and pushed to every interested session of the account, the asking one included,
  once the store's writer committed the change (``WhenStored``; a failed commit answers
  ``internal-server-error``, type wait, and pushes nothing); a block sends unavailable
  presence from each available session to the contacts it hides from (those the roster says
  may see the user's presence), an unblock sends them the session's current presence;
- §3.3 inbound: from a blocked JID, presence is dropped, a message (normal or chat) and an
  iq get or set are answered ``service-unavailable``, anything else dropped;
- outbound: to a blocked JID, refused with ``not-acceptable`` and ``<blocked/>``
  (``urn:xmpp:blocking:errors``); an error or an iq result is dropped (errors are never
  answered with errors);
- JID matching (§3.2, as XEP-0016): the full JID, the bare JID, the domain, and the domain's
  parents (blocking a domain blocks its subdomains).

Limits: the legacy server knows nothing of the list. It still fans out the user's later
presence broadcasts to a blocked contact who has a subscription, answers that contact's
probes, and delivers to the account's sessions that do not go through the proxy.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Collection, Iterable, Set

from ..commands import Log, ToAccount, WhenStored
from ..config import FeatureMode, emulates
from ..fewsets import EMPTY, added, removed
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..store import Store
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from ..xmpp.disco import Additions, ServerInfo
from ..xmpp.jid import InvalidJid, Jid
from ..xmpp.stanza import Element

BLOCKING = "urn:xmpp:blocking"
BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
DEFAULT_MAX_ITEMS = 1000
_BLOCKLIST = ns.qname(BLOCKING, "blocklist")
_BLOCK = ns.qname(BLOCKING, "block")
_UNBLOCK = ns.qname(BLOCKING, "unblock")
_ITEM = ns.qname(BLOCKING, "item")
_PAYLOADS = (_BLOCKLIST, _BLOCK, _UNBLOCK)
PUSH = "blocking-push"          # ToAccount kinds: a push for interested sessions,
PRESENCE = "blocking-presence"  # and the contacts to hide from or show to again
_TARGETS = "{urn:xmpp-front:internal}targets"
MAX_PUSHES_AWAITED = 64
MAX_ANSWERED = 256


def normalize(text: str) -> str:
    """A blocklist item as stored and compared (raises InvalidJid)."""
    return str(Jid.parse(text))


def is_blocked(items: Collection[str], address: str | None) -> bool:
    """Whether ``address`` matches an item (§3.2): itself, its bare JID, its domain or a
    parent domain. Malformed addresses never match."""
    if not items or not address:
        return False
    try:
        jid = Jid.parse(address)
    except InvalidJid:
        return False
    if str(jid) in items or str(jid.bare) in items:
        return True
    domain = jid.domain
    while True:
        if domain in items:
            return True
        dot = domain.find(".")
        if dot < 0:
            return False
        domain = domain[dot + 1:]


def _item_matches(item: str, address: str) -> bool:
    return is_blocked((item,), address)


class _Account:
    """What the sessions of one account share: the blocklist in memory."""

    def __init__(self, name: str, blocked: set[str]) -> None:
        self.name = name
        self.blocked = blocked
        self.sessions: dict[str, Blocking] = {}
        # (sender, id) of the blocked stanzas answered lately: a message to the bare JID
        # the server gave to several sessions is answered once, not once per session.
        self.answered: OrderedDict[tuple[str, str], None] = OrderedDict()

    def first_answer(self, el: Element) -> bool:
        if not el.get("id"):
            return True
        key = (el.get("from", ""), el.get("id", ""))
        if key in self.answered:
            return False
        self.answered[key] = None
        while len(self.answered) > MAX_ANSWERED:
            self.answered.popitem(last=False)
        return True


class BlockingFactory(FeatureFactory):
    def __init__(self, store: Store, mode: FeatureMode = "auto",
                 max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.store = store
        self.mode = mode
        self.max_items = max_items
        self._accounts: dict[str, _Account] = {}

    def emulated(self, server: ServerInfo) -> bool:
        return emulates(self.mode, server.domain_has(BLOCKING))

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        if self.emulated(server):
            additions.domain.add(BLOCKING)

    def create(self, session: SessionCore) -> Feature:
        if not self.emulated(session.server):
            return Feature()  # the server's own (or none): everything passes through
        name = str(session.account)
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account(name, self.store.blocklist.items(name))
        feature = Blocking(self, acct, session)
        acct.sessions[session.id] = feature
        return feature

    def blocked(self, account: str) -> set[str] | None:
        """For tests and metrics: the in-memory list of a logged-in account."""
        acct = self._accounts.get(account)
        return None if acct is None else set(acct.blocked)

    def _release(self, acct: _Account, session_id: str) -> None:
        acct.sessions.pop(session_id, None)
        if not acct.sessions:
            self._accounts.pop(acct.name, None)

    def _roster_watchers(self, account: str) -> list[str] | None:
        """The roster contacts allowed to see the account's presence (subscription from or
        both), or None when the roster is not cached."""
        roster = self.store.roster
        if not roster.populated(account):
            return None
        return [it.jid for it in roster.items(account) if it.subscription in ("from", "both")]


class Blocking(Feature):
    def __init__(self, factory: BlockingFactory, acct: _Account, session: SessionCore) -> None:
        self._factory = factory
        self._acct = acct
        self.session_id = session.id
        self._account = str(session.account)
        self._domain = session.account.domain
        self.interested = False  # asked for the list: gets pushes
        self._presence: Element | None = None  # the client's current broadcast presence
        self._pushes: Set[str] = EMPTY  # ids of pushes awaiting the client's answer

    # ------------------------------------------------------------------ from the client

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag == st.IQ:
            kind = el.get("type")
            if kind in ("result", "error") and el.get("id") in self._pushes:
                self._pushes = removed(self._pushes, el.get("id", ""))
                return None  # the answer to a push of ours
            if len(el) == 1 and el[0].tag in _PAYLOADS and self._for_server(el):
                self._command(session, el, out)
                return None
        elif el.tag == st.PRESENCE and el.get("to") is None:
            kind = el.get("type")
            if kind is None:
                self._presence = codec.detached(el)  # kept long: no parser behind it
            elif kind == "unavailable":
                self._presence = None
        to = el.get("to")
        if to is not None and is_blocked(self._acct.blocked, to):
            self._refuse(el, out)
            return None
        return el

    def _for_server(self, el: Element) -> bool:
        to = el.get("to")
        return to is None or to in (self._account, self._domain)

    def _refuse(self, el: Element, out: Outputs) -> None:
        kind = el.get("type")
        if kind == "error" or (el.tag == st.IQ and kind == "result"):
            out.commands.append(Log("blocked_outbound_dropped",
                                    {"kind": st.kind(el), "to": el.get("to")}, "debug"))
            return
        # From the contact, as if it refused (addresses swapped), with the reason.
        reply = st.error_reply(el, "not-acceptable", text="You have blocked this JID")
        error = reply.find(ns.qname(ns.CLIENT, "error"))
        if error is not None:
            st.sub(error, "blocked", namespace=BLOCKING_ERRORS)
        out.to_client.append(reply)
        out.commands.append(Log("blocked_outbound_refused",
                                {"kind": st.kind(el), "to": el.get("to")}, "debug"))

    def _command(self, session: SessionCore, el: Element, out: Outputs) -> None:
        payload = el[0]
        kind = el.get("type")
        if payload.tag == _BLOCKLIST:
            if kind != "get":
                out.to_client.append(st.error_reply(el, "bad-request"))
                return
            answer = st.element("blocklist", namespace=BLOCKING)
            for jid in sorted(self._acct.blocked):
                st.sub(answer, "item", {"jid": jid})
            self.interested = True
            out.to_client.append(st.iq_result(el, answer))
            return
        if kind != "set":
            out.to_client.append(st.error_reply(el, "bad-request"))
            return
        try:
            jids = [normalize(item.get("jid", "")) for item in payload.iter(_ITEM)]
        except InvalidJid:
            out.to_client.append(st.error_reply(el, "jid-malformed"))
            return
        if payload.tag == _BLOCK:
            self._block(session, el, jids, out)
        else:
            self._unblock(session, el, jids, out)

    def _block(self, session: SessionCore, el: Element, jids: list[str], out: Outputs) -> None:
        acct, factory = self._acct, self._factory
        if not jids:  # §3.3: at least one item
            out.to_client.append(st.error_reply(el, "bad-request"))
            return
        new = [j for j in dict.fromkeys(jids) if j not in acct.blocked]
        if len(acct.blocked) + len(new) > factory.max_items:
            out.to_client.append(st.error_reply(
                el, "policy-violation", text=f"at most {factory.max_items} blocked JIDs"))
            return
        if new:
            factory.store.blocklist.add(acct.name, new)
        hidden_from = self._watchers(new)
        acct.blocked.update(new)
        out.commands.append(Log("blocklist_changed", {"blocked": len(new),
                                                      "items": len(acct.blocked)}))
        self._reply_when_stored(session, el, "block", dict.fromkeys(jids), out)
        self._presence_change("block", hidden_from, out)

    def _unblock(self, session: SessionCore, el: Element, jids: list[str],
                 out: Outputs) -> None:
        acct = self._acct
        before = set(acct.blocked)
        if jids:
            gone = [j for j in dict.fromkeys(jids) if j in acct.blocked]
            if gone:
                self._factory.store.blocklist.remove(acct.name, gone)
            acct.blocked.difference_update(gone)
        else:  # an empty <unblock/>: everything
            self._factory.store.blocklist.clear(acct.name)
            acct.blocked.clear()
        shown_to = [c for c in self._watchers(list(before - acct.blocked))
                    if not is_blocked(acct.blocked, c)]
        out.commands.append(Log("blocklist_changed", {"unblocked": len(before) - len(acct.blocked),
                                                      "items": len(acct.blocked)}))
        self._reply_when_stored(session, el, "unblock", dict.fromkeys(jids), out)
        self._presence_change("unblock", shown_to, out)

    def _watchers(self, items: list[str]) -> list[str]:
        """The contacts allowed to see the user's presence that ``items`` match (when the
        roster is not cached: the items that are user JIDs themselves)."""
        if not items:
            return []
        watchers = self._factory._roster_watchers(self._acct.name)
        if watchers is None:
            return [j for j in items if "@" in j]
        return [c for c in watchers if any(_item_matches(i, c) for i in items)]

    def _reply_when_stored(self, session: SessionCore, el: Element, action: str,
                           jids: Iterable[str], out: Outputs) -> None:
        """The result, then (§3.3) the pushes to the interested sessions (this one
        included), once the store's writer committed the change (and every write before
        it: a repeated block waits for the first one's); if the commit fails, an error
        instead and no push. The change is in force at once either way (see im.md)."""
        push = st.element(action, namespace=BLOCKING)
        for jid in jids:
            st.sub(push, "item", {"jid": jid})
        then = Outputs()
        then.to_client.append(st.iq_result(el))
        self.deliver_push(session, push, then)
        then.commands.append(ToAccount(PUSH, push))
        failed = Outputs()
        failed.to_client.append(st.error_reply(
            el, "internal-server-error", error_type="wait",
            text="The blocklist could not be stored; try again"))
        failed.commands.append(Log("blocklist_not_stored", {"action": action}, "error"))
        out.commands.append(WhenStored(then, failed))

    def _presence_change(self, action: str, contacts: list[str], out: Outputs) -> None:
        """The presence that follows a change, from this session and, through
        ``ToAccount``, the others (at once: the change is in force)."""
        if contacts:
            targets = st.element("targets", {"action": action},
                                 namespace="urn:xmpp-front:internal")
            for contact in contacts:
                st.sub(targets, "item", {"jid": contact})
            self.presence_to(targets, out)
            out.commands.append(ToAccount(PRESENCE, targets))

    def deliver_push(self, session: SessionCore, push: Element, out: Outputs) -> None:
        if not self.interested:
            return
        iq_id = session.new_id("blockpush")
        if len(self._pushes) >= MAX_PUSHES_AWAITED:  # clients that never answer
            self._pushes = removed(self._pushes, next(iter(self._pushes)))
        self._pushes = added(self._pushes, iq_id)
        iq = st.element("iq", {"type": "set", "id": iq_id, "to": str(session.jid)})
        iq.append(copy.deepcopy(push))
        out.to_client.append(iq)

    def presence_to(self, targets: Element, out: Outputs) -> None:
        """Unavailable presence to the contacts now blocked, or the current presence to
        those unblocked; only while this session is available."""
        if self._presence is None:
            return
        block = targets.get("action") == "block"
        for item in targets:
            contact = item.get("jid", "")
            if block:
                out.to_upstream.append(st.element("presence",
                                                  {"type": "unavailable", "to": contact}))
            else:
                presence = copy.deepcopy(self._presence)
                presence.set("to", contact)
                presence.attrib.pop("id", None)
                out.to_upstream.append(presence)

    def from_account(self, session: SessionCore, kind: str, payload: Element,
                     out: Outputs) -> None:
        if kind == PUSH:
            self.deliver_push(session, payload, out)
        elif kind == PRESENCE and payload.tag == _TARGETS:
            self.presence_to(payload, out)

    # ------------------------------------------------------------------ from the server

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        sender = el.get("from")
        if sender is None or not is_blocked(self._acct.blocked, sender):
            return el
        kind = el.get("type")
        answer = ((el.tag == st.MESSAGE and kind in (None, "normal", "chat"))
                  or (el.tag == st.IQ and kind in ("get", "set")))
        if answer and self._acct.first_answer(el):
            # §3.3: the user appears offline to the contact
            reply = st.error_reply(el, "service-unavailable")
            reply.attrib.pop("from", None)
            out.to_upstream.append(reply)
        out.commands.append(Log("blocked_inbound", {"kind": st.kind(el), "from": sender,
                                                    "answered": answer}, "debug"))
        return None

    def from_store(self, session: SessionCore, el: Element) -> Element | None:
        return None if is_blocked(self._acct.blocked, el.get("from")) else el

    def closed(self, session: SessionCore) -> None:
        self._factory._release(self._acct, self.session_id)

