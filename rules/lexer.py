"""The tokenizer of the rule expression language (see :mod:`rules.expr`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rules.durations import UNIT_SECONDS
from rules.errors import ExpressionError

__all__ = ["Token", "tokenize"]


@dataclass(frozen=True, slots=True)
class Token:
    """One token; ``col`` is 1-based, ``number`` holds a number or seconds."""

    kind: Literal["num", "dur", "str", "name", "op", "end"]
    text: str
    col: int
    number: float = 0.0


_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([a-zA-Z]+)")


def _number(text: str, i: int) -> tuple[Token, int]:
    """A number (``1.5``, ``2e3``) or a duration (``10m``, ``1h30m``, ``500ms``) at ``i``."""
    total = 0.0
    j = i
    while True:
        m = _DURATION_PART.match(text, j)
        if m is None:
            break
        unit = m.group(2)
        if unit not in UNIT_SECONDS:
            if j == i and unit[0] in "eE" and _NUMBER.match(text, i):
                break  # an exponent, not a unit
            reason = f"unknown duration unit {unit!r} (use ms, s, m, h or d)"
            raise ExpressionError(reason, m.start(2) + 1, text)
        total += float(m.group(1)) * UNIT_SECONDS[unit]
        j = m.end()
    if j > i:
        return Token("dur", text[i:j], i + 1, total), j
    m = _NUMBER.match(text, i)
    assert m is not None
    return Token("num", m.group(0), i + 1, float(m.group(0))), m.end()


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an ``end`` token.

    Raises:
        ExpressionError: On a character or unit that is not part of the language.
    """
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        col = i + 1
        if c.isspace():
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            tok, i = _number(text, i)
            tokens.append(tok)
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(Token("name", text[i:j], col))
            i = j
        elif c in "\"'":
            j = i + 1
            buf: list[str] = []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                msg = "unterminated string"
                raise ExpressionError(msg, col, text)
            tokens.append(Token("str", "".join(buf), col))
            i = j + 1
        elif text.startswith(("<=", ">=", "==", "!="), i):
            tokens.append(Token("op", text[i : i + 2], col))
            i += 2
        elif c in "<>+-*/(),":
            tokens.append(Token("op", c, col))
            i += 1
        elif c == "=":
            msg = "'=' is not an operator; compare with '=='"
            raise ExpressionError(msg, col, text)
        else:
            msg = f"unexpected character {c!r}"
            raise ExpressionError(msg, col, text)
    tokens.append(Token("end", "", n + 1))
    return tokens
