"""Jabber IDs (RFC 7622), parsed just enough for a relay: split, compare, rebuild.

The legacy server remains the authority on what is a valid address; the proxy only needs to
tell accounts (bare JIDs) and sessions (full JIDs) apart and to compare them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PART_BYTES = 1023  # RFC 7622 §3.2-3.4


class InvalidJid(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Jid:
    local: str
    domain: str
    resource: str
    # The text, made at the first str() and kept: a session's JID is written into many
    # places (its logger, the hub's keys, the cores' stamps), one string instead of one each.
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> Jid:
        rest, slash, resource = text.partition("/")
        local, at, domain = rest.rpartition("@")
        if not at:
            local, domain = "", rest
        if slash and not resource:
            raise InvalidJid(f"empty resource in {text!r}")
        if at and not local:
            raise InvalidJid(f"empty localpart in {text!r}")
        domain = domain.rstrip(".").lower()
        if not domain:
            raise InvalidJid(f"empty domain in {text!r}")
        for part in (local, domain, resource):
            if len(part.encode()) > MAX_PART_BYTES:
                raise InvalidJid("a part of the JID is longer than 1023 bytes")
        if any(c in local for c in '"&\'/:<>@ '):
            raise InvalidJid(f"forbidden character in localpart of {text!r}")
        return cls(local.lower(), domain, resource)

    @property
    def bare(self) -> Jid:
        return Jid(self.local, self.domain, "")

    @property
    def is_bare(self) -> bool:
        return not self.resource

    def with_resource(self, resource: str) -> Jid:
        return Jid(self.local, self.domain, resource)

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = f"{self.local}@{self.domain}" if self.local else self.domain
            if self.resource:
                text = f"{text}/{self.resource}"
            object.__setattr__(self, "_text", text)
        return text


def bare_of(text: str | None) -> str | None:
    """The bare JID of an address as written on a stanza; None for none or a malformed one."""
    if not text:
        return None
    try:
        return str(Jid.parse(text).bare)
    except InvalidJid:
        return None
