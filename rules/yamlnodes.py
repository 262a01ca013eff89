"""Typed reads from PyYAML nodes, with errors that carry the node's file and line."""

from __future__ import annotations

from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rules.durations import parse_duration
from rules.errors import ExpressionError, RuleFileError
from rules.expr import Node as Expr
from rules.expr import parse_expression
from rules.model import Subject

__all__ = ["SUBJECT_KEYS", "NodeReader"]

SUBJECT_KEYS: Final = {
    "domain": "domains",
    "district": "districts",
    "kind": "kinds",
    "device": "devices",
    "channel": "channels",
}
"""Subject keys in a rule file → :class:`~rules.model.Subject` fields."""


class NodeReader:
    """Reads validated values out of YAML nodes, raising errors that point at them.

    Args:
        path: The file the nodes come from, named in every error.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, node: Node | None, reason: str) -> RuleFileError:
        """An error at ``node`` (or the whole file when ``None``)."""
        if node is None:
            return RuleFileError(self.path, 0, 0, reason)
        mark = node.start_mark
        return RuleFileError(self.path, mark.line + 1, mark.column + 1, reason)

    def mapping(self, node: Node, what: str, allowed: frozenset[str]) -> dict[str, Node]:
        """The mapping ``node`` as key → value node; unknown and duplicate keys are errors."""
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        out: dict[str, Node] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                raise self.error(key, f"{what}: keys must be plain names")
            name = str(key.value)
            if name not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(key, f"{what}: unknown key {name!r} (allowed: {known})")
            if name in out:
                raise self.error(key, f"{what}: duplicate key {name!r}")
            out[name] = value
        return out

    def text(self, node: Node, what: str) -> str:
        """The scalar ``node`` as text (``null`` is an error)."""
        if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
            raise self.error(node, f"{what} must be text")
        return str(node.value)

    def strings(self, node: Node, what: str) -> tuple[str, ...]:
        """One string or a list of strings."""
        if isinstance(node, SequenceNode):
            return tuple(self.text(item, what) for item in node.value)
        return (self.text(node, what),)

    def boolean(self, node: Node, what: str) -> bool:
        """A YAML boolean."""
        if not isinstance(node, ScalarNode) or not node.tag.endswith(":bool"):
            raise self.error(node, f"{what} must be true or false")
        return str(node.value).lower() in ("true", "yes", "on")

    def duration(self, node: Node, what: str) -> float:
        """A duration such as ``5m``, in seconds."""
        text = self.text(node, what)
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise self.error(node, f"{what}: {exc}") from None
        if seconds <= 0 and what != "escalation after":
            raise self.error(node, f"{what} must be longer than 0s")
        return seconds

    def choice(self, node: Node, what: str, options: tuple[str, ...]) -> str:
        """Text that must be one of ``options``."""
        text = self.text(node, what)
        if text not in options:
            raise self.error(node, f"{what} {text!r} is not one of {', '.join(options)}")
        return text

    def expression(self, node: Node, what: str) -> tuple[Expr, str]:
        """A parsed expression; the error column is mapped into the file where possible."""
        text = self.text(node, what)
        try:
            return parse_expression(text), text
        except ExpressionError as exc:
            mark = node.start_mark
            style = getattr(node, "style", None)
            if style in (None, "'", '"') and "\n" not in text:
                col = mark.column + exc.column + (1 if style else 0)
                raise RuleFileError(
                    self.path,
                    mark.line + 1,
                    col,
                    f"{what}: {exc.reason} (expression column {exc.column})",
                ) from None
            raise self.error(node, f"{what}: {exc}") from None

    def subject(self, node: Node, what: str) -> Subject:
        """A subject mapping (``domain district kind device channel``)."""
        fields = self.mapping(node, what, frozenset(SUBJECT_KEYS))
        kwargs = {SUBJECT_KEYS[k]: self.strings(v, f"{what} {k}") for k, v in fields.items()}
        for domain in kwargs.get("domains", ()):
            if domain not in ("traffic", "facility", "emergency"):
                raise self.error(fields["domain"], f"{what}: unknown domain {domain!r}")
        return Subject(**kwargs)
