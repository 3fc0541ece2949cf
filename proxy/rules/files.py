"""Rule files: reading YAML, the file shape, and the error every problem becomes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FILE_KEYS = ("description", "namespaces", "rules", "vectors")
NCNAME = re.compile(r"[A-Za-z_][\w.-]*\Z")


class RuleError(ValueError):
    """A bad rule file: the message names the file, the rule and the problem."""

    def __init__(self, source: str, rule: str | int | None, problem: str) -> None:
        if isinstance(rule, str):
            where = f"{source}: rule {rule!r}"
        elif isinstance(rule, int):
            where = f"{source}: rule #{rule}"
        else:
            where = source
        super().__init__(f"{where}: {problem}")
        self.source, self.rule, self.problem = source, rule, problem


@dataclass(frozen=True)
class RuleFile:
    """One rule file as read, before compilation."""

    source: str
    rules: list[Any]
    vectors: list[Any]
    namespaces: dict[str, str]
    description: str | None = None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_rule_file(path: str | Path) -> RuleFile:
    """Read and shape-check one rule file: a list of rules, or a mapping with ``rules:``
    (and optionally ``vectors:``, ``namespaces:``, ``description:``)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(source, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RuleError(source, None, f"not valid YAML: {exc}") from exc
    if data is None:
        raise RuleError(source, None, "empty rule file")
    namespaces: Any = {}
    vectors: Any = []
    description = None
    if isinstance(data, dict):
        unknown = sorted(str(k) for k in data if k not in FILE_KEYS)
        if unknown:
            raise RuleError(source, None, f"unknown top-level key {unknown[0]!r} "
                            f"(known: {', '.join(FILE_KEYS)})")
        if "rules" not in data:
            raise RuleError(source, None, "no 'rules:' list")
        rules = data["rules"]
        vectors = [] if data.get("vectors") is None else data["vectors"]
        namespaces = data.get("namespaces") or {}
        description = data.get("description")
        if not isinstance(vectors, list):
            raise RuleError(source, None, "'vectors' must be a list")
    elif isinstance(data, list):
        rules = data
    else:
        raise RuleError(source, None, "a rule file is a list of rules or a mapping with 'rules:'")
    if not isinstance(rules, list):
        raise RuleError(source, None, "'rules' must be a list")
    if not rules:
        raise RuleError(source, None, "no rules")
    check_namespaces(namespaces, lambda p: RuleError(source, None, p))
    return RuleFile(source, rules, vectors, dict(namespaces), description)


def check_namespaces(value: Any, error: Callable[[str], RuleError]) -> None:
    if not isinstance(value, dict):
        raise error("'namespaces' must be a mapping of prefix to namespace URI")
    for prefix, uri in value.items():
        if not isinstance(prefix, str) or not NCNAME.match(prefix) or prefix in ("xml", "xmlns"):
            raise error(f"bad namespace prefix {prefix!r}")
        if not isinstance(uri, str) or not uri:
            raise error(f"namespace prefix {prefix!r}: the URI must be a non-empty string")
