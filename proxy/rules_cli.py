"""``xmpp-front rules test [PATH...]`` (rule files or folders of them) and the rule-file
checks behind ``xmpp-front check``.

A rule file in the mapping form may carry test vectors next to its rules::

    vectors:
      - name: composing-dropped          # required, unique within the file
        direction: c2s                   # c2s | s2c
        in: "<message to='b@x' type='chat'><composing xmlns='...'/></message>"
        out: null                        # the expected stanza forwarded, or null: none
        replies: []                      # expected error replies, in order (default: none)
        matched: [rule-a]                # optional: the rules that must have matched
        log: [{event: hit}]              # optional: expected log events (each a subset)

Stanzas are written as on the stream (default namespace ``jabber:client``) and read by the
proxy's own codec. They are compared after normalization: namespaces by URI, not prefix;
attributes in any order; whitespace-only text ignored.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from .rules import DIRECTIONS, RuleError, RuleSet, read_rule_file
from .xmpp.codec import StanzaReceived, StreamViolation, XmlStreamParser
from .xmpp.stanza import Element


EXIT_OK, EXIT_FAILED, EXIT_LOAD_ERROR = 0, 1, 2
VECTOR_KEYS = ("name", "description", "direction", "in", "out", "replies", "matched", "log")
_HEADER = (b"<stream:stream xmlns='jabber:client' "
           b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
_XML_NS = "http://www.w3.org/XML/1998/namespace"


# The shipped packs, installed with the package (the repository's rules/ links to them).
PACKS_DIR = Path(__file__).resolve().parent / "rulepacks"
RULE_SUFFIXES = (".yaml", ".yml")


def default_rule_paths() -> list[Path]:
    """``rules/*.yaml`` of the current folder, else the packs installed with the package."""
    for folder in (Path("rules"), PACKS_DIR):
        if folder.is_dir():
            found = rule_files_in(folder)
            if found:
                return found
    return []


def rule_files_in(folder: Path) -> list[Path]:
    """The rule files directly in ``folder`` (``*.yaml``, ``*.yml``), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix in RULE_SUFFIXES and not p.is_dir())


def expand_rule_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files as given, folders as the rule files in them; and the folders that hold none."""
    files: list[Path] = []
    empty: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = rule_files_in(path)
            files += found
            if not found:
                empty.append(f"{path}: no rule files (*.yaml, *.yml) in this folder")
        else:
            files.append(path)
    return files, empty


def parse_stanza(xml: str) -> Element:
    """One stanza written as on a ``jabber:client`` stream, read by the proxy's codec."""
    events = XmlStreamParser().feed(_HEADER + xml.encode())
    for event in events:
        if isinstance(event, StreamViolation):
            raise ValueError(f"{event.condition}: {event.text}")
    found = [e.element for e in events if isinstance(e, StanzaReceived)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one complete element, got {len(found)}")
    return found[0]


def canonical_lines(el: Element) -> list[str]:
    """A normalized rendering for comparison and diffs: one line per element or text,
    namespaces declared as default where they change, attributes sorted."""
    lines: list[str] = []
    _render(el, None, "", lines)
    return lines


def _attr_name(name: str) -> str:
    if not name.startswith("{"):
        return name
    uri, _, local = name[1:].partition("}")
    return f"xml:{local}" if uri == _XML_NS else f"{{{uri}}}{local}"


def _render(el: Element, parent_ns: str | None, indent: str, lines: list[str]) -> None:
    qname = etree.QName(el)
    attrs = sorted((_attr_name(k), v) for k, v in el.attrib.items())
    if qname.namespace != parent_ns:
        attrs.insert(0, ("xmlns", qname.namespace or ""))
    start = "<" + qname.localname + "".join(f" {k}={quoteattr(v)}" for k, v in attrs)
    text = el.text if el.text and el.text.strip() else ""
    children = [c for c in el if isinstance(c.tag, str)]
    if not children:
        end = f">{escape(text)}</{qname.localname}>" if text else "/>"
        lines.append(indent + start + end)
        return
    lines.append(indent + start + ">")
    if text:
        lines.append(indent + "  " + escape(text))
    for c in children:
        _render(c, qname.namespace, indent + "  ", lines)
        if c.tail and c.tail.strip():
            lines.append(indent + "  " + escape(c.tail))
    lines.append(f"{indent}</{qname.localname}>")


@dataclass
class VectorResult:
    source: str
    name: str
    passed: bool
    detail: list[str] = field(default_factory=list)  # why it failed (a diff, a message)


def _diff(what: str, expected: list[str], actual: list[str]) -> list[str]:
    return [f"{what} differs:", *difflib.unified_diff(
        expected, actual, "expected", "actual", lineterm="", n=2)]


def _xml_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of XML strings")
    return value


def vector_problems(vector: Any) -> list[str]:
    """What is wrong with the shape of one vector (not whether it passes)."""
    if not isinstance(vector, dict):
        return ["a vector must be a mapping"]
    problems = [f"unknown key {k!r} (known: {', '.join(VECTOR_KEYS)})"
                for k in vector if k not in VECTOR_KEYS]
    if not isinstance(vector.get("name"), str) or not vector.get("name"):
        problems.append("missing 'name'")
    if vector.get("direction") not in DIRECTIONS:
        problems.append("'direction' must be c2s or s2c")
    if not isinstance(vector.get("in"), str):
        problems.append("'in' must be an XML string")
    if "out" not in vector:
        problems.append("missing 'out' (an XML string, or null when nothing is forwarded)")
    elif vector["out"] is not None and not isinstance(vector["out"], str):
        problems.append("'out' must be an XML string or null")
    for key in ("replies", "matched", "log"):
        value = vector.get(key)
        if value is not None and not isinstance(value, list):
            problems.append(f"{key!r} must be a list")
    return problems


def run_vector(rules: RuleSet, vector: Any, source: str = "<vectors>",
               index: int = 1) -> VectorResult:
    """Run one vector against ``rules`` and compare what came out with what it expects."""
    name = vector.get("name") if isinstance(vector, dict) else None
    name = name if isinstance(name, str) and name else f"#{index}"
    problems = vector_problems(vector)
    if problems:
        return VectorResult(source, name, False, [f"bad vector: {p}" for p in problems])
    try:
        stanza = parse_stanza(vector["in"])
        expected_out = None if vector["out"] is None else parse_stanza(vector["out"])
        expected_replies = [parse_stanza(x) for x in _xml_list(vector.get("replies"), "replies")]
    except ValueError as exc:
        return VectorResult(source, name, False, [f"bad vector: {exc}"])
    outcome = rules.apply(vector["direction"], stanza)
    detail: list[str] = []
    if expected_out is None and outcome.stanza is not None:
        detail += ["expected the stanza to be dropped, but it was forwarded:"]
        detail += ["  " + line for line in canonical_lines(outcome.stanza)]
    elif expected_out is not None and outcome.stanza is None:
        detail += ["expected a stanza to be forwarded, but it was dropped "
                   f"(matched: {', '.join(outcome.matched) or 'none'})"]
    elif expected_out is not None and outcome.stanza is not None:
        want, got = canonical_lines(expected_out), canonical_lines(outcome.stanza)
        if want != got:
            detail += _diff("forwarded stanza", want, got)
    want_replies = [line for r in expected_replies for line in [*canonical_lines(r), ""]]
    got_replies = [line for r in outcome.replies for line in [*canonical_lines(r), ""]]
    if want_replies != got_replies:
        detail += _diff(f"replies ({len(expected_replies)} expected, "
                        f"{len(outcome.replies)} sent)", want_replies, got_replies)
    if vector.get("matched") is not None and vector["matched"] != outcome.matched:
        detail.append(f"matched rules: expected {vector['matched']}, got {outcome.matched}")
    if vector.get("log") is not None:
        detail += _log_problems(vector["log"], outcome.log_events)
    return VectorResult(source, name, not detail, detail)


def _log_problems(expected: list[Any], actual: list[dict[str, Any]]) -> list[str]:
    ok = len(expected) == len(actual) and all(
        isinstance(want, dict) and all(got.get(k) == v for k, v in want.items())
        for want, got in zip(expected, actual, strict=False))
    return [] if ok else [f"log events: expected {expected}, got {actual}"]


def run_file_vectors(path: str | Path) -> list[VectorResult]:
    """Load one file on its own (RuleError if it is bad) and run its vectors."""
    rule_file = read_rule_file(path)
    rules = RuleSet.from_rules(rule_file.rules, rule_file.source,
                               namespaces=rule_file.namespaces)
    return [run_vector(rules, v, rule_file.source, i)
            for i, v in enumerate(rule_file.vectors, 1)]


def rules_test_main(paths: list[str], out: TextIO | None = None) -> int:
    """``xmpp-front rules test [PATH...]``: run the vectors of the given rule files and of
    the rule files in the given folders (the shipped packs when none: see
    :func:`default_rule_paths`). 0: all pass; 1: a vector failed; 2: a file did not load or
    a folder held no rule file."""
    out = out or sys.stdout
    if paths:
        files, empty = expand_rule_paths(paths)
    else:
        files, empty = default_rule_paths(), []
        if not files:
            print(f"no rule files found (looked for rules/*.yaml and {PACKS_DIR})", file=out)
            return EXIT_LOAD_ERROR
    for problem in empty:
        print(f"ERROR {problem}", file=out)
    passed = failed = 0
    load_error = bool(empty)
    for path in files:
        try:
            results = run_file_vectors(path)
        except RuleError as exc:
            print(f"ERROR {exc}", file=out)
            load_error = True
            continue
        if not results:
            print(f"NOTE {path}: no test vectors", file=out)
        for result in results:
            if result.passed:
                passed += 1
                print(f"PASS {result.source}: {result.name}", file=out)
            else:
                failed += 1
                print(f"FAIL {result.source}: {result.name}", file=out)
                for line in result.detail:
                    print("    " + line, file=out)
    print(f"{passed} passed, {failed} failed", file=out)
    if load_error:
        return EXIT_LOAD_ERROR
    return EXIT_FAILED if failed else EXIT_OK


def check_rule_files(paths: Iterable[str | Path]) -> list[str]:
    """Problems with rule files as the proxy would load them together: each file's first
    problem, names duplicated across files, and malformed test vectors."""
    paths = list(paths)
    problems: list[str] = []
    for path in paths:
        try:
            rule_file = read_rule_file(path)
            RuleSet.from_rules(rule_file.rules, rule_file.source,
                               namespaces=rule_file.namespaces)
        except RuleError as exc:
            problems.append(str(exc))
            continue
        names: set[str] = set()
        for i, vector in enumerate(rule_file.vectors, 1):
            name = vector.get("name") if isinstance(vector, dict) else None
            label = f"vector {name!r}" if isinstance(name, str) else f"vector #{i}"
            found = vector_problems(vector)
            if isinstance(name, str):
                if name in names:
                    found.append("duplicate vector name")
                names.add(name)
            problems += [f"{rule_file.source}: {label}: {p}" for p in found]
    if not problems and len(paths) > 1:
        try:
            RuleSet.load(paths)
        except RuleError as exc:
            problems.append(str(exc))
    return problems


__all__ = [
    "EXIT_FAILED",
    "EXIT_LOAD_ERROR",
    "EXIT_OK",
    "PACKS_DIR",
    "VectorResult",
    "canonical_lines",
    "check_rule_files",
    "default_rule_paths",
    "expand_rule_paths",
    "parse_stanza",
    "rules_test_main",
    "run_file_vectors",
    "run_vector",
    "vector_problems",
]
