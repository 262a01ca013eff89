"""The rule expression language: tokenizer, Pratt parser and type checker.

Expressions are parsed into a small immutable AST, never ``eval``-ed::

    value > 0.85 and avg(5m) > 0.7
    state == "alarm" or state == "trouble"
    rate(1m) > 0.05 and not offline()
    within(2m, value > 3, max(1m, "temperature") > 45)

Grammar (lowest binding first)::

    expr     := or
    or       := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | compare
    compare  := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/") unary)*
    unary    := "-" unary | primary
    primary  := NUMBER | DURATION | STRING | "true" | "false"
              | "value" | "state" | NAME "(" [expr ("," expr)*] ")" | "(" expr ")"

Every error names the 1-based column of the offending token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from rules.errors import ExpressionError
from rules.lexer import Token, tokenize

__all__ = [
    "FUNCTIONS",
    "Binary",
    "Bool",
    "Call",
    "Dur",
    "Name",
    "Node",
    "Num",
    "Str",
    "Type",
    "Unary",
    "parse_expression",
    "walk",
]

Type = Literal["num", "bool", "str"]


@dataclass(frozen=True, slots=True)
class Num:
    """A number literal."""

    value: float
    col: int


@dataclass(frozen=True, slots=True)
class Dur:
    """A duration literal (``10m``), in seconds; a number where one is expected."""

    seconds: float
    col: int


@dataclass(frozen=True, slots=True)
class Str:
    """A string literal."""

    value: str
    col: int


@dataclass(frozen=True, slots=True)
class Bool:
    """``true`` or ``false``."""

    value: bool
    col: int


@dataclass(frozen=True, slots=True)
class Name:
    """``value`` (the current number) or ``state`` (the current state string)."""

    name: Literal["value", "state"]
    col: int


@dataclass(frozen=True, slots=True)
class Unary:
    """``-x`` or ``not x``."""

    op: Literal["-", "not"]
    operand: Node
    col: int


@dataclass(frozen=True, slots=True)
class Binary:
    """Arithmetic, comparison or boolean operator."""

    op: str
    left: Node
    right: Node
    col: int


@dataclass(frozen=True, slots=True)
class Call:
    """A function call such as ``avg(5m)`` or ``within(2m, a, b)``."""

    func: str
    args: tuple[Node, ...]
    col: int


Node = Num | Dur | Str | Bool | Name | Unary | Binary | Call

WINDOW_FUNCTIONS = frozenset({"avg", "min", "max", "p95", "count", "rate", "delta", "sum"})
FUNCTIONS: dict[str, str] = {
    **{name: "window aggregate: (duration[, channel]) → number" for name in WINDOW_FUNCTIONS},
    "no_data": "(duration[, channel]) → bool: no reading for that long",
    "offline": "() → bool: the device's presence is offline",
    "zscore": "([channel]) → number: against the learned hour-of-week profile",
    "within": "(duration, cond, cond, ...) → bool: every condition true within the window",
    "abs": "(number) → number",
}
_COMPARE = frozenset({"<", "<=", ">", ">=", "==", "!="})
_BINDING = {"or": 1, "and": 2, **dict.fromkeys(_COMPARE, 4), "+": 5, "-": 5, "*": 6, "/": 6}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    def error(self, reason: str, col: int) -> ExpressionError:
        return ExpressionError(reason, col, self.text)

    @property
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, text: str) -> Token:
        tok = self.peek
        if tok.text != text or tok.kind not in ("op", "name"):
            found = repr(tok.text) if tok.kind != "end" else "end of expression"
            msg = f"expected {text!r}, found {found}"
            raise self.error(msg, tok.col)
        return self.take()

    def parse(self) -> Node:
        node = self.expression(0)
        tok = self.peek
        if tok.kind != "end":
            msg = f"unexpected {tok.text!r} after a complete expression"
            raise self.error(msg, tok.col)
        return node

    def binding(self, tok: Token) -> int:
        if tok.kind in ("op", "name"):
            return _BINDING.get(tok.text, 0)
        return 0

    def expression(self, min_bp: int) -> Node:
        left = self.prefix()
        while True:
            tok = self.peek
            bp = self.binding(tok)
            if bp <= min_bp:
                return left
            self.take()
            if tok.text in _COMPARE:
                right = self.expression(bp)
                nxt = self.peek
                if nxt.text in _COMPARE and nxt.kind == "op":
                    reason = "comparisons do not chain; join them with 'and'"
                    raise self.error(reason, nxt.col)
            else:
                right = self.expression(bp)
            left = Binary(tok.text, left, right, tok.col)

    def prefix(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return Num(tok.number, tok.col)
        if tok.kind == "dur":
            return Dur(tok.number, tok.col)
        if tok.kind == "str":
            return Str(tok.text, tok.col)
        if tok.kind == "op" and tok.text == "(":
            inner = self.expression(0)
            self.expect(")")
            return inner
        if tok.kind == "op" and tok.text == "-":
            return Unary("-", self.expression(6), tok.col)
        if tok.kind == "name":
            return self.name(tok)
        if tok.kind == "end":
            msg = "expression ends too early"
            raise self.error(msg, tok.col)
        msg = f"unexpected {tok.text!r}"
        raise self.error(msg, tok.col)

    def name(self, tok: Token) -> Node:
        word = tok.text
        if word == "not":
            return Unary("not", self.expression(3), tok.col)
        if word in ("true", "false"):
            return Bool(word == "true", tok.col)
        if word == "value":
            return Name("value", tok.col)
        if word == "state":
            return Name("state", tok.col)
        if self.peek.text == "(" and self.peek.kind == "op":
            if word not in FUNCTIONS:
                known = ", ".join(sorted(FUNCTIONS))
                msg = f"unknown function {word!r} (known: {known})"
                raise self.error(msg, tok.col)
            self.take()
            args: list[Node] = []
            if self.peek.text != ")":
                args.append(self.expression(0))
                while self.peek.text == "," and self.peek.kind == "op":
                    self.take()
                    args.append(self.expression(0))
            self.expect(")")
            return Call(word, tuple(args), tok.col)
        if word in ("and", "or"):
            msg = f"{word!r} needs a condition on its left"
            raise self.error(msg, tok.col)
        msg = f"unknown name {word!r} (use value, state or a function)"
        raise self.error(msg, tok.col)


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents first."""
    yield node
    if isinstance(node, Unary):
        yield from walk(node.operand)
    elif isinstance(node, Binary):
        yield from walk(node.left)
        yield from walk(node.right)
    elif isinstance(node, Call):
        for arg in node.args:
            yield from walk(arg)


