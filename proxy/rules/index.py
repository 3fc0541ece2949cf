"""Per-stanza candidate selection: which rules can possibly match, found without trying each.

Rules are grouped by direction, stanza kind and stanza type (a :class:`Plan` for each type
some rule names, and a default plan with only the rules that name none). Inside a plan each
rule gets at most one *prefilter*, a condition that is necessary for it to match and that is
checked for all rules of the plan at once:

- a ``from`` or ``to`` JID pattern: dictionaries of the exact full JIDs, bare JIDs and domains
  (one lookup each), and one alternation of all the globs (tried once; only when it matches
  are the rules' own globs tried);
- a ``body`` regex: one alternation of all the plan's body regexes, searched once per body;
- an XPath guard (see :func:`~.match.xpath_guard`): a map from child namespace to rules.

Rules with none of these are always candidates. A candidate still goes through
:meth:`CompiledRule.matches` in full, so a prefilter only ever skips rules that cannot match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .match import IMPLICIT_TYPE, JidMatcher, StanzaFacts

if TYPE_CHECKING:
    from .compiler import CompiledRule

# Leading global inline flags, e.g. "(?i)"; turned into a scoped group when combining.
_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")
# Constructs whose meaning depends on group numbers or names: such a regex is not combined.
_GROUP_DEPENDENT = re.compile(r"\\[1-9g]|\(\?P|\(\?\(|\(\?<(?![=!])")


def _split_flags(pattern: re.Pattern[str]) -> tuple[str, str] | None:
    """``pattern`` as (its leading global inline flags, the rest), or None when it cannot
    safely be made one alternative of a bigger regex."""
    src = pattern.pattern
    if _GROUP_DEPENDENT.search(src) or pattern.flags & (re.VERBOSE | re.LOCALE):
        return None
    flags = ""
    while (m := _LEADING_FLAGS.match(src)) is not None:
        flags += m.group(1)
        src = src[m.end():]
    if "x" in flags or "L" in flags:
        return None
    return "".join(sorted(set(flags) - {"u"})), src


def combine_regexes(patterns: Sequence[tuple[int, re.Pattern[str]]]
                    ) -> list[tuple[re.Pattern[str], list[int]]] | None:
    """For ``(position, regex)`` pairs, regexes each found in a text whenever one of the
    regexes it stands for is, with their positions; None when that cannot be done safely.
    Regexes with the same leading flags share one alternation under those flags, so that
    ``re`` can factor out common prefixes (``(?i)\\bkey1\\b|\\bkey2\\b`` is searched
    about as fast as one of them). Used only as a prefilter."""
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for pos, p in patterns:
        split = _split_flags(p)
        if split is None:
            return None
        sources, positions = groups.setdefault(split[0], ([], []))
        sources.append(split[1])
        positions.append(pos)
    combined = []
    for flags, (sources, positions) in groups.items():
        head = f"(?{flags})" if flags else ""
        try:
            rx = re.compile(head + "|".join(f"(?:{s})" for s in sources))
        except (re.error, OverflowError, RecursionError):
            return None
        combined.append((rx, positions))
    return combined


class JidIndex:
    """The ``from`` (or ``to``) patterns of several rules, as one lookup."""

    __slots__ = ("bare", "bare_glob", "bare_glob_rules", "domains", "full", "full_glob",
                 "full_glob_rules")

    def __init__(self, rules: list[tuple[int, JidMatcher]]) -> None:
        self.full: dict[str, list[int]] = {}
        self.bare: dict[str, list[int]] = {}
        self.domains: dict[str, list[int]] = {}
        self.bare_glob_rules: list[tuple[int, re.Pattern[str]]] = []
        self.full_glob_rules: list[tuple[int, re.Pattern[str]]] = []
        for pos, m in rules:
            for keys, table in ((m.full, self.full), (m.bare, self.bare),
                                (m.domains, self.domains)):
                for key in keys:
                    table.setdefault(key, []).append(pos)
            if m.bare_glob is not None:
                self.bare_glob_rules.append((pos, m.bare_glob))
            if m.full_glob is not None:
                self.full_glob_rules.append((pos, m.full_glob))
        self.bare_glob = _any_of([rx for _, rx in self.bare_glob_rules])
        self.full_glob = _any_of([rx for _, rx in self.full_glob_rules])

    def hits(self, parts: tuple[str, str, str | None] | None, out: list[int]) -> None:
        """Adds to ``out`` the rules whose patterns match (see :meth:`JidMatcher.matches`)."""
        if parts is None:
            return
        bare, domain, full = parts
        found = self.bare.get(bare)
        if found:
            out += found
        found = self.domains.get(domain)
        if found:
            out += found
        if self.bare_glob is not None and self.bare_glob.match(bare):
            out += [pos for pos, rx in self.bare_glob_rules if rx.match(bare)]
        if full is None:
            return
        found = self.full.get(full)
        if found:
            out += found
        if self.full_glob is not None and self.full_glob.match(full):
            out += [pos for pos, rx in self.full_glob_rules if rx.match(full)]


def _any_of(globs: list[re.Pattern[str]]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching (``match``) where any of ``globs`` does."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{rx.pattern})" for rx in globs), re.I)


class Plan:
    """The rules that can apply to stanzas of one direction, kind and type, with their
    prefilters."""

    __slots__ = ("always", "body", "from_", "guarded", "guards", "rules", "to")

    def __init__(self, rules: Sequence[tuple[int, CompiledRule]]) -> None:
        """``rules``: (position in the rule set, rule), in order."""
        self.rules = tuple(pos for pos, _ in rules)  # every rule of the plan, in order
        always: list[int] = []
        from_: list[tuple[int, JidMatcher]] = []
        to: list[tuple[int, JidMatcher]] = []
        body: list[tuple[int, re.Pattern[str]]] = []
        self.guarded: dict[str, list[int]] = {}
        for pos, rule in rules:
            if rule.from_ is not None:
                from_.append((pos, rule.from_))
            elif rule.to is not None:
                to.append((pos, rule.to))
            elif rule.body is not None:
                body.append((pos, rule.body))
            elif rule.xpath is not None and rule.guard is not None:
                for uri in rule.guard:
                    self.guarded.setdefault(uri, []).append(pos)
            else:
                always.append(pos)
        combined = combine_regexes(body) if body else []
        if combined is None:  # cannot be combined: each rule checks its own
            always = sorted(always + [pos for pos, _ in body])
            combined = []
        self.body = combined
        self.always = tuple(always)
        self.from_ = JidIndex(from_) if from_ else None
        self.to = JidIndex(to) if to else None
        self.guards = bool(self.guarded)  # whether the children's namespaces are needed

    def candidates(self, facts: StanzaFacts, after: int) -> Sequence[int]:
        """Positions of the rules that may match, in order, only those after ``after``."""
        extra: list[int] = []
        if self.from_ is not None:
            self.from_.hits(facts.jid("from"), extra)
        if self.to is not None:
            self.to.hits(facts.jid("to"), extra)
        if self.body:
            bodies = facts.bodies()
            if bodies:
                for rx, positions in self.body:
                    search = rx.search
                    for text in bodies:
                        if search(text):
                            extra += positions
                            break
        if self.guarded:
            children = facts.children()
            if children:
                guarded = self.guarded
                for uri in children:
                    found = guarded.get(uri)
                    if found:
                        extra += found
        if extra:
            result: Sequence[int] = sorted(set(extra).union(self.always))
        else:
            result = self.always
        if after >= 0:
            return [p for p in result if p > after]
        return result


class KindIndex:
    """The plans for one direction and stanza kind, by stanza type."""

    __slots__ = ("default", "implicit", "plans")

    def __init__(self, tag: str, rules: Sequence[tuple[int, CompiledRule]]) -> None:
        """``rules``: (position in the rule set, rule) for this direction and kind."""
        self.implicit = IMPLICIT_TYPE[tag]  # the type of a stanza without one
        types: set[str] = set()
        for _, r in rules:
            if r.types is not None:
                types |= r.types
        self.plans: dict[str, Plan] = {
            t: Plan([(p, r) for p, r in rules if r.types is None or t in r.types])
            for t in sorted(types)}
        # Any other type (or an unknown one): only the rules that name no type.
        self.default = Plan([(p, r) for p, r in rules if r.types is None])

    def plan(self, type_: str) -> Plan:
        return self.plans.get(type_, self.default)
