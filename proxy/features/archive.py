"""Message archive management (XEP-0313, ``urn:xmpp:mam:2``) for a server that lacks it.

Emulated when ``emulates(config.features.archive, server.account_has(MAM))``: the account's
disco#info then lists ``urn:xmpp:mam:2`` (and ``#extended``), and the proxy answers the
account's archive queries itself, never passing them on.

What is archived (``archivable``): one-to-one messages with a body (type chat or normal, or
any non-error, non-groupchat message with a ``<store/>`` hint), both ways, as they pass
through the proxy: the client's as they go upstream, the server's as it delivers them (so
also those the proxy then keeps for offline delivery: they went through here first). Not
groupchat, headlines or errors; not what carries ``<no-store/>`` or ``<no-permanent-store/>``
(XEP-0334); not what the preferences (XEP-0441) exclude. A message the server forks to
several sessions of the account is archived once (same sender and id), and each copy gets the
same ``<stanza-id/>`` (XEP-0359, by the bare JID); a stanza-id by the bare JID that came from
outside is removed (a spoof: XEP-0359 §7).

The archive itself is in the store, written and queried on its own thread
(``proxy/archive_store.py``): this feature only asks (``ArchivePut``, ``ArchiveQuery``
commands) and hears the answers (``store_result``). The shell adds the account to both, so a
session can only reach its own account's archive; a query addressed to another user's bare
JID on the server's domain is refused with ``forbidden`` (XEP-0313 §8.1).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from ..archive_store import (ArchiveBounds, ArchiveEnds, ArchiveFailed,
                             ArchiveFilter, ArchiveItem, ArchiveKey, ArchiveMissing,
                             ArchivePage, ArchiveSearch, Direction, PageRequest, Prefs)
from ..commands import ArchivePut, ArchiveQuery, Log
from ..config import ArchiveConfig, FeatureMode, emulates
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.disco import Additions, ServerInfo
from ..xmpp.jid import InvalidJid, Jid
from ..xmpp.stanza import Element

MAM = "urn:xmpp:mam:2"
MAM_EXTENDED = "urn:xmpp:mam:2#extended"
RSM = "http://jabber.org/protocol/rsm"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
DATA = "jabber:x:data"
XDATA_VALIDATE = "http://jabber.org/protocol/xdata-validate"

_BODY = ns.qname(ns.CLIENT, "body")
_STANZA_ID = ns.qname(ns.SID, "stanza-id")
_ORIGIN_ID = ns.qname(ns.SID, "origin-id")
_QUERY = ns.qname(MAM, "query")
_PREFS = ns.qname(MAM, "prefs")
_METADATA = ns.qname(MAM, "metadata")
_FORM = ns.qname(DATA, "x")
_SET = ns.qname(RSM, "set")
_NO_STORE = ns.qname(HINTS, "no-store")
_NO_PERMANENT_STORE = ns.qname(HINTS, "no-permanent-store")
_STORE = ns.qname(HINTS, "store")
MAX_PENDING = 8  # queries of one session waiting for the store at once


# ---------------------------------------------------------------------- what is archived


_UNARCHIVED_TYPES = frozenset(("error", "groupchat", "headline"))


def archivable(el: Element) -> bool:
    """A message for the user archive (XEP-0313 §6.1.1, XEP-0334 hints)?"""
    return el.tag == st.MESSAGE and _examine(el)[0]


def _examine(el: Element) -> tuple[bool, str | None, list[Element] | None]:
    """One pass over a message's children (each ``find`` is a path search of its own, and
    this runs for every message both ways): whether it is archivable, its origin-id, and its
    stanza-ids if it has any."""
    body = store = refused = False
    origin: str | None = None
    stamps: list[Element] | None = None
    for child in el:
        tag = child.tag
        if tag == _BODY:
            body = True
        elif tag == _STANZA_ID:
            if stamps is None:
                stamps = []
            stamps.append(child)
        elif tag == _ORIGIN_ID:
            if origin is None:
                origin = child.get("id") or ""
        elif tag == _STORE:
            store = True
        elif tag == _NO_STORE or tag == _NO_PERMANENT_STORE:
            refused = True
    wanted = ((body or store) and not refused
              and el.get("type", "normal") not in _UNARCHIVED_TYPES)
    return wanted, origin, stamps


def wanted(prefs: Prefs, with_bare: str, in_roster: Callable[[str], bool]) -> bool:
    """XEP-0441: never wins over always; else the default (``roster``: contacts only)."""
    if with_bare in prefs.never:
        return False
    if with_bare in prefs.always:
        return True
    if prefs.default == "roster":
        return in_roster(with_bare)
    return prefs.default == "always"


def strip_spoofed_ids(el: Element, account: str,
                      stamps: list[Element] | None = None) -> int:
    """Remove every stanza-id claiming to be by the account (only the proxy stamps those);
    ``stamps``: the message's stanza-ids if already found."""
    candidates = el.findall(_STANZA_ID) if stamps is None else stamps
    spoofed = [c for c in candidates if c.get("by") == account]
    for c in spoofed:
        el.remove(c)
    return len(spoofed)


