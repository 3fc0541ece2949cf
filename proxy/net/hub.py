"""The hub: every live session, and how an authenticated client connection gets one.

After SASL a client either binds a resource (a new session, or the takeover of a session
already bound to that resource) or resumes a stream-management session (XEP-0198 §5).
Resumption ids are looked up under the authenticated account only, so another user's id is
simply not found and nothing leaks.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any


from ..abuse import Refusal, bind_refusal
from ..archive_store import ArchiveWriter
from ..config import Config
from ..inspection import Inspector
from ..features.stream_management import failed, parse_h
from ..features.disco import caps_for
from ..session import FeatureFactory, SessionCore, disco_additions
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from ..xmpp.jid import InvalidJid, Jid
from .client_side import AuthenticatedClient, ClientNegotiation, NegotiationFailed, violation
from ..journal import Journal
from .live import LiveSession, SessionStore
from .ports import FinishingSession, RegisteredSession
from .upstream import UpstreamBindFailed, UpstreamLink, UpstreamUnavailable
from ..xmpp.disco import DiscoInfo, ServerInfo
from ..xmpp.stanza import Element


_BIND = ns.qname(ns.BIND, "bind")
_CAPS = ns.qname(ns.CAPS, "c")
_SM_ENABLE, _SM_RESUME = ns.qname(ns.SM, "enable"), ns.qname(ns.SM, "resume")
MAX_TOMBSTONES = 10000  # ended SM ids remembered, so a late <resume/> learns the final h
XEP_0205_ERRORS = "urn:xmpp:errors"


def bind_refused(request: Element, refusal: Refusal) -> Element:
    """RFC 6120 §7.6.2.1 (type ``wait``), with XEP-0205's application condition."""
    reply = st.error_reply(request, refusal.condition, error_type="wait", text=refusal.text)
    for attr in ("to", "from"):
        reply.attrib.pop(attr, None)
    st.sub(reply[0], "resource-limit-exceeded", namespace=XEP_0205_ERRORS)
    return reply


