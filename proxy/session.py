"""Where the client side and the upstream side meet: the per-session relay core.

Sans-IO: it takes stanzas and returns what to send where. The feature pipeline (roster
versioning, rules, ...) plugs in here; each feature may pass, change, answer, hold or drop a
stanza, add stream features and disco features, and send stanzas of its own.

Order: a stanza from the client goes through the features first to last, then upstream; a
stanza from the server goes through them last to first, then to the client. So the first
feature sits at the client's edge (rules see what the client sent and what it will get).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from .xmpp.disco import Additions, FrozenAdditions, ServerInfo
from .xmpp.jid import Jid
from .xmpp.stanza import IQ, MESSAGE, PRESENCE, Element

if TYPE_CHECKING:
    from .commands import Command


STANZA_TAGS = (MESSAGE, PRESENCE, IQ)
_TAG_INDEX = {tag: index for index, tag in enumerate(STANZA_TAGS)}  # a constant
# Stanzas the proxy sends itself carry ids with this prefix; their replies are its own.
OWN_ID_PREFIX = "xf-"


class Outputs:
    """What one input produced, in order, per direction, and any other commands for the
    shell (``proxy/commands.py``: what the rules matched and asked to log, ...).

    A plain slotted class, not a dataclass: one is made per stanza in each direction."""

    __slots__ = ("commands", "to_client", "to_upstream")

    def __init__(self, to_client: list[Element] | None = None,
                 to_upstream: list[Element] | None = None,
                 commands: list[Command] | None = None) -> None:
        self.to_client: list[Element] = [] if to_client is None else to_client
        self.to_upstream: list[Element] = [] if to_upstream is None else to_upstream
        self.commands: list[Command] = [] if commands is None else commands

    def __repr__(self) -> str:
        return (f"Outputs(to_client={self.to_client!r}, to_upstream={self.to_upstream!r}, "
                f"commands={self.commands!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Outputs):
            return NotImplemented
        return (self.to_client, self.to_upstream, self.commands) == (
            other.to_client, other.to_upstream, other.commands)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def extend(self, other: Outputs) -> None:
        self.to_client.extend(other.to_client)
        self.to_upstream.extend(other.to_upstream)
        self.commands.extend(other.commands)


class Feature:
    """A value-add in the pipeline, one instance per session. Every hook is optional.

    ``from_client``/``from_upstream`` return the stanza (maybe changed) to pass it on, or
    None when the feature consumed it; answers and stanzas of its own go into ``out``.

    ``client_tags``/``upstream_tags``: the stanza tags a feature's hook is about (e.g.
    ``{st.IQ}``), when it returns every other stanza unchanged at once; the relay path then
    does not call it for those. None: every stanza.
    """

    # No instance dict unless a subclass wants one: a session holds a dozen features, and
    # a slotted feature is a few hundred bytes smaller.
    __slots__ = ()

    client_tags: ClassVar[frozenset[str] | None] = None
    upstream_tags: ClassVar[frozenset[str] | None] = None

    def stream_features(self) -> Iterable[Element]:
        """Children for the post-authentication ``<stream:features/>``."""
        return ()

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        return el

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        return el

    def upstream_restored(self, session: SessionCore, out: Outputs) -> None:
        """The upstream session was re-established after an outage (resend state here)."""

    def upstream_lost(self, session: SessionCore, out: Outputs) -> None:
        """The upstream connection went down (the session lives on: an outage)."""

    def from_account(self, session: SessionCore, kind: str, payload: Element,
                     out: Outputs) -> None:
        """Another session of the account sent this one something (a ``ToAccount``
        command: a carbon copy, a blocklist push, ...); ``kind`` says what."""

    def catch_up(self, session: SessionCore, out: Outputs) -> None:
        """Another session asked this one to catch up (a ``CatchUp`` command)."""

    def client_nonza(self, session: SessionCore, el: Element, out: Outputs) -> bool:
        """A top-level element from the client that is not a stanza (e.g. XEP-0352's
        ``<inactive/>``); True when this feature handled it."""
        return False

    def client_attached(self, session: SessionCore, out: Outputs) -> None:
        """A client connection became the session's (login, resumption, takeover)."""

    def client_detached(self, session: SessionCore, unacked: Sequence[Element],
                        out: Outputs) -> None:
        """The client's link is gone and the session hibernates (XEP-0198); ``unacked``:
        what it was sent and never acknowledged (it may never have seen them)."""

    def offline_stored(self, session: SessionCore, el: Element, upstream_usable: bool,
                       out: Outputs) -> None:
        """A server stanza of this session went to the proxy's store for the account's next
        login (the session ends, or has ended and still reads the server); only commands
        are carried out. ``upstream_usable``: its link can still take a stanza."""

    def timer_fired(self, session: SessionCore, name: str, out: Outputs) -> None:
        """A timer this feature started (a ``StartTimer`` in ``Outputs.commands``) fired."""

    def from_store(self, session: SessionCore, el: Element) -> Element | None:
        """A stanza kept for the account, about to be delivered after initial presence;
        None to drop it (e.g. a copy the client already has)."""
        return el

    def store_result(self, session: SessionCore, token: str, result: object,
                     out: Outputs) -> None:
        """What a store request of a feature's (an ``ArchiveQuery`` with ``token``) found,
        back from the store's thread; every feature hears it, the one whose token it is
        acts on it."""

    def closed(self, session: SessionCore) -> None:
        """The session ended for good."""