def stamp_template(account: str) -> Element:
    """The account's stanza-id without its id: ``stamp_stanza_id`` copies it."""
    return etree.Element(_STANZA_ID, {"by": account, "id": ""}, nsmap={None: ns.SID})


def stamp_stanza_id(el: Element, template: Element, archive_id: str) -> None:
    # A copy of a ready element (``stamp_template``): cheaper than a new one with its
    # namespace declaration and its by.
    sid = template.__copy__()
    sid.set("id", archive_id)
    el.append(sid)


# ---------------------------------------------------------------------- times


def format_stamp(when: float) -> str:
    """XEP-0082 DateTime, UTC, microseconds."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(text: str) -> float:
    """XEP-0082 DateTime (a zone is required: 'Z' or an offset); ValueError if not."""
    text = text.strip()
    if "T" not in text:
        raise ValueError("not a DateTime")
    when = datetime.fromisoformat(text.replace("z", "Z"))
    if when.tzinfo is None:
        raise ValueError("a DateTime needs a time zone")
    return when.timestamp()


# ---------------------------------------------------------------------- queries


@dataclass(frozen=True, slots=True)
class QueryRefused:
    condition: str
    text: str


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    search: ArchiveSearch
    queryid: str | None
    flip: bool


KNOWN_FIELDS = ("FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids")


def query_form() -> Element:
    """The form a client gets for ``<iq type='get'><query/></iq>`` (XEP-0313 §4.1.5)."""
    query = st.element("query", namespace=MAM)
    x = st.sub(query, "x", {"type": "form"}, namespace=DATA)
    form_type = st.sub(x, "field", {"type": "hidden", "var": "FORM_TYPE"})
    st.sub(form_type, "value", text=MAM)
    for var, kind in (("with", "jid-single"), ("start", "text-single"),
                      ("end", "text-single"), ("before-id", "text-single"),
                      ("after-id", "text-single")):
        st.sub(x, "field", {"type": kind, "var": var})
    ids = st.sub(x, "field", {"type": "list-multi", "var": "ids"})
    validate = st.sub(ids, "validate", {"datatype": "xs:string"}, namespace=XDATA_VALIDATE)
    st.sub(validate, "open")
    return query


def _values(field: Element) -> list[str]:
    return [(v.text or "") for v in field.findall(ns.qname(DATA, "value"))]


def _single(field: Element, var: str) -> str | QueryRefused:
    values = _values(field)
    if len(values) != 1 or not values[0].strip():
        return QueryRefused("bad-request", f"field {var!r} needs exactly one value")
    return values[0].strip()


def parse_filter(form: Element | None) -> ArchiveFilter | QueryRefused:
    """The data form's fields (XEP-0313 §4.1): unknown fields are feature-not-implemented,
    bad values bad-request."""
    if form is None:
        return ArchiveFilter()
    if form.get("type", "submit") != "submit":
        return QueryRefused("bad-request", "the query form must be of type submit")
    values: dict[str, str] = {}
    ids: tuple[str, ...] = ()
    for field in form.findall(ns.qname(DATA, "field")):
        var = field.get("var", "")
        if var not in KNOWN_FIELDS:
            return QueryRefused("feature-not-implemented", f"unknown field {var!r}")
        if var == "ids":
            ids = tuple(v.strip() for v in _values(field) if v.strip())
            continue
        value = _single(field, var)
        if isinstance(value, QueryRefused):
            return value
        values[var] = value
    if values.get("FORM_TYPE", MAM) != MAM:
        return QueryRefused("bad-request", f"FORM_TYPE must be {MAM}")
    with_jid, with_bare = None, True
    if "with" in values:
        try:
            jid = Jid.parse(values["with"])
        except InvalidJid:
            return QueryRefused("bad-request", "field 'with' is not a JID")
        with_jid, with_bare = str(jid), jid.is_bare
    times: dict[str, float] = {}
    for var in ("start", "end"):
        if var in values:
            try:
                times[var] = parse_stamp(values[var])
            except ValueError:
                return QueryRefused("bad-request", f"field {var!r} is not an XEP-0082 DateTime")
    return ArchiveFilter(with_jid=with_jid, with_bare=with_bare, start=times.get("start"),
                         end=times.get("end"), after_id=values.get("after-id"),
                         before_id=values.get("before-id"), ids=ids)


def parse_page(rsm: Element | None, max_page: int) -> PageRequest | QueryRefused:
    """XEP-0059 ``<set/>``: max (capped at ``max_page``), after, before (empty: the last
    page), index."""
    if rsm is None:
        return PageRequest(max=max_page)
    size = max_page
    max_el = rsm.find(ns.qname(RSM, "max"))
    if max_el is not None:
        text = (max_el.text or "").strip()
        if not text.isdigit():
            return QueryRefused("bad-request", "RSM max must be a non-negative integer")
        size = min(int(text), max_page)
    after_el, before_el = rsm.find(ns.qname(RSM, "after")), rsm.find(ns.qname(RSM, "before"))
    if after_el is not None and before_el is not None:
        return QueryRefused("bad-request", "RSM after and before together are undefined;"
                            " use the after-id and before-id fields")
    after = None
    if after_el is not None:
        after = (after_el.text or "").strip()
        if not after:
            return QueryRefused("bad-request", "RSM after needs an id")
    before = None if before_el is None else (before_el.text or "").strip()
    index = None
    index_el = rsm.find(ns.qname(RSM, "index"))
    if index_el is not None:
        text = (index_el.text or "").strip()
        if not text.isdigit():
            return QueryRefused("bad-request", "RSM index must be a non-negative integer")
        index = int(text)
    return PageRequest(max=size, after=after, before=before, index=index)


def parse_query(query: Element, *, max_page: int, counts: bool) -> ParsedQuery | QueryRefused:
    if query.get("node") is not None:
        return QueryRefused("feature-not-implemented", "no pubsub node archives here")
    flt = parse_filter(query.find(_FORM))
    if isinstance(flt, QueryRefused):
        return flt
    page = parse_page(query.find(_SET), max_page)
    if isinstance(page, QueryRefused):
        return page
    return ParsedQuery(ArchiveSearch(flt, page, counts), query.get("queryid"),
                       query.find(ns.qname(MAM, "flip-page")) is not None)


def result_message(item: ArchiveItem, queryid: str | None, to: str, from_: str | None,
                   msg_id: str, parse: Callable[[bytes], Element]) -> Element:
    """One ``<message><result><forwarded><delay/>original</forwarded></result></message>``."""
    attrs = {"to": to, "id": msg_id}
    if from_ is not None:
        attrs["from"] = from_
    message = st.element("message", attrs)
    result = st.sub(message, "result", {"id": item.archive_id}, namespace=MAM)
    if queryid is not None:
        result.set("queryid", queryid)
    forwarded = st.sub(result, "forwarded", namespace=FORWARD)
    st.sub(forwarded, "delay", {"stamp": format_stamp(item.timestamp)}, namespace=ns.DELAY)
    forwarded.append(parse(item.stanza))
    return message


def fin_element(page: ArchivePage) -> Element:
    fin = st.element("fin", namespace=MAM)
    if page.complete:
        fin.set("complete", "true")
    rsm = st.sub(fin, "set", namespace=RSM)
    if page.items:
        first = st.sub(rsm, "first", text=page.items[0].archive_id)
        if page.first_index is not None:
            first.set("index", str(page.first_index))
        st.sub(rsm, "last", text=page.items[-1].archive_id)
    if page.count is not None:
        st.sub(rsm, "count", text=str(page.count))
    return fin


def metadata_element(ends: ArchiveEnds) -> Element:
    metadata = st.element("metadata", namespace=MAM)
    for name, item in (("start", ends.first), ("end", ends.last)):
        if item is not None:
            st.sub(metadata, name, {"id": item.archive_id,
                                    "timestamp": format_stamp(item.timestamp)})
    return metadata


# ---------------------------------------------------------------------- preferences


def parse_prefs(el: Element) -> Prefs | QueryRefused:
    default = el.get("default")
    if default not in ("always", "never", "roster"):
        return QueryRefused("bad-request", "prefs default must be always, never or roster")
    lists: dict[str, frozenset[str]] = {}
    for name in ("always", "never"):
        jids: set[str] = set()
        for holder in el.findall(ns.qname(MAM, name)):
            for j in holder.findall(ns.qname(MAM, "jid")):
                try:
                    jids.add(str(Jid.parse((j.text or "").strip()).bare))
                except InvalidJid:
                    return QueryRefused("bad-request", f"not a JID in <{name}/>")
        lists[name] = frozenset(jids)
    return Prefs(default, lists["always"], lists["never"])  # type: ignore[arg-type]


def prefs_element(prefs: Prefs) -> Element:
    el = st.element("prefs", {"default": prefs.default}, namespace=MAM)
    for name, jids in (("always", prefs.always), ("never", prefs.never)):
        holder = st.sub(el, name)
        for jid in sorted(jids):
            st.sub(holder, "jid", text=jid)
    return el


# ---------------------------------------------------------------------- the feature


_FILLED_IN = b""  # ArchivePut.message.stanza when the shell stores the element's bytes
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def _parse_archived(data: bytes) -> Element:
    return etree.fromstring(data, _SAFE_PARSER)


class Archive(Feature):
    client_tags = frozenset((st.IQ, st.MESSAGE))
    upstream_tags = frozenset((st.MESSAGE,))

    def __init__(self, factory: ArchiveFactory) -> None:
        self.factory = factory
        self.config = factory.config
        self._account_text: str | None = None
        self._stamp: Element | None = None  # stamp_template of the account, once needed
        # token -> (the query iq, what was asked)
        self._pending: dict[str, tuple[Element, ParsedQuery | None]] = {}

    # -------------------------------------------------------------- messages

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        tag = el.tag
        if tag == st.IQ:
            return self._iq(session, el, out)
        if tag == st.MESSAGE:
            to = el.get("to")
            if to:
                wanted, origin, _ = _examine(el)
                if wanted:
                    self._archive(session, el, "out", to, origin, out)
        return el

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.MESSAGE:
            return el
        wanted, origin, stamps = _examine(el)
        if stamps is not None and strip_spoofed_ids(el, self._account(session), stamps):
            out.commands.append(Log("stanza_id_spoof_removed", {"from": el.get("from")},
                                    "warning"))
        if wanted:
            sender = el.get("from")
            if sender:
                archive_id = self._archive(session, el, "in", sender, origin, out)
                if archive_id is not None:
                    template = self._stamp
                    if template is None:
                        template = self._stamp = stamp_template(self._account(session))
                    stamp_stanza_id(el, template, archive_id)
        return el

    def _account(self, session: SessionCore) -> str:
        if self._account_text is None:
            self._account_text = str(session.account)
        return self._account_text

    def _archive(self, session: SessionCore, el: Element, direction: Direction, other: str,
                 origin: str | None, out: Outputs) -> str | None:
        factory = self.factory
        parts = factory.jid_parts(other)
        if parts is None:
            return None
        with_bare, with_full = parts
        account = self._account_text or self._account(session)
        prefs = factory.prefs(account)
        if prefs is not _ARCHIVE_ALL and not wanted(
                prefs, with_bare, lambda j: factory.in_roster(account, j)):
            return None
        ident = origin or el.get("id")
        key = factory.key_for((account, el.get("from", ""), ident) if ident else None)
        if isinstance(key, str):
            return key  # a copy the server forked to another session: archived once
        archive_id, seq, nonce = key
        # The bytes are the shell's: it serializes the message for the wire anyway, after
        # the features that come later (and, for a received one, with the stanza-id stamped).
        out.commands.append(ArchivePut(
            (archive_id, factory.now(), direction, with_bare, with_full, _FILLED_IN, seq,
             nonce), el))
        return archive_id

    # -------------------------------------------------------------- requests

    def _iq(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if len(el) != 1 or el.get("type") not in ("get", "set"):
            return el
        payload = el[0]
        if payload.tag not in (_QUERY, _PREFS, _METADATA):
            return el
        to = el.get("to")
        account = str(session.account)
        if to is not None and to != account:
            if self._another_users(to, account):
                out.to_client.append(_own_reply(st.error_reply(
                    el, "forbidden", text="only your own archive can be read"), el))
                return None
            return el  # a room's or a service's archive: theirs to answer
        kind = el.get("type")
        if payload.tag == _PREFS:
            self._prefs(session, el, payload, out)
        elif payload.tag == _METADATA:
            if kind != "get":
                out.to_client.append(_own_reply(st.error_reply(el, "bad-request"), el))
            else:
                self._ask(session, el, None, ArchiveBounds(), out)
        elif kind == "get":
            out.to_client.append(_own_reply(st.iq_result(el, query_form()), el))
        else:
            parsed = parse_query(payload, max_page=self.config.max_page,
                                 counts=self.config.counts)
            if isinstance(parsed, QueryRefused):
                out.to_client.append(_own_reply(st.error_reply(
                    el, parsed.condition, text=parsed.text), el))
                out.commands.append(Log("archive_query_refused",
                                        {"condition": parsed.condition, "why": parsed.text}))
            else:
                self._ask(session, el, parsed, parsed.search, out)
        return None

    def _another_users(self, to: str, account: str) -> bool:
        try:
            jid = Jid.parse(to)
        except InvalidJid:
            return False
        # Another account of this account's own domain (each served domain has its server).
        return (jid.is_bare and bool(jid.local) and jid.domain == account.rpartition("@")[2]
                and str(jid) != account)

    def _ask(self, session: SessionCore, el: Element, parsed: ParsedQuery | None,
             request: ArchiveSearch | ArchiveBounds, out: Outputs) -> None:
        if len(self._pending) >= MAX_PENDING:
            out.to_client.append(_own_reply(st.error_reply(
                el, "resource-constraint", text="too many archive queries at once"), el))
            return
        token = session.new_id("mam")
        self._pending[token] = (el, parsed)
        out.commands.append(ArchiveQuery(token, request))

    def _prefs(self, session: SessionCore, el: Element, payload: Element, out: Outputs) -> None:
        account = str(session.account)
        if el.get("type") == "set":
            prefs = parse_prefs(payload)
            if isinstance(prefs, QueryRefused):
                out.to_client.append(_own_reply(st.error_reply(
                    el, prefs.condition, text=prefs.text), el))
                return
            self.factory.set_prefs(account, prefs)
            out.commands.append(Log("archive_prefs_set", {"default": prefs.default}))
        out.to_client.append(_own_reply(st.iq_result(
            el, prefs_element(self.factory.prefs(account))), el))

    def store_result(self, session: SessionCore, token: str, result: object,
                     out: Outputs) -> None:
        asked = self._pending.pop(token, None)
        if asked is None:
            return
        el, parsed = asked
        if isinstance(result, ArchiveMissing):
            out.to_client.append(_own_reply(st.error_reply(
                el, "item-not-found", text=f"no message {result.archive_id!r} in the archive"),
                el))
        elif isinstance(result, ArchiveFailed):
            out.to_client.append(_own_reply(st.error_reply(el, "internal-server-error"), el))
        elif isinstance(result, ArchiveEnds):
            out.to_client.append(_own_reply(st.iq_result(el, metadata_element(result)), el))
        elif isinstance(result, ArchivePage) and parsed is not None:
            to = el.get("from") or str(session.jid)
            from_ = el.get("to")
            items = list(reversed(result.items)) if parsed.flip else list(result.items)
            for item in items:
                out.to_client.append(result_message(item, parsed.queryid, to, from_,
                                                    session.new_id("mamr"), _parse_archived))
            out.to_client.append(_own_reply(st.iq_result(el, fin_element(result)), el))


def _own_reply(reply: Element, request: Element) -> Element:
    """An answer for the account: from the entity asked (none when the query had no ``to``)."""
    if request.get("to") is None:
        reply.attrib.pop("from", None)
    return reply


def new_archive_id() -> ArchiveKey:
    """An id of the kind stored as it is (without an archive that derives its own)."""
    return secrets.token_urlsafe(12), None, None


# The preferences of an account that never set any, with the default default: archive
# everything (checked by identity first: most accounts never set preferences).
_ARCHIVE_ALL = Prefs("always")


class ArchiveFactory(FeatureFactory):
    """Shared by the account's sessions: the preferences (read from the store once per
    account, written when a client sets them: one row, on the loop like the roster cache)
    and the recent message keys that make a forked message one archive entry."""

    FORK_WINDOW = 120.0  # seconds within which a second copy of a message is the same one
    FORK_MAX = 10000

    def __init__(self, mode: FeatureMode, config: ArchiveConfig, domain: str, *,
                 load_prefs: Callable[[str], Prefs | None] = lambda account: None,
                 save_prefs: Callable[[str, Prefs], None] = lambda account, prefs: None,
                 in_roster: Callable[[str, str], bool] = lambda account, jid: False,
                 new_id: Callable[[], ArchiveKey] = new_archive_id,
                 now: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.config = config
        self.domain = domain
        self._load_prefs, self._save_prefs = load_prefs, save_prefs
        self.in_roster = in_roster
        self.new_archive_id = new_id
        self.now = now
        self.clock = clock
        self._prefs: dict[str, Prefs] = {}
        # Insertion-ordered: oldest first.
        self._recent: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._jids: dict[str, tuple[str, str] | None] = {}

    def emulated(self, server: ServerInfo) -> bool:
        return emulates(self.mode, server.account_has(MAM))

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        if self.emulated(server):
            additions.account.update((MAM, MAM_EXTENDED))

    def create(self, session: SessionCore) -> Feature:
        return Archive(self) if self.emulated(session.server) else Feature()

    # -------------------------------------------------------------- preferences

    def prefs(self, account: str) -> Prefs:
        prefs = self._prefs.get(account)
        if prefs is None:
            prefs = self._load_prefs(account) or (
                _ARCHIVE_ALL if self.config.default_prefs == "always"
                else Prefs(self.config.default_prefs))
            self._prefs[account] = prefs
        return prefs

    def set_prefs(self, account: str, prefs: Prefs) -> None:
        self._save_prefs(account, prefs)
        self._prefs[account] = prefs

    # -------------------------------------------------------------- addresses

    JID_CACHE = 10000  # the other parties' addresses parsed, kept (then forgotten at once)

    def jid_parts(self, text: str) -> tuple[str, str] | None:
        """(bare, full) of a message's other party; None if it is not a JID. Parsed once
        (a chat is many messages between the same two addresses)."""
        try:
            return self._jids[text]
        except KeyError:
            pass
        try:
            jid = Jid.parse(text)
            parts: tuple[str, str] | None = (str(jid.bare), str(jid))
        except InvalidJid:
            parts = None
        if len(self._jids) >= self.JID_CACHE:
            self._jids.clear()
        self._jids[text] = parts
        return parts

    # -------------------------------------------------------------- forked copies

    def key_for(self, fork: tuple[str, str, str] | None) -> ArchiveKey | str:
        """A new key for a message, or just its id if it was archived within the window:
        the same message (``fork``: account, sender and id or origin-id), however many
        copies the server made."""
        if fork is None:
            return self.new_archive_id()
        recent = self._recent
        now = self.clock()
        hit = recent.get(fork)
        if hit is not None:
            if hit[1] >= now - self.FORK_WINDOW:
                return hit[0]
            del recent[fork]  # a stale entry of the same key goes to the end, as new
        key = self.new_archive_id()
        recent[fork] = (key[0], now)
        if len(recent) > self.FORK_MAX:
            # Now and then, not per message: keep the newer half of what is in the window.
            window_start = now - self.FORK_WINDOW
            keep = list(recent.items())[-(self.FORK_MAX // 2):]
            self._recent = {k: v for k, v in keep if v[1] >= window_start}
        return key
