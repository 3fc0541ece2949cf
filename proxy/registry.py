"""The hub's decisions as a pure core: what an authenticated client gets before it is bound.

After SASL a client binds a resource (a new session, the takeover of the session already
bound to that resource, a refusal by the abuse limit, ``remote-server-timeout`` while the
server is away, a finishing session of that resource handing over first) or resumes a
stream-management session (XEP-0198 §5: looked up under the authenticated account only, so
another user's id is simply not found; the last ``h`` of an ended session is remembered a
while; an ``h`` too high ends the stream). ``<enable/>`` and other elements before bind are
refused.

Events in (an element, what the shell found when asked to look up, what the upstream bind
gave), commands out (``proxy/commands.py``). The shell (``proxy/net/hub.py``) keeps the
dicts that find live sessions and carries the commands out. The clock is injected; no
sockets.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .abuse import Refusal, bind_refusal
from .commands import (
    BindUpstream,
    Count,
    FailNegotiation,
    Log,
    LookUpBind,
    LookUpResume,
    NewSession,
    RegistryCommand,
    ReplacePrevious,
    Resume,
    TakeOver,
    ToClient,
)
from .config import AbuseConfig
from .features.stream_management import HandledCountTooHigh, failed, parse_h
from .negotiation import violation
from .xmpp import codec, ns
from .xmpp import stanza as st
from .xmpp.jid import InvalidJid, Jid
from .xmpp.stanza import Element

MAX_TOMBSTONES = 10000  # ended SM ids remembered, so a late <resume/> learns the final h
XEP_0205_ERRORS = "urn:xmpp:errors"

_BIND = ns.qname(ns.BIND, "bind")
_RESOURCE = f"{{{ns.BIND}}}bind/{{{ns.BIND}}}resource"
_SM_ENABLE, _SM_RESUME = ns.qname(ns.SM, "enable"), ns.qname(ns.SM, "resume")

Key = tuple[str, str]  # (account, sm id)


def bind_refused(request: Element, refusal: Refusal) -> Element:
    """RFC 6120 §7.6.2.1 (type ``wait``), with XEP-0205's application condition."""
    reply = st.error_reply(request, refusal.condition, error_type="wait", text=refusal.text)
    for attr in ("to", "from"):
        reply.attrib.pop(attr, None)
    st.sub(reply[0], "resource-limit-exceeded", namespace=XEP_0205_ERRORS)
    return reply


def bind_result(request: Element, jid: Jid) -> Element:
    result = st.iq_result(request)
    result.attrib.pop("to", None)
    bind = st.sub(result, "bind", namespace=ns.BIND)
    st.sub(bind, "jid", text=str(jid))
    return result


def requested_resource(request: Element) -> str:
    resource_el = request.find(_RESOURCE)
    return (resource_el.text or "").strip() if resource_el is not None else ""