class FeatureFactory:
    """Made once at start-up (holding shared state: store, rules, config); makes the
    per-session feature instances, and says what the feature adds to the stream features
    and to the server's disco#info (before any session exists: the entity caps hash in the
    stream features is computed from it)."""

    def stream_features(self) -> Iterable[Element]:
        """Children for the post-authentication ``<stream:features/>``."""
        return ()

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        """Add the feature vars this feature provides to the domain's and the account's
        disco#info, given what the server itself has (emulate only what it lacks)."""

    def create(self, session: SessionCore) -> Feature:
        raise NotImplementedError


def disco_additions(factories: Sequence[FeatureFactory], server: ServerInfo) -> Additions:
    additions = Additions()
    for factory in factories:
        factory.disco(server, additions)
    return additions


def _by_tag(hooked: tuple[Feature, ...], tags_attr: str) -> tuple[tuple[Feature, ...], ...]:
    """Per stanza tag (in ``STANZA_TAGS`` order: a tuple, not a dict per session), the
    features of ``hooked`` whose hook is about it; a tag whose features are all of them
    shares ``hooked`` itself, and equal tuples are one."""
    # Keyed by identity: a feature need not be hashable.
    made: dict[tuple[int, ...], tuple[Feature, ...]] = {tuple(map(id, hooked)): hooked}
    by_tag = []
    for tag in STANZA_TAGS:
        chosen = tuple(f for f in hooked
                       if getattr(f, tags_attr) is None or tag in getattr(f, tags_attr))
        by_tag.append(made.setdefault(tuple(map(id, chosen)), chosen))
    return tuple(by_tag)


class DiscoShare:
    """What the last bind of each served domain found of its server (``ServerInfo``) and
    what the pipeline adds to it: a new session whose server said the same of itself gets
    these very objects, not copies of their sets (every session of a domain, as a rule).
    Both are frozen, so no session can change another's."""

    def __init__(self, factories: Sequence[FeatureFactory]) -> None:
        self.factories = list(factories)
        self._last: dict[str, tuple[ServerInfo, FrozenAdditions]] = {}

    def share(self, domain: str, server: ServerInfo) -> tuple[ServerInfo, FrozenAdditions]:
        last = self._last.get(domain)
        if last is not None and last[0] == server:
            return last
        shared = server, disco_additions(self.factories, server).frozen()
        self._last[domain] = shared
        return shared


