"""Compiling one rule: validation, precompiled matchers and the action callables.

Everything expensive happens here, once at load; the callables made here do only the work a
stanza needs at hook time.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn
from xml.sax.saxutils import quoteattr

from lxml import etree

from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.jid import InvalidJid, Jid
from .files import RuleError, check_namespaces
from .match import JidMatcher, StanzaFacts, truthy, xpath_guard
from ..xmpp.stanza import Element

Direction = Literal["c2s", "s2c"]

DIRECTIONS: tuple[Direction, ...] = ("c2s", "s2c")
KINDS = {"message": st.MESSAGE, "presence": st.PRESENCE, "iq": st.IQ}
# RFC 6121 §5.2.2, §4.7.1 and RFC 6120 §8.2.3; "normal" and "available" are what a message
# and a presence without a type attribute are.
STANZA_TYPES = {
    "message": frozenset({"chat", "error", "groupchat", "headline", "normal"}),
    "presence": frozenset({"available", "error", "probe", "subscribe", "subscribed",
                           "unavailable", "unsubscribe", "unsubscribed"}),
    "iq": frozenset({"get", "set", "result", "error"}),
}
ERROR_TYPES = frozenset({"auth", "cancel", "continue", "modify", "wait"})
# Prefixes every rule may use without declaring them.
DEFAULT_NAMESPACES = {"client": ns.CLIENT}
RULE_KEYS = ("name", "description", "direction", "namespaces", "match", "actions")
MATCH_KEYS = ("kind", "type", "from", "to", "xpath", "namespaces", "body")

_XML_NS = "http://www.w3.org/XML/1998/namespace"
_BODY = ns.qname(ns.CLIENT, "body")
_XPATH_STRINGS = re.compile(r"'[^']*'|\"[^\"]*\"")
_XPATH_PREFIX = re.compile(r"(?<![\w.-])([A-Za-z_][\w.-]*):(?=[A-Za-z_*])")

_READ_ONLY_ACTIONS = frozenset({"log", "stop", "drop", "error"})
# What an action tells the engine to do next.
GO, STOP, END = 0, 1, 2  # next action; no later rule; stanza consumed (dropped/answered)


@dataclass(slots=True)
class RuleOutcome:
    """What the rules made of one stanza."""

    stanza: Element | None  # to forward (changed in place), or None: dropped or answered
    replies: list[Element] = field(default_factory=list)  # errors back to the sender's side
    matched: list[str] = field(default_factory=list)  # names of the rules that matched
    log_events: list[dict[str, Any]] = field(default_factory=list)  # {"event", ..., "rule"}


def _elements(results: Any) -> list[Element]:
    return [r for r in results if isinstance(r, etree._Element) and isinstance(r.tag, str)]


def _xpath_value(result: Any) -> Any:
    """An XPath result as a log field value: a string, number, boolean or None."""
    if isinstance(result, list):
        if not result:
            return None
        first = result[0]
        return "".join(first.itertext()) if isinstance(first, etree._Element) else str(first)
    if isinstance(result, float) and result.is_integer():
        return int(result)
    return result if isinstance(result, bool | float) else str(result)


_Action = Callable[[Element, RuleOutcome, "CompiledRule"], int]


def _unprefixed(el: Element, parent: Element | None, parent_ns: str | None) -> Element:
    """A copy of ``el`` whose elements use default namespace declarations, as XMPP
    software expects (``<mark xmlns='urn:x'/>``, not ``<h:mark xmlns:h='urn:x'/>``)."""
    namespace = etree.QName(el).namespace
    nsmap = {None: namespace} if namespace and namespace != parent_ns else None
    attrib = dict(el.attrib)
    if parent is None:
        copy_ = etree.Element(el.tag, attrib, nsmap=nsmap)
    else:
        copy_ = etree.SubElement(parent, el.tag, attrib, nsmap=nsmap)
    copy_.text = el.text
    for child in el:
        _unprefixed(child, copy_, namespace).tail = child.tail
    return copy_


class CompiledRule:
    __slots__ = ("actions", "body", "changes", "directions", "from_", "guard", "kinds", "name",
                 "to", "types", "xpath")

    def __init__(self, name: str) -> None:
        self.name = name
        self.directions: tuple[Direction, ...] = DIRECTIONS
        self.kinds: tuple[str, ...] = tuple(KINDS.values())
        self.types: frozenset[str] | None = None
        self.from_: JidMatcher | None = None
        self.to: JidMatcher | None = None
        self.body: re.Pattern[str] | None = None
        self.xpath: etree.XPath | None = None
        self.guard: frozenset[str] | None = None  # see xpath_guard
        self.actions: tuple[_Action, ...] = ()
        self.changes = False  # whether an action may change the stanza

    def matches(self, facts: StanzaFacts) -> bool:
        """All conditions but direction and kind (the rule set's index takes care of those),
        cheapest first."""
        if self.types is not None and facts.type() not in self.types:
            return False
        if self.from_ is not None and not self.from_.matches(facts.jid("from")):
            return False
        if self.to is not None and not self.to.matches(facts.jid("to")):
            return False
        if self.body is not None:
            search = self.body.search
            for text in facts.bodies():
                if search(text):
                    break
            else:
                return False
        if self.xpath is None:
            return True
        if self.guard is not None:
            children = facts.children()
            if children is not None and self.guard.isdisjoint(children):
                return False
        return truthy(self.xpath(facts.el))


class Compiler:
    """Turns one rule (a YAML mapping) into a :class:`CompiledRule`; problems are RuleErrors."""

    def __init__(self, source: str, label: str | int, namespaces: dict[str, str]) -> None:
        self.source, self.label = source, label
        self.namespaces = {**DEFAULT_NAMESPACES, **namespaces}

    def fail(self, problem: str) -> NoReturn:
        raise RuleError(self.source, self.label, problem)

    def _namespaces(self, value: Any) -> None:
        check_namespaces(value, lambda p: RuleError(self.source, self.label, p))
        self.namespaces.update(value)

    def strings(self, value: Any, what: str, allowed: frozenset[str] | None = None) -> list[str]:
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            self.fail(f"'{what}' must be a non-empty string or list of strings")
        if allowed is not None:
            for v in items:
                if v not in allowed:
                    self.fail(f"unknown {what} {v!r} (known: {', '.join(sorted(allowed))})")
        return items

    def xpath(self, expr: Any, what: str, *, nodes: bool = False,
              smart: bool = False) -> etree.XPath:
        if not isinstance(expr, str) or not expr.strip():
            self.fail(f"{what}: an XPath expression (a non-empty string) is required")
        for prefix in _XPATH_PREFIX.findall(_XPATH_STRINGS.sub("''", expr)):
            if prefix not in self.namespaces and prefix != "xml":
                self.fail(f"bad XPath {expr!r}: undeclared namespace prefix {prefix!r} "
                          "(declare it under 'namespaces')")
        try:
            compiled = etree.XPath(expr, namespaces=self.namespaces, smart_strings=smart)
            # Unknown prefixes and functions only show at evaluation: try it once now.
            result = compiled(etree.Element(st.MESSAGE, nsmap={None: ns.CLIENT}))
        except etree.XPathError as exc:
            self.fail(f"bad XPath {expr!r}: {exc}")
        if nodes and not isinstance(result, list):
            self.fail(f"{what}: XPath {expr!r} must select nodes, not compute a value")
        return compiled

    def regex(self, pattern: Any, what: str) -> re.Pattern[str]:
        if not isinstance(pattern, str):
            self.fail(f"{what}: a regular expression (a string) is required")
        try:
            return re.compile(pattern)
        except re.error as exc:
            self.fail(f"bad regex {pattern!r}: {exc}")

    def attr_name(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            self.fail("an attribute 'name' (a non-empty string) is required")
        clark = name
        if not name.startswith("{"):
            prefix, colon, local = name.partition(":")
            if colon:
                uri = _XML_NS if prefix == "xml" else self.namespaces.get(prefix)
                if uri is None:
                    self.fail(f"undeclared namespace prefix {prefix!r} in attribute {name!r}")
                clark = ns.qname(uri, local)
        try:
            local = etree.QName(clark).localname
        except ValueError:
            self.fail(f"bad attribute name {name!r}")
        if local == "xmlns" or local.startswith("xmlns:"):
            self.fail(f"namespace declarations are not attributes: {name!r}")
        return clark

    def element(self, xml: Any) -> Element:
        if not isinstance(xml, str) or not xml.strip():
            self.fail("'add' needs the element as an XML string")
        decls = "".join(f" xmlns:{p}={quoteattr(u)}" for p, u in self.namespaces.items())
        wrapped = f"<wrap xmlns={quoteattr(ns.CLIENT)}{decls}>{xml}</wrap>".encode()
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        try:
            root = etree.fromstring(wrapped, parser)
        except etree.XMLSyntaxError as exc:
            msg = re.sub(r", line \d+, column \d+$", "", exc.msg or "not well-formed")
            self.fail(f"malformed XML in 'add' {xml!r}: {msg}")
        children = list(root)
        if (len(children) != 1 or (root.text or "").strip() or (children[0].tail or "").strip()
                or not isinstance(children[0].tag, str)):
            self.fail(f"'add' must be exactly one element: {xml!r}")
        if any(not isinstance(e.tag, str) for e in children[0].iter()):
            self.fail(f"comments, processing instructions and entities are not allowed "
                      f"in 'add': {xml!r}")
        return _unprefixed(children[0], None, None)

    def compile(self, data: Any) -> CompiledRule:
        if not isinstance(data, dict):
            self.fail("a rule must be a mapping")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            self.fail("missing 'name' (a non-empty string)")
        self.label = name
        unknown = sorted(str(k) for k in data if k not in RULE_KEYS)
        if unknown:
            self.fail(f"unknown key {unknown[0]!r} (known: {', '.join(RULE_KEYS)})")
        rule = CompiledRule(name)
        direction = data.get("direction", "both")
        if direction not in ("c2s", "s2c", "both"):
            self.fail(f"bad direction {direction!r} (c2s, s2c or both)")
        rule.directions = DIRECTIONS if direction == "both" else (direction,)
        if "namespaces" in data:
            self._namespaces(data["namespaces"])
        match = data.get("match") or {}
        if not isinstance(match, dict):
            self.fail("'match' must be a mapping")
        self._match(rule, match)
        actions = data.get("actions") or []
        if not isinstance(actions, list):
            actions = [actions]
        rule.actions = self._actions(actions)
        rule.changes = any(
            (a if isinstance(a, str) else next(iter(a), "")) not in _READ_ONLY_ACTIONS
            for a in actions)
        return rule

    def _match(self, rule: CompiledRule, match: dict[str, Any]) -> None:
        unknown = sorted(str(k) for k in match if k not in MATCH_KEYS)
        if unknown:
            self.fail(f"unknown match key {unknown[0]!r} (known: {', '.join(MATCH_KEYS)})")
        if "namespaces" in match:
            self._namespaces(match["namespaces"])
        kinds = list(KINDS)
        if "kind" in match:
            kinds = self.strings(match["kind"], "kind", frozenset(KINDS))
            rule.kinds = tuple(KINDS[k] for k in kinds)
        if "type" in match:
            possible = frozenset().union(*(STANZA_TYPES[k] for k in kinds))
            rule.types = frozenset(self.strings(match["type"], "type", possible))
        for key in ("from", "to"):
            if key in match:
                matcher = JidMatcher(self.strings(match[key], key), self.fail)
                setattr(rule, "from_" if key == "from" else "to", matcher)
        if "body" in match:
            rule.body = self.regex(match["body"], "body")
        if "xpath" in match:
            rule.xpath = self.xpath(match["xpath"], "xpath")
            rule.guard = xpath_guard(match["xpath"], self.namespaces)

    def _actions(self, specs: list[Any]) -> tuple[_Action, ...]:
        actions = []
        last_key = None
        for i, spec in enumerate(specs, 1):
            if isinstance(spec, str):
                key, arg = spec, None
            elif isinstance(spec, dict) and len(spec) == 1:
                ((key, arg),) = spec.items()
            else:
                self.fail(f"action #{i}: an action is a name or a mapping with one key")
            build = ACTION_BUILDERS.get(key)
            if build is None:
                self.fail(f"unknown action {key!r} (known: {', '.join(ACTION_BUILDERS)})")
            if last_key in ("drop", "error", "stop"):
                self.fail(f"action {key!r} after {last_key!r} would never run")
            actions.append(build(self, arg))
            last_key = key
        return tuple(actions)

    # ---------------------------------------------------------------- actions

    def _args(self, action: str, arg: Any, required: tuple[str, ...],
              optional: tuple[str, ...] = (), shorthand: str | None = None) -> dict[str, Any]:
        if shorthand is not None and not isinstance(arg, dict):
            arg = {shorthand: arg}
        if not isinstance(arg, dict):
            self.fail(f"action {action!r} needs a mapping with {', '.join(required)}")
        for key in arg:
            if key not in required + optional:
                self.fail(f"action {action!r}: unknown option {key!r} "
                          f"(known: {', '.join(required + optional)})")
        for key in required:
            if key not in arg:
                self.fail(f"action {action!r}: missing {key!r}")
        return arg

    def _no_arg(self, action: str, arg: Any) -> None:
        if arg is not None and arg is not True:
            self.fail(f"action {action!r} takes no argument")

    def _target(self, action: str, args: dict[str, Any]) -> etree.XPath | None:
        return self.xpath(args["xpath"], action, nodes=True) if "xpath" in args else None

    def act_drop(self, arg: Any) -> _Action:
        self._no_arg("drop", arg)
        return lambda el, out, rule: END

    def act_stop(self, arg: Any) -> _Action:
        self._no_arg("stop", arg)
        return lambda el, out, rule: STOP

    def act_error(self, arg: Any) -> _Action:
        args = self._args("error", arg, ("condition",), ("type", "text", "by"), "condition")
        condition = args["condition"]
        if not isinstance(condition, str) or condition not in st.DEFAULT_ERROR_TYPE:
            self.fail(f"unknown error condition {condition!r} (RFC 6120 §8.3.3: "
                      f"{', '.join(st.DEFAULT_ERROR_TYPE)})")
        error_type = args.get("type")
        if error_type is not None and (not isinstance(error_type, str)
                                       or error_type not in ERROR_TYPES):
            self.fail(f"bad error type {error_type!r} (known: {', '.join(sorted(ERROR_TYPES))})")
        text, by = args.get("text"), args.get("by")
        for key, value in (("text", text), ("by", by)):
            if value is not None and not isinstance(value, str):
                self.fail(f"action 'error': {key!r} must be a string")

        def error(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            kind_type = el.get("type")
            # RFC 6120 §8.3.1 / §8.2.3: never answer an error, nor an iq result.
            if kind_type != "error" and not (kind_type == "result" and el.tag == st.IQ):
                out.replies.append(st.error_reply(el, condition, error_type=error_type,
                                                  text=text, by=by))
            return END
        return error

    def act_set_attr(self, arg: Any) -> _Action:
        args = self._args("set_attr", arg, ("name", "value"), ("xpath",))
        name, target = self.attr_name(args["name"]), self._target("set_attr", args)
        value = args["value"]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail("action 'set_attr': 'value' must be a string")
        text = str(value)

        def set_attr(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            for t in ([el] if target is None else _elements(target(el))):
                t.set(name, text)
            return GO
        return set_attr

    def act_remove_attr(self, arg: Any) -> _Action:
        args = self._args("remove_attr", arg, ("name",), ("xpath",), "name")
        name, target = self.attr_name(args["name"]), self._target("remove_attr", args)

        def remove_attr(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            for t in ([el] if target is None else _elements(target(el))):
                t.attrib.pop(name, None)
            return GO
        return remove_attr

    def act_remove(self, arg: Any) -> _Action:
        args = self._args("remove", arg, ("xpath",), shorthand="xpath")
        target = self.xpath(args["xpath"], "remove", nodes=True, smart=True)

        def remove(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            for r in target(el):
                if isinstance(r, etree._Element):
                    parent = r.getparent()
                    if parent is None:  # the stanza itself is never removed: use drop
                        continue
                    if r.tail and r.tail.strip():  # keep text that followed the element
                        prev = r.getprevious()
                        if prev is not None:
                            prev.tail = (prev.tail or "") + r.tail
                        else:
                            parent.text = (parent.text or "") + r.tail
                    parent.remove(r)
                elif getattr(r, "is_attribute", False):
                    r.getparent().attrib.pop(r.attrname, None)
            return GO
        return remove

    def act_add(self, arg: Any) -> _Action:
        args = self._args("add", arg, ("xml",), ("xpath",), "xml")
        template, target = self.element(args["xml"]), self._target("add", args)

        def add(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            for t in ([el] if target is None else _elements(target(el))):
                t.append(copy.deepcopy(template))  # never share one element between stanzas
            return GO
        return add

    def act_replace(self, arg: Any) -> _Action:
        args = self._args("replace", arg, ("pattern", "with"), ("in", "xpath"))
        rx = self.regex(args["pattern"], "replace")
        repl = args["with"]
        if not isinstance(repl, str):
            self.fail("action 'replace': 'with' must be a string")
        try:
            rx.sub(repl, "")  # checks group references in the template
        except (re.error, IndexError) as exc:
            self.fail(f"action 'replace': bad replacement {repl!r}: {exc}")
        if args.get("in", "body") != "body":
            self.fail("action 'replace': 'in' can only be 'body'; use 'xpath' for other targets")
        if "in" in args and "xpath" in args:
            self.fail("action 'replace': give 'in: body' or 'xpath', not both")
        target = (self.xpath(args["xpath"], "replace", nodes=True, smart=True)
                  if "xpath" in args else None)
        sub = rx.sub

        def replace(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            if target is None:
                for body in el.iterchildren(_BODY):
                    if body.text:
                        body.text = sub(repl, body.text)
                return GO
            for r in target(el):
                if isinstance(r, etree._Element):
                    if isinstance(r.tag, str) and r.text:
                        r.text = sub(repl, r.text)
                elif getattr(r, "is_attribute", False):
                    r.getparent().set(r.attrname, sub(repl, str(r)))
                elif getattr(r, "is_text", False):
                    r.getparent().text = sub(repl, str(r))
                elif getattr(r, "is_tail", False):
                    r.getparent().tail = sub(repl, str(r))
            return GO
        return replace

    def act_redirect(self, arg: Any) -> _Action:
        if not isinstance(arg, str):
            self.fail("action 'redirect' needs a JID")
        try:
            to = str(Jid.parse(arg))
        except InvalidJid as exc:
            self.fail(f"action 'redirect': bad JID {arg!r}: {exc}")

        def redirect(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            el.set("to", to)
            return GO
        return redirect

    def act_log(self, arg: Any) -> _Action:
        args = self._args("log", arg, ("event",), ("fields",), "event")
        event, fields = args["event"], args.get("fields") or {}
        if not isinstance(event, str) or not event:
            self.fail("action 'log': 'event' must be a non-empty string")
        if not isinstance(fields, dict):
            self.fail("action 'log': 'fields' must be a mapping")
        static: dict[str, Any] = {"event": event}
        computed: list[tuple[str, etree.XPath]] = []
        for key, value in fields.items():
            if not isinstance(key, str) or key in ("event", "rule"):
                self.fail(f"action 'log': bad field name {key!r} ('event' and 'rule' are set "
                          "by the engine)")
            if isinstance(value, dict) and set(value) == {"xpath"}:
                computed.append((key, self.xpath(value["xpath"], f"log field {key!r}")))
            elif value is None or isinstance(value, str | int | float | bool):
                static[key] = value
            else:
                self.fail(f"action 'log': field {key!r} must be a scalar or {{xpath: ...}}")

        def log(el: Element, out: RuleOutcome, rule: CompiledRule) -> int:
            entry = dict(static)
            for key, xpath in computed:
                entry[key] = _xpath_value(xpath(el))
            entry["rule"] = rule.name
            out.log_events.append(entry)
            return GO
        return log


ACTION_BUILDERS: dict[str, Callable[[Compiler, Any], _Action]] = {
    "drop": Compiler.act_drop,
    "error": Compiler.act_error,
    "set_attr": Compiler.act_set_attr,
    "remove_attr": Compiler.act_remove_attr,
    "remove": Compiler.act_remove,
    "add": Compiler.act_add,
    "replace": Compiler.act_replace,
    "redirect": Compiler.act_redirect,
    "log": Compiler.act_log,
    "stop": Compiler.act_stop,
}