class Registry:
    """Bind, takeover and resume decisions for every client of the proxy, and the
    tombstones of ended stream-management sessions."""

    def __init__(self, abuse: AbuseConfig, *, max_resume_timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_tombstones: int = MAX_TOMBSTONES) -> None:
        self.abuse = abuse
        self.tombstone_seconds = 2 * max_resume_timeout
        self.clock = clock
        self.max_tombstones = max_tombstones
        # (account, sm id) -> (last inbound h, expiry) of sessions that ended.
        self.tombstones: OrderedDict[Key, tuple[int, float]] = OrderedDict()

    def reconfigure(self, abuse: AbuseConfig, *, max_resume_timeout: float) -> None:
        """A reload: the new limits apply from the next bind; the tombstones stay."""
        self.abuse = abuse
        self.tombstone_seconds = 2 * max_resume_timeout

    # Stream management ids --------------------------------------------------------------------

    def sm_ended(self, key: Key, inbound: int) -> None:
        """A resumable session ended with ``inbound`` stanzas counted: a late ``<resume/>``
        for it learns that count (XEP-0198 §5) for twice the longest resumption time."""
        self.tombstones[key] = (inbound, self.clock() + self.tombstone_seconds)
        self.tombstones.move_to_end(key)
        while len(self.tombstones) > self.max_tombstones:
            self.tombstones.popitem(last=False)

    # Before bind ------------------------------------------------------------------------------

    def element(self, el: Element) -> list[RegistryCommand]:
        """An element from an authenticated client that is not bound yet."""
        if el.tag == _SM_ENABLE:
            return [ToClient(failed("unexpected-request", text="bind a resource first"))]
        if el.tag == _SM_RESUME:
            previd, h = el.get("previd", ""), parse_h(el)
            if not previd or h is None:
                return [Count("resumes", "failed"),
                        ToClient(failed("bad-request", text="previd and a valid h are required"))]
            return [LookUpResume(previd, h)]
        if el.tag == st.IQ and el.get("type") == "set" and el.find(_BIND) is not None:
            return [LookUpBind(requested_resource(el))]
        if el.tag == st.IQ:
            return [ToClient(st.error_reply(el, "not-authorized" if el.get("type") in (
                "get", "set") else "bad-request", text="bind a resource first"))]
        return [violation("not-authorized", "bind a resource first")]

    # Resume -----------------------------------------------------------------------------------

    def resume(self, account: str, previd: str, h: int, *, resumable: bool,
               problem: HandledCountTooHigh | None = None) -> list[RegistryCommand]:
        """What the look-up found: ``resumable`` (a live, resumable session of this account
        under ``previd``) and, if so, the ``problem`` its client edge has with ``h``."""
        if not resumable:
            tomb = self.tombstones.get((account, previd))
            out: list[RegistryCommand] = [
                Log("resume_failed", {"reason": "item-not-found", "known": tomb is not None}),
                Count("resumes", "failed")]
            if tomb is not None and tomb[1] > self.clock():
                return [*out, ToClient(failed("item-not-found", h=tomb[0]))]
            return [*out, ToClient(failed("item-not-found"))]
        if problem is not None:
            return [Count("resumes", "failed"),
                    FailNegotiation("resume with h too high", codec.stream_error(
                        "undefined-condition", str(problem),
                        app_condition=problem.app_condition()))]
        return [Resume(previd, h)]

    # Bind -------------------------------------------------------------------------------------

    def bind(self, request: Element, account: Jid, *, live_resource: Jid | None,
             sessions_of_account: int, server_reachable: bool,
             finishing: bool) -> list[RegistryCommand]:
        """What the look-up found for the requested resource: the JID of a live session
        bound to it, how many live sessions the account has, whether the client's login
        reached the server, and whether an ended session of the resource is still finishing
        upstream."""
        resource = requested_resource(request)
        if live_resource is not None:
            # Takeover: the upstream session is kept as it is, not bound again.
            return [TakeOver(str(live_resource), bind_result(request, live_resource))]
        refusal = bind_refusal(sessions_of_account, self.abuse)
        if refusal is not None:
            return [ToClient(bind_refused(request, refusal)),
                    Log("session_refused", {"condition": refusal.condition,
                                            "limit": refusal.limit, "resource": resource},
                        level="warning")]
        if not server_reachable:  # logged in against a live session: the server is away
            return [ToClient(st.error_reply(
                        request, "remote-server-timeout", error_type="wait",
                        text="the legacy server is unreachable; resume or try again later")),
                    Log("bind_failed", {"reason": "the server is unreachable",
                                        "resource": resource})]
        # An ended session of this very resource may still be finishing upstream: its
        # stream would conflict with the new bind, so it hands what it owes over first.
        return [BindUpstream(resource or None,
                             hand_over_from=str(account.with_resource(resource))
                             if resource and finishing else None)]

    def bind_refused_upstream(self, request: Element, reply: Element,
                              reason: str) -> list[RegistryCommand]:
        """The server refused the bind with ``reply``: the client gets it as its answer."""
        reply.set("id", request.get("id", ""))
        for attr in ("to", "from"):
            reply.attrib.pop(attr, None)
        return [ToClient(reply), Log("bind_failed", {"reason": reason,
                                                     "resource": requested_resource(request)})]

    def bind_broke(self) -> list[RegistryCommand]:
        return [violation("remote-connection-failed", "the legacy server failed during bind")]

    def bound(self, request: Element, account: Jid, full: str, *, previous: bool,
              domain_known: bool, account_known: bool) -> list[RegistryCommand]:
        """The server bound ``full``; ``previous``: a session is registered under that JID
        already (the server resolved a resource conflict in our favour)."""
        out: list[RegistryCommand] = []
        if not (domain_known and account_known):
            out.append(Log("discovery_incomplete", {"domain": domain_known,
                                                    "account": account_known}))
        try:
            jid = Jid.parse(full)
        except InvalidJid:
            return [*out, violation("internal-server-error", "bad JID from the server")]
        if jid.bare != account.bare:
            return [*out, violation("internal-server-error", "the server bound another account")]
        if previous:
            out.append(ReplacePrevious(str(jid), "resource bound again"))
        return [*out, NewSession(jid, bind_result(request, jid))]