class Hub:
    def __init__(self, config: Config, factories: Sequence[FeatureFactory],
                 store: SessionStore | None, upstream_tls: ssl.SSLContext | None,
                 log: Any, inspector: Inspector | None = None,
                 journal: Journal | None = None, archive: ArchiveWriter | None = None) -> None:
        self.config = config
        self.journal = journal
        self.archive = archive
        self.inspector = inspector
        self.upstream_tls = upstream_tls
        self.factories = list(factories)
        self.store = store
        self.log = log
        self.by_jid: dict[str, LiveSession] = {}
        self.by_sm_id: dict[tuple[str, str], LiveSession] = {}
        # Ended sessions whose upstream side still waits for the server's confirmations.
        self.finishing_sessions: set[FinishingSession] = set()
        # How the stanzas of every session that is gone left its ledger (for /metrics).
        self.settled: Counter[tuple[str, str]] = Counter()
        # (account, sm id) -> (last inbound h, expiry) of sessions that ended.
        self.tombstones: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        # The server domain's disco#info as the last bind found it (for the caps hash
        # offered before the next bind).
        self.domain_info: DiscoInfo | None = None

    # Registry ----------------------------------------------------------------------------------

    def new_sm_id(self) -> str:
        return secrets.token_urlsafe(18)

    def sm_registered(self, session: RegisteredSession, sm_id: str | None,
                      inbound: int) -> None:
        """A session's stream management became resumable under ``sm_id``, or ended (None,
        with its last count for a late ``<resume/>``)."""
        if sm_id is not None:
            assert isinstance(session, LiveSession)  # the hub registers only its own
            session.sm_key = (str(session.core.account), sm_id)
            self.by_sm_id[session.sm_key] = session
            return
        key, session.sm_key = session.sm_key, None
        if key is not None and self.by_sm_id.pop(key, None) is not None:
            self.tombstones[key] = (inbound, time.monotonic()
                                    + 2 * self.config.stream_management.max_resume_timeout)
            while len(self.tombstones) > MAX_TOMBSTONES:
                self.tombstones.popitem(last=False)

    def finishing(self, session: FinishingSession) -> None:
        self.finishing_sessions.add(session)

        def done() -> None:
            self.finishing_sessions.discard(session)
            session.log_ledger()
        session.when_upstream_finished(done)

    def ledger_settled(self, summary: dict[str, dict[str, int]]) -> None:
        for lane, counts in summary.items():
            for name, value in counts.items():
                if name != "held":
                    self.settled[(lane, name)] += value

    def wake(self, session_id: str) -> None:
        """A session's change left another one behind: it catches up soon (not inside the
        first one's processing)."""
        for session in self.by_jid.values():
            if session.core.id == session_id:
                asyncio.get_running_loop().call_soon(session.catch_up)
                return

    def to_account(self, sender: RegisteredSession, kind: str, payload: Element) -> None:
        """A ``ToAccount`` command: the account's other live sessions hear of it soon (not
        inside the sender's processing), each with its own copy."""
        account = sender.core.account
        loop = asyncio.get_running_loop()
        for session in self.by_jid.values():
            if session is not sender and session.core.account == account \
                    and session.state != "ended":
                loop.call_soon(session.from_account, kind, copy.deepcopy(payload))

    def vouch(self, account: str, password: str) -> bool:
        """Whether a live session of ``account`` logged in with ``password`` (checked then by
        the server): lets a client resume while the server is unreachable."""
        return any(str(s.core.account) == account and s.upstream.password_is(password)
                   for s in self.by_jid.values() if s.state != "ended")

    def session_ended(self, session: RegisteredSession) -> None:
        if self.by_jid.get(session.jid) is session:
            del self.by_jid[session.jid]

    @property
    def sessions(self) -> list[LiveSession]:
        return list(self.by_jid.values())

    # After SASL ---------------------------------------------------------------------------------

    def _post_auth_features(self, upstream: UpstreamLink | None) -> list[Element]:
        bind = st.element("bind", namespace=ns.BIND)
        session = st.element("session", namespace=ns.SESSION)
        st.sub(session, "optional")
        features = [bind, session, st.element("sm", namespace=ns.SM)]
        for factory in self.factories:
            extra = getattr(factory, "stream_features", None)
            if extra is not None:
                features.extend(extra())
        if upstream is not None:
            # Entity capabilities (XEP-0115): the server's while the proxy adds nothing to
            # its disco#info, else recomputed from what the last bind learnt of the domain.
            server_caps = next((el for el in upstream.features if el.tag == _CAPS), None)
            server = ServerInfo(domain=self.domain_info)
            caps = caps_for(server, disco_additions(self.factories, server).domain,
                            server_caps)
            if caps is not None:
                features.append(copy.deepcopy(caps))
        return features

    async def establish(self, negotiation: ClientNegotiation, auth: AuthenticatedClient,
                       log: Any) -> tuple[LiveSession, list[Element], bool]:
        """Bind, take over or resume; returns the session, what to write to the client
        first, and whether it was a resumption. Raises NegotiationFailed when the client
        breaks the rules."""
        await negotiation.open_bound_stream(self._post_auth_features(auth.upstream))
        stream = auth.stream
        while True:
            el = await negotiation.next_element()
            if el.tag == _SM_ENABLE:
                stream.send(failed("unexpected-request", text="bind a resource first"))
            elif el.tag == _SM_RESUME:
                outcome = self._resume(auth, el, log)
                if isinstance(outcome, LiveSession):
                    return outcome, outcome.resume(parse_h(el) or 0), True
                stream.send(outcome)
            elif el.tag == st.IQ and el.get("type") == "set" and el.find(_BIND) is not None:
                bound = await self._bind(auth, el, log)
                if bound is not None:
                    return (*bound, False)
            elif el.tag == st.IQ:
                stream.send(st.error_reply(el, "not-authorized" if el.get("type") in (
                    "get", "set") else "bad-request", text="bind a resource first"))
            else:
                raise violation("not-authorized", "bind a resource first")

    def _resume(self, auth: AuthenticatedClient, el: Element, log: Any) -> LiveSession | Element:
        """The session to resume, or the ``<failed/>`` to answer with."""
        previd, h = el.get("previd", ""), parse_h(el)
        if not previd or h is None:
            return failed("bad-request", text="previd and a valid h are required")
        key = (str(auth.account), previd)
        session = self.by_sm_id.get(key)
        if session is None or session.state == "ended" or session.sm is None:
            tomb = self.tombstones.get(key)
            log.info("resume_failed", reason="item-not-found", known=tomb is not None)
            if tomb is not None and tomb[1] > time.monotonic():
                return failed("item-not-found", h=tomb[0])
            return failed("item-not-found")
        exc = session.edge.resume_problem(h)
        if exc is not None:
            raise NegotiationFailed("resume with h too high", codec.stream_error(
                "undefined-condition", str(exc), app_condition=exc.app_condition()))
        return session

    async def _bind(self, auth: AuthenticatedClient, el: Element,
                    log: Any) -> tuple[LiveSession, list[Element]] | None:
        resource_el = el.find(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}resource")
        resource = (resource_el.text or "").strip() if resource_el is not None else ""
        stream = auth.stream
        existing = self.by_jid.get(str(auth.account.with_resource(resource))) if resource else None
        if existing is not None and existing.state != "ended":
            # Takeover: the upstream session is kept as it is, not bound again.
            return existing, [self._bind_result(el, existing.core.jid), *existing.take_over()]
        refusal = bind_refusal(self._sessions_of(auth.account), self.config.abuse)
        if refusal is not None:
            stream.send(bind_refused(el, refusal))
            log.warning("session_refused", condition=refusal.condition, limit=refusal.limit,
                        resource=resource)
            return None
        if auth.upstream is None:  # logged in against a live session: the server is away
            stream.send(st.error_reply(el, "remote-server-timeout", error_type="wait",
                                       text="the legacy server is unreachable; resume or "
                                            "try again later"))
            log.info("bind_failed", reason="the server is unreachable", resource=resource)
            return None
        # An ended session of this very resource may still be finishing upstream: its
        # stream would conflict with the new bind, so it hands what it owes over first.
        owed = await self._hand_over(str(auth.account.with_resource(resource))) \
            if resource else []
        try:
            full = await auth.upstream.bind(resource or None, self.config.upstream.connect_timeout)
            server = await auth.upstream.discover(self.config.upstream.domain,
                                                  self.config.upstream.connect_timeout)
        except UpstreamBindFailed as exc:
            reply = exc.error_reply
            reply.set("id", el.get("id", ""))
            for attr in ("to", "from"):
                reply.attrib.pop(attr, None)
            stream.send(reply)
            log.info("bind_failed", reason=str(exc), resource=resource)
            return None
        except UpstreamUnavailable as exc:
            raise violation("remote-connection-failed",
                             "the legacy server failed during bind") from exc
        self.domain_info = server.domain or self.domain_info
        try:
            jid = Jid.parse(full)
        except InvalidJid as exc:
            raise violation("internal-server-error", "bad JID from the server") from exc
        if jid.bare != auth.account.bare:
            raise violation("internal-server-error", "the server bound another account")
        core = SessionCore(jid, self.factories, server)
        session = LiveSession(self, core, auth.upstream, self.config, self.store,
                              self.log.bind(jid=str(jid)), password=auth.password,
                              tls_context=self.upstream_tls, inspector=self.inspector,
                              journal=self.journal, archive=self.archive)
        previous = self.by_jid.get(str(jid))
        if previous is not None:  # the server resolved a resource conflict in our favour
            asyncio.get_running_loop().create_task(previous.end("resource bound again"))
        self.by_jid[str(jid)] = session
        log.info("bound", jid=str(jid))
        session.replay_pending()  # before anything the client sends now
        session.replay(owed, "handed over by the finishing session of this resource")
        return session, [self._bind_result(el, jid)]

    async def _hand_over(self, full_jid: str) -> list[Element]:
        for finishing in list(self.finishing_sessions):
            if finishing.jid == full_jid:
                return await finishing.hand_over()
        return []

    def _sessions_of(self, account: Jid) -> int:
        # A scan, not a counter kept in step with every end and takeover; one per bind.
        bare = account.bare
        return sum(1 for s in self.by_jid.values()
                   if s.core.account == bare and s.state != "ended")

    @staticmethod
    def _bind_result(request: Element, jid: Jid) -> Element:
        result = st.iq_result(request)
        result.attrib.pop("to", None)
        bind = st.sub(result, "bind", namespace=ns.BIND)
        st.sub(bind, "jid", text=str(jid))
        return result

    # Shutdown -----------------------------------------------------------------------------------

    async def stop(self) -> dict[str, int]:
        """Every session ends within ``shutdown.drain_timeout``: acks collected, the server's
        confirmations and last stanzas read, the rest stored. Returns the ledgers' totals."""
        shutdown = codec.stream_error("system-shutdown", "xmpp-front is stopping")
        deadline = asyncio.get_running_loop().time() + self.config.shutdown.drain_timeout
        live, finishing = self.sessions, list(self.finishing_sessions)
        results = await asyncio.gather(
            *(s.shutdown(deadline, shutdown) for s in live),
            *(s.finish(deadline) for s in finishing), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.log.error("shutdown_failed", error=repr(result))
        totals: dict[str, int] = {}
        for s in (*live, *finishing):
            for lane, counts in s.ledger.summary().items():
                for name, value in counts.items():
                    if name != "entered":
                        totals[f"{lane}_{name}"] = totals.get(f"{lane}_{name}", 0) + value
        return totals