class _Checker:
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, reason: str, col: int) -> ExpressionError:
        return ExpressionError(reason, col, self.text)

    def check(self, node: Node) -> Type:
        if isinstance(node, Num | Dur):
            return "num"
        if isinstance(node, Str):
            return "str"
        if isinstance(node, Bool):
            return "bool"
        if isinstance(node, Name):
            return "num" if node.name == "value" else "str"
        if isinstance(node, Unary):
            t = self.check(node.operand)
            want: Type = "num" if node.op == "-" else "bool"
            if t != want:
                msg = f"{node.op!r} needs a {want}, got a {t}"
                raise self.fail(msg, node.col)
            return want
        if isinstance(node, Binary):
            return self.binary(node)
        return self.call(node)

    def binary(self, node: Binary) -> Type:
        lt, rt = self.check(node.left), self.check(node.right)
        if node.op in ("and", "or"):
            if lt != "bool" or rt != "bool":
                msg = f"{node.op!r} joins conditions, got {lt} and {rt}"
                raise self.fail(msg, node.col)
            return "bool"
        if node.op in ("==", "!="):
            if lt != rt:
                msg = f"cannot compare a {lt} with a {rt}"
                raise self.fail(msg, node.col)
            return "bool"
        if lt != "num" or rt != "num":
            msg = f"{node.op!r} needs numbers, got {lt} and {rt}"
            raise self.fail(msg, node.col)
        return "bool" if node.op in _COMPARE else "num"

    def call(self, node: Call) -> Type:
        f, args = node.func, node.args
        if f in WINDOW_FUNCTIONS or f == "no_data":
            self.window_args(node, args, max_args=2)
            return "bool" if f == "no_data" else "num"
        if f == "offline":
            if args:
                msg = "offline() takes no arguments"
                raise self.fail(msg, node.col)
            return "bool"
        if f == "zscore":
            if len(args) > 1 or (args and not isinstance(args[0], Str)):
                msg = "zscore() takes an optional channel name string"
                raise self.fail(msg, node.col)
            return "num"
        if f == "abs":
            if len(args) != 1 or self.check(args[0]) != "num":
                msg = "abs() takes one number"
                raise self.fail(msg, node.col)
            return "num"
        # within(duration, cond, cond, ...)
        if len(args) < 3 or not isinstance(args[0], Dur):
            msg = "within() needs a duration and at least two conditions"
            raise self.fail(msg, node.col)
        for arg in args[1:]:
            if self.check(arg) != "bool":
                msg = "within() conditions must be true/false"
                raise self.fail(msg, _col(arg))
            for sub in walk(arg):
                if isinstance(sub, Call) and sub.func == "within":
                    msg = "within() cannot nest"
                    raise self.fail(msg, sub.col)
        return "bool"

    def window_args(self, node: Call, args: tuple[Node, ...], max_args: int) -> None:
        if not args or not isinstance(args[0], Dur):
            reason = f"{node.func}() needs a duration literal first, e.g. {node.func}(5m)"
            raise self.fail(reason, node.col)
        if args[0].seconds <= 0:
            msg = f"{node.func}() window must be positive"
            raise self.fail(msg, args[0].col)
        if len(args) > max_args:
            msg = f"{node.func}() takes a duration and an optional channel"
            raise self.fail(msg, node.col)
        if len(args) == 2 and not isinstance(args[1], Str):
            msg = f"{node.func}() channel must be a string"
            raise self.fail(msg, _col(args[1]))


def _col(node: Node) -> int:
    return node.col


def parse_expression(text: str, *, want: Type = "bool") -> Node:
    """Parse and type-check ``text``.

    Args:
        text: The expression.
        want: The type the whole expression must have.

    Returns:
        The AST.

    Raises:
        ExpressionError: With the column of the problem.
    """
    if not text.strip():
        msg = "empty expression"
        raise ExpressionError(msg, 1, text)
    node = _Parser(text).parse()
    got = _Checker(text).check(node)
    if got != want:
        msg = f"the expression is a {got}, a {want} is needed"
        raise ExpressionError(msg, 1, text)
    return node
