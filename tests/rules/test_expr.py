from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import ExpressionError, parse_expression
from rules.expr import Binary, Call, Dur, Name, Num, Str, Unary


def test_precedence_and_binds_tighter_than_or() -> None:
    node = parse_expression("value > 1 or value < 0 and state == 'x'")
    assert isinstance(node, Binary)
    assert node.op == "or"
    assert isinstance(node.right, Binary)
    assert node.right.op == "and"


def test_arithmetic_precedence_and_unary_minus() -> None:
    node = parse_expression("-value * 2 + 1 > 3")
    assert isinstance(node, Binary)
    assert node.op == ">"
    left = node.left
    assert isinstance(left, Binary)
    assert left.op == "+"
    assert isinstance(left.left, Binary)
    assert left.left.op == "*"
    assert isinstance(left.left.left, Unary)


def test_not_applies_to_the_comparison() -> None:
    node = parse_expression("not value > 3 and true")
    assert isinstance(node, Binary)
    assert node.op == "and"
    assert isinstance(node.left, Unary)
    assert node.left.op == "not"


def test_durations_and_calls() -> None:
    node = parse_expression(
        'avg(1h30m) > 2 and no_data(500ms) or within(2m, value > 1, max(1m, "t") > 2)'
    )
    calls = [n for n in __import__("rules.expr").expr.walk(node) if isinstance(n, Call)]
    assert [c.func for c in calls] == ["avg", "no_data", "within", "max"]
    first = calls[0].args[0]
    assert isinstance(first, Dur)
    assert first.seconds == 5400.0
    second = calls[1].args[0]
    assert isinstance(second, Dur)
    assert second.seconds == 0.5
    assert isinstance(calls[3].args[1], Str)


def test_literals() -> None:
    node = parse_expression("value >= 1.5e2")
    assert isinstance(node, Binary)
    assert isinstance(node.right, Num)
    assert node.right.value == 150.0
    assert isinstance(node.left, Name)
    node = parse_expression('state == "a\\"b"')
    assert isinstance(node, Binary)
    assert isinstance(node.right, Str)
    assert node.right.value == 'a"b'


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("value >", 8, "ends too early"),
        ("value > 3)", 10, "unexpected ')'"),
        ("(value > 3", 11, "expected ')'"),
        ("value = 3", 7, "'=='"),
        ("value > 3 $", 11, "unexpected character"),
        ("foo(1m) > 1", 1, "unknown function 'foo'"),
        ("valu > 1", 1, "unknown name 'valu'"),
        ("1 < value < 3", 11, "do not chain"),
        ("state > 3", 7, "needs numbers"),
        ("state == 3", 7, "cannot compare a str with a num"),
        ("avg(x) > 1", 5, "unknown name"),
        ("avg(5) > 1", 1, "duration literal"),
        ("avg(5x) > 1", 6, "unknown duration unit"),
        ("avg(5m, 3) > 1", 9, "channel must be a string"),
        ("offline(1m)", 1, "no arguments"),
        ("within(2m, value > 1)", 1, "at least two"),
        ("within(2m, value, value > 1)", 12, "true/false"),
        ("value + 1", 1, "a num, a bool is needed"),
        ("'abc", 1, "unterminated"),
        ("", 1, "empty"),
        ("value > 1 and", 14, "ends too early"),
        ("and value > 1", 1, "needs a condition"),
        ("not 3", 1, "needs a bool"),
        ("value > 1 or 2", 11, "joins conditions"),
        ("abs('x') > 1", 1, "one number"),
        ("zscore(3) > 1", 1, "channel name"),
        ("within(1m, value > 1, within(1m, true, true))", 23, "cannot nest"),
        ("avg(0s) > 1", 5, "positive"),
    ],
)
def test_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(text)
    assert info.value.column == column, str(info.value)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"column {column}: ")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="value state avg(5m) <>=!+-*/()\"'.,0123456789 andornot", max_size=40))
def test_any_text_parses_or_raises_expression_error(text: str) -> None:
    column = 0
    try:
        parse_expression(text)
    except ExpressionError as exc:
        column = exc.column
    else:
        return
    assert 1 <= column <= len(text) + 1
