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


_NONE: tuple[tuple[CompiledRule, ...], bool] = ((), False)


class RuleSet:
    """Compiled rules, in order. Immutable: reload by loading a new set and swapping."""

    def __init__(self, rules: Sequence[CompiledRule], sources: Sequence[str] = ()) -> None:
        self._rules = tuple(rules)
        self.names: list[str] = [r.name for r in self._rules]
        self.sources: list[str] = list(sources)
        # direction -> stanza tag -> (the rules that can apply, in order; whether to compute
        # the children's namespaces for XPath guards: worth it from two guarded rules on).
        self._index: dict[str, dict[Any, tuple[tuple[CompiledRule, ...], bool]]] = {}
        for d in DIRECTIONS:
            self._index[d] = {}
            for tag in KINDS.values():
                rules_here = tuple(r for r in self._rules if d in r.directions and tag in r.kinds)
                guarded = sum(r.guard is not None for r in rules_here)
                self._index[d][tag] = (rules_here, guarded >= 2)

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

    def apply(self, direction: Direction, stanza: Element) -> RuleOutcome:
        """Run the rules on one stanza (changed in place). Anything that is not a message,
        presence or iq in ``jabber:client`` (nonzas) passes untouched."""
        try:
            rules, guards = self._index[direction].get(stanza.tag, _NONE)
        except KeyError:
            raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}") from None
        outcome = RuleOutcome(stanza)
        if not rules:
            return outcome
        facts = StanzaFacts(stanza, guards)
        for rule in rules:
            if not rule.matches(facts):
                continue
            outcome.matched.append(rule.name)
            flow = GO
            for action in rule.actions:
                flow = action(stanza, outcome, rule)
                if flow:
                    break
            if rule.changes:
                facts.reset()  # the actions may have changed what the next rules look at
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
