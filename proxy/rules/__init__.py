"""Rule-based stanza rewriting: YAML rules compiled once at load, applied per stanza.

Sans-IO and socket-free. :meth:`RuleSet.load` reads rule files, validates every rule and
compiles what a rule needs (XPath objects with their namespace map, regular expressions, the
elements to add, JID matchers), all or nothing: the first problem raises :class:`RuleError`
naming the file, the rule and the problem. :meth:`RuleSet.apply` then only runs cheap
precompiled checks: rules are indexed by direction and stanza kind, and inside a rule the
type and address checks come before the body regex and the XPath.

A rule set is immutable after load; reloading is loading a new one and swapping references
(a failed load leaves the old one in force). The file format is documented in docs/rules.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


from .compiler import (
    DEFAULT_NAMESPACES,
    DIRECTIONS,
    END,
    GO,
    KINDS,
    STANZA_TYPES,
    STOP,
    CompiledRule,
    Compiler,
    Direction,
    RuleOutcome,
    StanzaFacts,
)
from .index import KindIndex
from .files import FILE_KEYS, RuleError, RuleFile, check_namespaces, read_rule_file
from ..xmpp.stanza import Element


__all__ = [
    "DEFAULT_NAMESPACES",
    "DIRECTIONS",
    "FILE_KEYS",
    "KINDS",
    "STANZA_TYPES",
    "Direction",
    "RuleError",
    "RuleFile",
    "RuleOutcome",
    "RuleSet",
    "read_rule_file",
]


class RuleSet:
    """Compiled rules, in order. Immutable: reload by loading a new set and swapping."""

    def __init__(self, rules: Sequence[CompiledRule], sources: Sequence[str] = ()) -> None:
        self._rules = tuple(rules)
        self.names: list[str] = [r.name for r in self._rules]
        self.sources: list[str] = list(sources)
        # direction -> stanza tag -> the plans by stanza type (see .index), for the kinds
        # that have rules.
        self._index: dict[str, dict[Any, KindIndex]] = {}
        for d in DIRECTIONS:
            self._index[d] = {}
            for tag in KINDS.values():
                here = [(i, r) for i, r in enumerate(self._rules)
                        if d in r.directions and tag in r.kinds]
                if here:
                    self._index[d][tag] = KindIndex(tag, here)

    @classmethod
    def load(cls, paths: Sequence[str | Path]) -> RuleSet:
        """Read, validate and compile the files, all or nothing (RuleError on a problem)."""
        files = [read_rule_file(p) for p in paths]
        rules: list[CompiledRule] = []
        seen: dict[str, str] = {}
        for f in files:
            rules += _compile_all(f.rules, f.source, f.namespaces, seen)
        return cls(rules, [f.source for f in files])

    @classmethod
    def from_rules(cls, data: list[dict[str, Any]], source: str = "<rules>", *,
                   namespaces: dict[str, str] | None = None) -> RuleSet:
        """Rules given as already-parsed YAML (a list of rule mappings)."""
        if not isinstance(data, list):
            raise RuleError(source, None, "the rules must be a list")
        check_namespaces(namespaces or {}, lambda p: RuleError(source, None, p))
        return cls(_compile_all(data, source, namespaces or {}, {}), [source])

    @classmethod
    def empty(cls) -> RuleSet:
        return cls(())

    def __len__(self) -> int:
        return len(self._rules)

    def covers(self, direction: Direction, tag: object) -> bool:
        """Whether any rule is about stanzas of this tag in this direction (the relay path
        skips ``apply`` and its outcome object for the others)."""
        return tag in self._index[direction]

    def apply(self, direction: Direction, stanza: Element) -> RuleOutcome:
        """Run the rules on one stanza (changed in place). Anything that is not a message,
        presence or iq in ``jabber:client`` (nonzas) passes untouched."""
        try:
            kind = self._index[direction].get(stanza.tag)
        except KeyError:
            raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}") from None
        outcome = RuleOutcome(stanza)
        if kind is None:
            return outcome
        plan = kind.plans.get(stanza.get("type") or kind.implicit, kind.default)
        if not plan.rules:
            return outcome
        facts = StanzaFacts(stanza, plan.guards)
        rules = self._rules
        after = -1
        while True:
            for pos in plan.candidates(facts, after):
                rule = rules[pos]
                if not rule.matches(facts):
                    continue
                outcome.matched.append(rule.name)
                flow = GO
                for action in rule.actions:
                    flow = action(stanza, outcome, rule)
                    if flow:
                        break
                if flow == END:
                    outcome.stanza = None
                    return outcome
                if flow == STOP:
                    return outcome
                if rule.changes:
                    # The actions may have changed what the next rules look at, the type
                    # too: start again after this rule, with fresh facts.
                    facts.reset()
                    plan = kind.plans.get(stanza.get("type") or kind.implicit, kind.default)
                    facts.guards = plan.guards
                    after = pos
                    break
            else:
                return outcome

    def _apply_linear(self, direction: Direction, stanza: Element) -> RuleOutcome:
        """:meth:`apply` without the index: every rule tried in order (for tests)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}")
        outcome = RuleOutcome(stanza)
        if stanza.tag not in KINDS.values():
            return outcome
        facts = StanzaFacts(stanza, True)
        for rule in self._rules:
            if direction not in rule.directions or stanza.tag not in rule.kinds:
                continue
            if not rule.matches(facts):
                continue
            outcome.matched.append(rule.name)
            flow = GO
            for action in rule.actions:
                flow = action(stanza, outcome, rule)
                if flow:
                    break
            if rule.changes:
                facts.reset()
            if flow == END:
                outcome.stanza = None
                break
            if flow == STOP:
                break
        return outcome


def _compile_all(data: list[Any], source: str, namespaces: dict[str, str],
                 seen: dict[str, str]) -> list[CompiledRule]:
    rules = []
    for i, item in enumerate(data, 1):
        rule = Compiler(source, i, namespaces).compile(item)
        if rule.name in seen:
            also = "" if seen[rule.name] == source else f" (also in {seen[rule.name]})"
            raise RuleError(source, rule.name, f"duplicate rule name{also}")
        seen[rule.name] = source
        rules.append(rule)
    return rules
