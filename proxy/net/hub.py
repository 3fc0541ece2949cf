"""The hub: every live session, and how an authenticated client connection gets one.

After SASL a client either binds a resource (a new session, or the takeover of a session
already bound to that resource) or resumes a stream-management session (XEP-0198 §5). The
decisions are the pure ``proxy.registry.Registry``'s; the hub keeps the dicts that find live
sessions (by full JID, by account and SM id, the finishing ones), answers the registry's
look-ups from them and carries out what it decided.
"""

from __future__ import annotations

import asyncio
import copy
import random
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any


from ..archive_store import ArchiveWriter
from ..commands import (
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
from ..config import Config
from ..inspection import Inspector
from ..metrics import Counters
from ..features.disco import caps_for
from ..registry import Registry
from ..session import DiscoShare, FeatureFactory, SessionCore, disco_additions
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from ..xmpp.jid import Jid
from .client_side import AuthenticatedClient, ClientNegotiation, NegotiationFailed
from ..journal import Journal
from .live import LiveSession, SessionStore
from .ports import FinishingSession, RegisteredSession
from .upstream import UpstreamBindFailed, UpstreamLink, UpstreamUnavailable
from .upstream_side import CLOSE_READ, CLOSE_WAIT
from ..xmpp.disco import DiscoInfo, ServerInfo
from ..xmpp.stanza import Element


_CAPS = ns.qname(ns.CAPS, "c")


class Hub:
    def __init__(self, config: Config, factories: Sequence[FeatureFactory],
                 store: SessionStore | None,
                 log: Any, inspector: Inspector | None = None,
                 journal: Journal | None = None, counters: Counters | None = None,
                 archive: ArchiveWriter | None = None) -> None:
        self.config = config
        self.journal = journal
        self.counters = counters  # for /metrics: resumptions, and what sessions relay
        self.archive = archive
        self.inspector = inspector
        self.factories = list(factories)
        self.store = store
        self.log = log
        self.by_jid: dict[str, LiveSession] = {}
        # The same sessions by account (bare JID) and by session id, kept in step with
        # ``by_jid`` (``_add``, ``session_ended``): a bind, a resume's vouch, a carbon copy
        # and a wake look at one account's sessions, not at every session of the proxy.
        # A list, not a dict: most accounts have one session (a dict is 4 times the size).
        self.by_account: dict[Jid, list[LiveSession]] = {}
        self.by_id: dict[str, LiveSession] = {}
        self.by_sm_id: dict[tuple[str, str], LiveSession] = {}
        # Ended sessions whose upstream side still waits for the server's confirmations.
        self.finishing_sessions: set[FinishingSession] = set()
        # Sessions whose end is under way (closing their upstream stream): a stop waits
        # for them as for the live ones.
        self.ending: set[RegisteredSession] = set()
        # How the stanzas of every session that is gone left its ledger (for /metrics).
        self.settled: Counter[tuple[str, str]] = Counter()
        # The decisions on bind, takeover and resume, and the ended sessions' last counts.
        self.registry = Registry(config.abuse, max_resume_timeout=(
            config.stream_management.max_resume_timeout))
        # Each served domain's disco#info as the last bind of one of its accounts found it
        # (for the caps hash offered before the next bind), by the domain's name.
        self.domain_info: dict[str, DiscoInfo] = {}
        self.disco = DiscoShare(self.factories)  # one ServerInfo per domain, not per session
        self.rng = random.Random()  # every session's reconnection jitter (ports.py)

    def reconfigure(self, config: Config, inspector: Inspector | None) -> None:
        """A reload: binds, resumptions and new sessions from now on use these; live
        sessions keep the configuration they were made with (a new session takes its
        domain's configuration and upstream TLS context from its login)."""
        self.config = config
        self.inspector = inspector
        self.registry.reconfigure(config.abuse, max_resume_timeout=(
            config.stream_management.max_resume_timeout))

    # Registry ----------------------------------------------------------------------------------

    def new_sm_id(self) -> str:
        return secrets.token_urlsafe(18)

    def sm_registered(self, session: RegisteredSession, sm_id: str | None,
                      inbound: int) -> None:
        """A session's stream management became resumable under ``sm_id``, or ended (None,
        with its last count for a late ``<resume/>``)."""
        if sm_id is not None:
            assert isinstance(session, LiveSession)  # the hub registers only its own
            session.sm_key = (session.account, sm_id)
            self.by_sm_id[session.sm_key] = session
            return
        key, session.sm_key = session.sm_key, None
        if key is not None and self.by_sm_id.pop(key, None) is not None:
            self.registry.sm_ended(key, inbound)

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
        session = self.by_id.get(session_id)
        if session is not None:
            asyncio.get_running_loop().call_soon(session.catch_up)

    def to_account(self, sender: RegisteredSession, kind: str, payload: Element) -> None:
        """A ``ToAccount`` command: the account's other live sessions hear of it soon (not
        inside the sender's processing), each with its own copy."""
        account = sender.core.account
        loop = asyncio.get_running_loop()
        for session in list(self.by_account.get(account, ())):
            if session is not sender and session.state != "ended":
                loop.call_soon(session.from_account, kind, copy.deepcopy(payload))

    def vouch(self, account: str, password: str) -> bool:
        """Whether a live session of ``account`` logged in with ``password`` (checked then by
        the server): lets a client resume while the server is unreachable."""
        try:
            bare = Jid.parse(account).bare
        except ValueError:
            return False
        return any(s.upstream.password_is(password)
                   for s in self.by_account.get(bare, ()) if s.state != "ended")

    def session_ended(self, session: RegisteredSession) -> None:
        if self.by_jid.get(session.jid) is session:
            del self.by_jid[session.jid]
            assert isinstance(session, LiveSession)  # the only kind by_jid holds
            self._forget(session)
        self.ending.add(session)

    def session_gone(self, session: RegisteredSession) -> None:
        self.ending.discard(session)

    @property
    def sessions(self) -> list[LiveSession]:
        return list(self.by_jid.values())

    # After SASL ---------------------------------------------------------------------------------

    def _post_auth_features(self, upstream: UpstreamLink | None,
                            domain: str) -> list[Element]:
        bind = st.element("bind", namespace=ns.BIND)
        session = st.element("session", namespace=ns.SESSION)
        st.sub(session, "optional")
        features = [bind, session, st.element("sm", namespace=ns.SM)]
        for factory in self.factories:
            features.extend(factory.stream_features())
        if upstream is not None:
            # Entity capabilities (XEP-0115): the server's while the proxy adds nothing to
            # its disco#info, else recomputed from what the last bind learnt of the domain.
            server_caps = next((el for el in upstream.features if el.tag == _CAPS), None)
            server = ServerInfo(domain=self.domain_info.get(domain))
            caps = caps_for(server, disco_additions(self.factories, server).domain,
                            server_caps)
            if caps is not None:
                features.append(copy.deepcopy(caps))
        return features

    async def establish(self, negotiation: ClientNegotiation, auth: AuthenticatedClient,
                       log: Any) -> tuple[LiveSession, list[Element], bool]:
        """Bind, take over or resume, as the ``Registry`` decides; returns the session, what
        to write to the client first, and whether it was a resumption. Raises
        NegotiationFailed when the client breaks the rules."""
        domain = auth.domain.name if auth.domain is not None else auth.account.domain
        await negotiation.open_bound_stream(self._post_auth_features(auth.upstream, domain))
        while True:
            el = await negotiation.next_element()
            outcome = await self._carry_out(self.registry.element(el), el, auth, log)
            if outcome is not None:
                return outcome

    async def _carry_out(self, commands: Sequence[RegistryCommand], el: Element,
                         auth: AuthenticatedClient, log: Any
                         ) -> tuple[LiveSession, list[Element], bool] | None:
        """Carry out the registry's commands for ``el``: the look-ups it asks for, and the
        session it settles on (None: the client was answered, the next element decides)."""
        outcome: tuple[LiveSession, list[Element], bool] | None = None
        for command in commands:
            if isinstance(command, ToClient):
                auth.stream.send(command.element)
            elif isinstance(command, Log):
                getattr(log, command.level)(command.event, **command.fields)
            elif isinstance(command, Count):
                if self.counters is not None:
                    self.counters.count(getattr(self.counters, command.table), command.key)
            elif isinstance(command, FailNegotiation):
                raise NegotiationFailed(command.reason, command.error)
            elif isinstance(command, LookUpResume):
                session = self.by_sm_id.get((str(auth.account), command.previd))
                resumable = session is not None and session.state != "ended" \
                    and session.sm is not None
                outcome = await self._carry_out(self.registry.resume(
                    str(auth.account), command.previd, command.h, resumable=resumable,
                    problem=session.edge.resume_problem(command.h)
                    if session is not None and resumable else None), el, auth, log)
            elif isinstance(command, Resume):
                session = self.by_sm_id[(str(auth.account), command.previd)]
                outcome = session, session.resume(command.h), True
            elif isinstance(command, LookUpBind):
                full = str(auth.account.with_resource(command.resource)) \
                    if command.resource else None
                existing = self.by_jid.get(full) if full is not None else None
                live = existing is not None and existing.state != "ended"
                outcome = await self._carry_out(self.registry.bind(
                    el, auth.account,
                    live_resource=existing.core.jid if existing is not None and live else None,
                    sessions_of_account=self._sessions_of(auth.account),
                    server_reachable=auth.upstream is not None,
                    finishing=any(f.jid == full for f in self.finishing_sessions)),
                    el, auth, log)
            elif isinstance(command, TakeOver):
                existing = self.by_jid[command.jid]
                outcome = existing, [command.result, *existing.take_over()], False
            elif isinstance(command, BindUpstream):
                outcome = await self._bind(auth, el, command, log)
            elif isinstance(command, ReplacePrevious):
                previous = self.by_jid.get(command.jid)
                if previous is not None:
                    asyncio.get_running_loop().create_task(previous.end(command.reason))
        return outcome

    async def _bind(self, auth: AuthenticatedClient, el: Element, command: BindUpstream,
                    log: Any) -> tuple[LiveSession, list[Element], bool] | None:
        """The upstream bind and disco the registry asked for, then a new session."""
        assert auth.upstream is not None and auth.domain is not None
        owed = await self._hand_over(command.hand_over_from) \
            if command.hand_over_from is not None else []
        # The session's server is its domain's: bind, discovery and every reconnection.
        config = auth.config
        try:
            full = await auth.upstream.bind(command.resource,
                                            config.upstream.connect_timeout)
            server = await auth.upstream.discover(config.upstream.domain,
                                                  config.upstream.discovery_timeout)
        except UpstreamBindFailed as exc:
            await self._carry_out(self.registry.bind_refused_upstream(
                el, exc.error_reply, str(exc)), el, auth, log)
            return None
        except UpstreamUnavailable as exc:
            try:
                await self._carry_out(self.registry.bind_broke(), el, auth, log)
            except NegotiationFailed as failure:
                raise failure from exc
            return None
        server, additions = self.disco.share(auth.domain.name, server)
        auth.upstream.server_info = server  # the link keeps the shared one too
        if server.domain is not None:
            self.domain_info[auth.domain.name] = server.domain
        commands = self.registry.bound(el, auth.account, full, previous=full in self.by_jid,
                                       domain_known=server.domain is not None,
                                       account_known=server.account is not None)
        await self._carry_out([c for c in commands if not isinstance(c, NewSession)],
                              el, auth, log)
        (new,) = [c for c in commands if isinstance(c, NewSession)]
        jid = new.jid
        core = SessionCore(jid, self.factories, server, additions)
        session = LiveSession(self, core, auth.upstream, config, self.store,
                              self.log, password=auth.password,
                              tls_context=auth.upstream_tls,
                              inspector=self.inspector,
                              journal=self.journal, counters=self.counters,
                              archive=self.archive)
        self._add(session)  # keyed by the session's own JID string: one per session
        log.info("bound", jid=session.jid, session=core.id, account=str(jid.bare))
        session.replay_pending()  # before anything the client sends now
        session.replay(owed, "handed over by the finishing session of this resource")
        return session, [new.result], False

    async def _hand_over(self, full_jid: str) -> list[Element]:
        for finishing in list(self.finishing_sessions):
            if finishing.jid == full_jid:
                return await finishing.hand_over()
        return []

    def _sessions_of(self, account: Jid) -> int:
        return sum(1 for s in self.by_account.get(account.bare, ())
                   if s.state != "ended")

    def _add(self, session: LiveSession) -> None:
        previous = self.by_jid.get(session.jid)
        if previous is not None:
            self._forget(previous)
        self.by_jid[session.jid] = session
        self.by_account.setdefault(session.core.account, []).append(session)
        self.by_id[session.core.id] = session

    def _forget(self, session: LiveSession) -> None:
        mine = self.by_account.get(session.core.account)
        if mine is not None and session in mine:
            mine.remove(session)
            if not mine:
                del self.by_account[session.core.account]
        if self.by_id.get(session.core.id) is session:
            del self.by_id[session.core.id]

    # Shutdown -----------------------------------------------------------------------------------

    async def stop(self) -> dict[str, int]:
        """Every session ends within ``shutdown.drain_timeout``: acks collected, the server's
        confirmations and last stanzas read, the rest stored. Returns the ledgers' totals
        and how many sessions were settled (``sessions``).

        All sessions are worked on at once: a stop takes as long as the slowest session's
        wait, not the sum of them (a client or server that does not answer costs the
        deadline once, not once per session)."""
        shutdown = codec.stream_error("system-shutdown", "xmpp-front is stopping")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown.drain_timeout
        live, finishing = self.sessions, list(self.finishing_sessions)
        # Ended on their own just before the stop (a client gone): their ends are awaited
        # too, so their ledgers are settled and counted here, not cut short. Such an end
        # bounds its own wait for the server (CLOSE_READ), maybe past our deadline.
        ending = [s for s in self.ending if isinstance(s, LiveSession)]
        ends_by = max(deadline, loop.time() + CLOSE_READ + 2 * CLOSE_WAIT)
        results = await asyncio.gather(
            *(s.shutdown(deadline, shutdown) for s in live),
            *(s.finish(deadline) for s in finishing),
            _wait_until(lambda: not self.ending, ends_by), return_exceptions=True)
        # An end under way may have left its upstream side finishing meanwhile.
        late = [f for f in self.finishing_sessions if f not in finishing]
        results += await asyncio.gather(*(f.finish(deadline) for f in late),
                                        return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.log.error("shutdown_failed", error=repr(result))
        settled = {id(s): s for s in (*live, *finishing, *ending, *late)}
        totals: dict[str, int] = {"sessions": len(settled)}
        for s in settled.values():
            for lane, counts in s.ledger.summary().items():
                for name, value in counts.items():
                    if name != "entered":
                        totals[f"{lane}_{name}"] = totals.get(f"{lane}_{name}", 0) + value
        return totals


async def _wait_until(condition: Callable[[], bool], until: float) -> None:
    """Poll ``condition`` until it holds or the loop time ``until`` passes (the stop only:
    one poller for all the sessions ending meanwhile)."""
    loop = asyncio.get_running_loop()
    while not condition() and loop.time() < until:
        await asyncio.sleep(min(0.02, max(0.0, until - loop.time())))
