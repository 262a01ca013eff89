"""Rule files: YAML, validated on load with file, line and reason.

A rule file is either a list of rules or a mapping with a ``rules:`` list. A
rule set is one file or a folder of ``*.yaml`` / ``*.yml`` files (read in
name order). Loading uses :func:`yaml.compose` so every error can point at
the node that caused it. A load either succeeds completely or raises
:class:`~rules.errors.RuleFileError`; :meth:`RuleSet.reload` returns a new set
and never changes the old one, so a caller that catches the error keeps
running on the previous rules.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from rules.errors import RuleFileError
from rules.expr import Call, Name, walk
from rules.expr import Node as Expr
from rules.model import (
    ROLES,
    SEVERITIES,
    CorrelateCondition,
    Correlation,
    EscalationStep,
    Role,
    Rule,
    Severity,
    Subject,
)
from rules.yamlnodes import SUBJECT_KEYS, NodeReader

__all__ = ["CATEGORIES", "PLACEHOLDERS", "RuleSet", "load_rules_text"]

CATEGORIES: Final = frozenset(
    {"traffic", "naturalDisaster", "weather", "environment", "health", "security", "agriculture"}
)
"""FIWARE Alert ``category`` values."""

PLACEHOLDERS: Final[dict[str, frozenset[str]]] = {
    "series": frozenset(
        {
            "rule",
            "name",
            "severity",
            "device",
            "channel",
            "district",
            "domain",
            "kind",
            "value",
            "state",
            "unit",
        }
    ),
    "device": frozenset({"rule", "name", "severity", "device", "district", "domain", "kind"}),
    "correlation": frozenset({"rule", "name", "severity", "district", "devices"}),
}
"""Placeholders a message template may use, by rule kind."""

_RULE_KEYS: Final = frozenset(
    {
        "id",
        "name",
        "description",
        "subject",
        "when",
        "for",
        "clear_when",
        "max_gap",
        "severity",
        "message",
        "ack_timeout",
        "escalation",
        "ack_role",
        "resolve_manually",
        "renotify_after",
        "category",
        "subcategory",
        "correlate",
    }
)
_REQUIRED: Final = ("id", "name", "severity", "message")
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SAMPLE: Final = {
    "rule": "r",
    "name": "n",
    "severity": "minor",
    "device": "d",
    "channel": "c",
    "district": "x",
    "domain": "traffic",
    "kind": "k",
    "value": 1.5,
    "state": "s",
    "unit": "u",
    "devices": "d1, d2",
}


def _check_expr_scope(f: NodeReader, node: Node, expr: Expr, kind: str, what: str) -> None:
    """Device rules may use only ``offline()``; series rules cannot use it inside ``within``."""
    if kind != "device":
        return
    for n in walk(expr):
        if isinstance(n, Name) or (isinstance(n, Call) and n.func != "offline"):
            raise f.error(
                node,
                f"{what}: a rule without a channel in its subject is a device rule and can "
                "only use offline(); add 'channel:' to the subject",
            )


def _rule(f: NodeReader, node: Node) -> Rule:
    fields = f.mapping(node, "rule", _RULE_KEYS)
    for key in _REQUIRED:
        if key not in fields:
            raise f.error(node, f"rule: missing required key {key!r}")
    rule_id = f.text(fields["id"], "id")
    if not _ID.match(rule_id):
        raise f.error(fields["id"], f"id {rule_id!r} must match [a-z0-9][a-z0-9_.-]*")
    what = f"rule {rule_id!r}"
    subject = f.subject(fields["subject"], f"{what} subject") if "subject" in fields else Subject()
    correlation: Correlation | None = None
    if "correlate" in fields:
        for key in ("when", "for", "clear_when", "max_gap"):
            if key in fields:
                raise f.error(fields[key], f"{what}: a correlate rule cannot have {key!r}")
        correlation = _correlation(f, fields["correlate"], what)
        kind = "correlation"
    else:
        if "when" not in fields:
            raise f.error(node, f"{what}: needs 'when' (or 'correlate')")
        kind = "series" if subject.channels else "device"
    when = clear = None
    when_text = clear_text = ""
    if "when" in fields:
        when, when_text = f.expression(fields["when"], f"{what} when")
        _check_expr_scope(f, fields["when"], when, kind, f"{what} when")
    if "clear_when" in fields:
        clear, clear_text = f.expression(fields["clear_when"], f"{what} clear_when")
        _check_expr_scope(f, fields["clear_when"], clear, kind, f"{what} clear_when")
    message = f.text(fields["message"], f"{what} message")
    _check_message(f, fields["message"], message, kind, what)
    escalation: tuple[EscalationStep, ...] = ()
    if "escalation" in fields:
        escalation = _escalation(f, fields["escalation"], what)
        if "ack_timeout" not in fields:
            raise f.error(fields["escalation"], f"{what}: escalation needs an ack_timeout")
    category = f.text(fields["category"], "category") if "category" in fields else ""
    if category and category not in CATEGORIES:
        known = ", ".join(sorted(CATEGORIES))
        raise f.error(fields["category"], f"{what}: category {category!r} is not one of {known}")
    ack_role: Role = "operator"
    if "ack_role" in fields:
        ack_role = _role(f, fields["ack_role"], f"{what} ack_role")
    severity: Severity = _severity(f, fields["severity"], f"{what} severity")
    mark = node.start_mark
    return Rule(
        id=rule_id,
        name=f.text(fields["name"], f"{what} name"),
        description=f.text(fields["description"], "description") if "description" in fields else "",
        subject=subject,
        severity=severity,
        message=message,
        when=when,
        when_text=when_text,
        clear_when=clear,
        clear_when_text=clear_text,
        for_s=f.duration(fields["for"], f"{what} for") if "for" in fields else 0.0,
        max_gap_s=f.duration(fields["max_gap"], f"{what} max_gap") if "max_gap" in fields else None,
        ack_timeout_s=(
            f.duration(fields["ack_timeout"], f"{what} ack_timeout")
            if "ack_timeout" in fields
            else None
        ),
        escalation=escalation,
        ack_role=ack_role,
        resolve_manually=(
            f.boolean(fields["resolve_manually"], f"{what} resolve_manually")
            if "resolve_manually" in fields
            else False
        ),
        renotify_after_s=(
            f.duration(fields["renotify_after"], f"{what} renotify_after")
            if "renotify_after" in fields
            else None
        ),
        category=category,
        subcategory=f.text(fields["subcategory"], "subcategory") if "subcategory" in fields else "",
        correlation=correlation,
        source=f"{f.path}:{mark.line + 1}",
    )


def _severity(f: NodeReader, node: Node, what: str) -> Severity:
    text = f.choice(node, what, SEVERITIES)
    return next(s for s in SEVERITIES if s == text)


def _role(f: NodeReader, node: Node, what: str) -> Role:
    text = f.choice(node, what, ROLES)
    return next(r for r in ROLES if r == text)


def _check_message(f: NodeReader, node: Node, template: str, kind: str, what: str) -> None:
    allowed = PLACEHOLDERS[kind]
    try:
        names = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as exc:
        raise f.error(node, f"{what} message: {exc}") from None
    for name in names:
        if name not in allowed:
            known = ", ".join("{" + p + "}" for p in sorted(allowed))
            raise f.error(
                node, f"{what} message: unknown placeholder {{{name}}} (allowed: {known})"
            )
    try:
        template.format_map(_SAMPLE)
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise f.error(node, f"{what} message: {exc}") from None


def _escalation(f: NodeReader, node: Node, what: str) -> tuple[EscalationStep, ...]:
    if not isinstance(node, SequenceNode) or not node.value:
        raise f.error(node, f"{what} escalation must be a non-empty list of steps")
    steps: list[EscalationStep] = []
    for item in node.value:
        fields = f.mapping(
            item, f"{what} escalation step", frozenset({"after", "notify", "severity"})
        )
        if "notify" not in fields and "severity" not in fields:
            raise f.error(item, f"{what} escalation step needs 'notify' or 'severity'")
        after = f.duration(fields["after"], "escalation after") if "after" in fields else 0.0
        if steps and after < steps[-1].after_s:
            raise f.error(item, f"{what} escalation steps must be in order of 'after'")
        notify: Role = (
            _role(f, fields["notify"], f"{what} notify") if "notify" in fields else "operator"
        )
        sev = _severity(f, fields["severity"], f"{what} severity") if "severity" in fields else None
        steps.append(EscalationStep(after, notify, sev))
    return tuple(steps)


def _correlation(f: NodeReader, node: Node, what: str) -> Correlation:
    fields = f.mapping(node, f"{what} correlate", frozenset({"within", "conditions"}))
    if "within" not in fields or "conditions" not in fields:
        raise f.error(node, f"{what} correlate needs 'within' and 'conditions'")
    conds_node = fields["conditions"]
    if not isinstance(conds_node, SequenceNode) or len(conds_node.value) < 2:
        raise f.error(conds_node, f"{what} correlate needs at least two conditions")
    conditions: list[CorrelateCondition] = []
    for i, item in enumerate(conds_node.value, 1):
        allowed = frozenset({"label", "when", *SUBJECT_KEYS})
        cf = f.mapping(item, f"{what} condition {i}", allowed)
        if "when" not in cf or "channel" not in cf:
            raise f.error(item, f"{what} condition {i} needs 'channel' and 'when'")
        sub_fields = {k: v for k, v in cf.items() if k in SUBJECT_KEYS}
        kwargs = {
            SUBJECT_KEYS[k]: f.strings(v, f"{what} condition {i} {k}")
            for k, v in sub_fields.items()
        }
        expr, text = f.expression(cf["when"], f"{what} condition {i} when")
        label = f.text(cf["label"], "label") if "label" in cf else f"condition {i}"
        conditions.append(CorrelateCondition(Subject(**kwargs), expr, text, label))
    return Correlation(f.duration(fields["within"], f"{what} within"), tuple(conditions))


def _parse_file(path: str, text: str) -> list[Rule]:
    f = NodeReader(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise RuleFileError(path, line, col, f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise RuleFileError(path, 0, 0, f"invalid YAML: {exc}") from None
    if root is None:
        return []
    items = root
    if isinstance(root, MappingNode):
        top = f.mapping(root, "rule file", frozenset({"rules"}))
        if "rules" not in top:
            raise f.error(root, "rule file: needs a 'rules:' list")
        items = top["rules"]
    if not isinstance(items, SequenceNode):
        raise f.error(items, "rule file: expected a list of rules")
    return [_rule(f, item) for item in items.value]


def load_rules_text(text: str, name: str = "<text>") -> tuple[Rule, ...]:
    """Rules from YAML text (for tests and tools); ``name`` appears in errors."""
    rules = _parse_file(name, text)
    _check_unique(rules)
    return tuple(rules)


def _check_unique(rules: list[Rule]) -> None:
    seen: dict[str, Rule] = {}
    for rule in rules:
        if rule.id in seen:
            path, _, line = rule.source.rpartition(":")
            raise RuleFileError(
                path,
                int(line),
                1,
                f"duplicate rule id {rule.id!r} (first at {seen[rule.id].source})",
            )
        seen[rule.id] = rule


def _rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules loaded from one file or folder.

    Attributes:
        path: The file or folder.
        rules: The rules, in file order.
        fingerprint: ``(file, mtime_ns, size)`` of each file read, to detect changes.
    """

    path: Path
    rules: tuple[Rule, ...]
    fingerprint: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RuleSet:
        """Load and validate every rule file at ``path``.

        Raises:
            RuleFileError: The first problem found, with file, line and reason.
        """
        root = Path(path)
        if not root.exists():
            raise RuleFileError(str(root), 0, 0, "no such file or folder")
        rules: list[Rule] = []
        prints: list[tuple[str, int, int]] = []
        for file in _rule_files(root):
            try:
                stat = file.stat()
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise RuleFileError(str(file), 0, 0, f"cannot read: {exc}") from exc
            prints.append((str(file), stat.st_mtime_ns, stat.st_size))
            rules.extend(_parse_file(str(file), text))
        _check_unique(rules)
        return cls(root, tuple(rules), tuple(prints))

    def reload(self) -> RuleSet:
        """A freshly loaded set from the same path; ``self`` is never changed.

        Raises:
            RuleFileError: When the files are now invalid (keep using ``self``).
        """
        return RuleSet.load(self.path)

    def changed(self) -> bool:
        """Whether any rule file was added, removed or modified since loading."""
        try:
            now = []
            for file in _rule_files(self.path):
                stat = file.stat()
                now.append((str(file), stat.st_mtime_ns, stat.st_size))
        except OSError:
            return True
        return tuple(now) != self.fingerprint

    def get(self, rule_id: str) -> Rule:
        """The rule with ``rule_id``; ``KeyError`` when absent."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)
