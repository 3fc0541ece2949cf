"""The rules engine as a pipeline feature, with safe reloading.

The factory holds the current compiled RuleSet; a reload compiles the files anew and swaps
the reference only when every file is valid, so a bad edit is refused (and logged) while the
old rules stay in force. Sessions read the reference per stanza: a reload applies at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..commands import RulesMatched
from ..rules import RuleError, RuleSet
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp.stanza import Element


class RulesFactory(FeatureFactory):
    def __init__(self, paths: Sequence[Path], log: Any) -> None:
        self.paths = list(paths)
        self.log = log
        self.ruleset = RuleSet.load(self.paths) if self.paths else RuleSet.empty()
        self._stamps = self._file_stamps()

    def create(self, session: SessionCore) -> Feature:
        return RulesFeature(self)

    def _file_stamps(self) -> list[tuple[float, int] | None]:
        stamps: list[tuple[float, int] | None] = []
        for path in self.paths:
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime, stat.st_size))
            except OSError:
                stamps.append(None)
        return stamps

    def adopt(self, paths: Sequence[Path], ruleset: RuleSet) -> None:
        """Rules a configuration reload compiled already (checked with the whole file)."""
        self.paths = list(paths)
        self._stamps = self._file_stamps()
        self.ruleset = ruleset

    def changed_on_disk(self) -> bool:
        return self._file_stamps() != self._stamps

    def reload(self, why: str) -> bool:
        """Compile the files again; keep the old rules when any file is bad."""
        self._stamps = self._file_stamps()
        try:
            fresh = RuleSet.load(self.paths) if self.paths else RuleSet.empty()
        except RuleError as exc:  # also an unreadable file
            self.log.error("rules_reload_refused", why=why, error=str(exc),
                           rules_in_force=len(self.ruleset))
            return False
        self.ruleset = fresh
        self.log.info("rules_reloaded", why=why, rules=len(fresh), names=fresh.names)
        return True


class RulesFeature(Feature):
    __slots__ = ("factory",)

    def __init__(self, factory: RulesFactory) -> None:
        self.factory = factory

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        ruleset = self.factory.ruleset
        if not ruleset.covers("c2s", el.tag):
            return el
        outcome = ruleset.apply("c2s", el)
        if outcome.matched:
            out.commands.append(RulesMatched(tuple(outcome.matched), tuple(outcome.log_events)))
            out.to_client.extend(outcome.replies)  # an error answers the client itself
        return outcome.stanza

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        ruleset = self.factory.ruleset
        if not ruleset.covers("s2c", el.tag):
            return el
        outcome = ruleset.apply("s2c", el)
        if outcome.matched:
            out.commands.append(RulesMatched(tuple(outcome.matched), tuple(outcome.log_events)))
            out.to_upstream.extend(outcome.replies)  # back to the sender, via the server
        return outcome.stanza