class SessionCore:
    """One logged-in client resource, as the relay sees it."""

    __slots__ = (
        "_client_hooks", "_client_hooks_by_tag", "_ids", "_jid_text", "_upstream_hooks",
        "_upstream_hooks_by_tag", "account", "additions", "client_inactive", "features", "id",
        "jid", "server", "upstream_up",
    )

    def __init__(self, jid: Jid, factories: Sequence[FeatureFactory] = (),
                 server: ServerInfo | None = None,
                 additions: FrozenAdditions | None = None) -> None:
        self.jid = jid
        self.account = jid.bare
        self.id = secrets.token_hex(6)
        self._jid_text = str(jid)
        self._ids = itertools.count(1)
        self.upstream_up = True
        self.client_inactive = False  # XEP-0352: the client said it is inactive (csi feature)
        # What the server said of itself at the bind (kept through outages: what the proxy
        # emulates for this session stays the same until it ends), and what the proxy adds.
        self.server = server or ServerInfo()
        # ``additions``: the pipeline's for this very ``server`` (``DiscoShare``).
        self.additions = (disco_additions(factories, self.server).frozen()
                          if additions is None else additions)
        self.features: list[Feature] = [factory.create(self) for factory in factories]
        # The relay path calls only the features that have a stanza hook of their own (the
        # others would return the stanza unchanged), in pipeline order, and per stanza tag
        # only those about it (``Feature.client_tags``/``upstream_tags``). Tuples of the
        # features, not lists of bound methods (a method object each: 4 KiB per session),
        # and one tuple where several tags call the same features.
        client = [f for f in self.features if type(f).from_client is not Feature.from_client]
        upstream = [f for f in reversed(self.features)
                    if type(f).from_upstream is not Feature.from_upstream]
        self._client_hooks = tuple(client)
        self._upstream_hooks = tuple(upstream)
        self._client_hooks_by_tag = _by_tag(self._client_hooks, "client_tags")
        self._upstream_hooks_by_tag = _by_tag(self._upstream_hooks, "upstream_tags")

    def new_id(self, purpose: str) -> str:
        """An id for a stanza the proxy itself sends (unique within the session)."""
        return f"{OWN_ID_PREFIX}{purpose}-{self.id}-{next(self._ids)}"

    def stream_features(self) -> list[Element]:
        return [el for feature in self.features for el in feature.stream_features()]

    def disco_features(self) -> list[str]:
        """What the proxy adds to the server domain's disco#info for this session."""
        return sorted(self.additions.domain)

    def from_client(self, el: Element) -> Outputs:
        out = Outputs()
        # RFC 6120 §8.1.2.1: the server stamps the sender's full JID; a client cannot
        # speak as anybody else, whatever it wrote.
        el.set("from", self._jid_text)
        result: Element | None = el
        index = _TAG_INDEX.get(el.tag)
        hooks = self._client_hooks if index is None else self._client_hooks_by_tag[index]
        for feature in hooks:
            result = feature.from_client(self, result, out)
            if result is None:
                return out
        out.to_upstream.append(result)
        return out

    def from_upstream(self, el: Element) -> Outputs:
        out = Outputs()
        result: Element | None = el
        index = _TAG_INDEX.get(el.tag)
        hooks = self._upstream_hooks if index is None else self._upstream_hooks_by_tag[index]
        for feature in hooks:
            result = feature.from_upstream(self, result, out)
            if result is None:
                return out
        out.to_client.append(result)
        return out

    def upstream_restored(self) -> Outputs:
        self.upstream_up = True
        out = Outputs()
        for feature in self.features:
            feature.upstream_restored(self, out)
        return out

    def upstream_lost(self) -> Outputs:
        self.upstream_up = False
        out = Outputs()
        for feature in self.features:
            feature.upstream_lost(self, out)
        return out

    def from_account(self, kind: str, payload: Element) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.from_account(self, kind, payload, out)
        return out

    def catch_up(self) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.catch_up(self, out)
        return out

    def client_nonza(self, el: Element) -> Outputs | None:
        """A nonza a feature handles, or None (the stream's own, e.g. XEP-0198's)."""
        out = Outputs()
        for feature in self.features:
            if feature.client_nonza(self, el, out):
                return out
        return None

    def timer_fired(self, name: str) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.timer_fired(self, name, out)
        return out

    def from_store(self, el: Element) -> Element | None:
        result: Element | None = el
        for feature in reversed(self.features):
            result = feature.from_store(self, result)
            if result is None:
                return None
        return result

    def store_result(self, token: str, result: object) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.store_result(self, token, result, out)
        return out

    def client_attached(self) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.client_attached(self, out)
        return out

    def client_detached(self, unacked: Sequence[Element]) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.client_detached(self, unacked, out)
        return out

    def offline_stored(self, el: Element, *, upstream_usable: bool) -> Outputs:
        out = Outputs()
        for feature in self.features:
            feature.offline_stored(self, el, upstream_usable, out)
        return out

    def closed(self) -> None:
        for feature in self.features:
            feature.closed(self)
