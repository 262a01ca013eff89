from __future__ import annotations

import os
from pathlib import Path

import pytest

from rules import RuleFileError, RuleSet, load_rules_text, parse_duration

GOOD = """\
rules:
  - id: congestion
    name: Congestion
    description: slow and full
    subject:
      {domain: traffic, district: [chuo, "eki*"], kind: loop-detector, device: "loop-*",
       channel: occupancy}
    when: avg(5m) > 0.6
    for: 5m
    clear_when: avg(5m) < 0.45
    max_gap: 3m
    severity: minor
    message: "Congestion at {device} in {district}: {value:.0%}"
    ack_timeout: 10m
    escalation:
      - {after: 0s, notify: engineer}
      - {after: 10m, notify: admin, severity: critical}
    ack_role: operator
    resolve_manually: false
    renotify_after: 1h
    category: traffic
    subcategory: trafficJam
"""


def load_error(text: str) -> RuleFileError:
    with pytest.raises(RuleFileError) as info:
        load_rules_text(text, "t.yaml")
    return info.value


def test_full_rule_loads() -> None:
    (rule,) = load_rules_text(GOOD)
    assert rule.kind == "series"
    assert rule.for_s == 300.0
    assert rule.max_gap_s == 180.0
    assert rule.ack_timeout_s == 600.0
    assert rule.renotify_after_s == 3600.0
    assert [s.notify for s in rule.escalation] == ["engineer", "admin"]
    assert rule.escalation[1].severity == "critical"
    assert rule.subject.districts == ("chuo", "eki*")
    assert rule.subject.matches("traffic", "ekimae", "loop-detector", "loop-1", "occupancy")
    assert not rule.subject.matches("traffic", "aoba", "loop-detector", "loop-1", "occupancy")
    assert not rule.subject.matches("traffic", "chuo", "loop-detector", "x-1", "occupancy")
    assert rule.windows() == {None: 300.0}
    assert rule.source == "<text>:2"


def test_bare_list_and_empty_file() -> None:
    assert len(load_rules_text(GOOD.replace("rules:\n", "").replace("\n  ", "\n")[0:0] + "[]")) == 0
    assert load_rules_text("") == ()


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("    for: 5m\n", "    for: 5 minutes\n", 9, "not a duration"),
        ("    for: 5m\n", "    for: 300\n", 9, "not a duration"),
        ("    for: 5m\n", "    fore: 5m\n", 9, "unknown key 'fore'"),
        ("severity: minor", "severity: urgent", 12, "'urgent' is not one of"),
        ("ack_role: operator", "ack_role: boss", 18, "not one of"),
        ("category: traffic", "category: roads", 21, "category 'roads'"),
        ("{value:.0%}", "{speed}", 13, "unknown placeholder {speed}"),
        ("{value:.0%}", "{value:.zz}", 13, "message"),
        ('device: "loop-*"', 'devices: "loop-*"', 6, "unknown key 'devices'"),
        ("domain: traffic", "domain: roads", 6, "unknown domain"),
        ("resolve_manually: false", "resolve_manually: maybe", 19, "true or false"),
        ("id: congestion", "id: Congestion!", 2, "must match"),
        ("{after: 0s, notify: engineer}", "{after: 20m, notify: engineer}", 17, "in order"),
        ("    ack_timeout: 10m\n", "", 15, "escalation needs an ack_timeout"),
        ("    when: avg(5m) > 0.6\n", "", 2, "needs 'when'"),
        ("    name: Congestion\n", "", 2, "missing required key 'name'"),
    ],
)
def test_errors_give_file_line_and_reason(old: str, new: str, line: int, fragment: str) -> None:
    assert old in GOOD
    err = load_error(GOOD.replace(old, new))
    assert err.path == "t.yaml"
    assert err.line == line, str(err)
    assert fragment in err.reason, str(err)
    assert str(err).startswith(f"t.yaml:{line}:")


def test_expression_error_points_at_the_column_in_the_file() -> None:
    err = load_error(GOOD.replace("when: avg(5m) > 0.6", "when: avg(5m) >> 0.6"))
    assert err.line == 8
    # "    when: " is 10 characters; the bad '>' is column 10 of the expression
    assert err.column == 10 + 10
    assert "expression column 10" in err.reason
    quoted = load_error(GOOD.replace("when: avg(5m) > 0.6", 'when: "avg(5m) >> 0.6"'))
    assert quoted.column == 10 + 10 + 1


def test_invalid_yaml_reports_the_line() -> None:
    err = load_error("rules:\n  - id: a\n    name: [unclosed\n")
    assert "invalid YAML" in err.reason
    assert err.line >= 3


def test_device_rule_may_use_only_offline() -> None:
    err = load_error(
        "- {id: a, name: A, severity: minor, message: m, subject: {domain: emergency},"
        " when: value > 1}"
    )
    assert "device rule" in err.reason
    (rule,) = load_rules_text(
        "- {id: a, name: A, severity: minor, message: '{device}', when: offline(), for: 1m}"
    )
    assert rule.kind == "device"
    assert rule.uses_timers


def test_device_rule_message_cannot_use_value() -> None:
    err = load_error("- {id: a, name: A, severity: minor, message: '{value}', when: offline()}")
    assert "unknown placeholder {value}" in err.reason


CORRELATE = """\
- id: fire
  name: Fire
  severity: critical
  message: "fire in {district}: {devices}"
  correlate:
    within: 2m
    conditions:
      - {label: smoke, kind: smoke-detector, channel: smokeObscuration, when: value > 3}
      - {kind: fire-panel, channel: state, when: state == "alarm"}
"""


def test_correlate_rule() -> None:
    (rule,) = load_rules_text(CORRELATE)
    assert rule.kind == "correlation"
    assert rule.correlation is not None
    assert rule.correlation.within_s == 120.0
    assert [c.label for c in rule.correlation.conditions] == ["smoke", "condition 2"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (CORRELATE + "  for: 1m\n", "cannot have 'for'"),
        (
            CORRELATE.replace("{kind: fire-panel, channel: state,", "{kind: fire-panel,"),
            "needs 'channel' and 'when'",
        ),
        (CORRELATE.replace("{devices}", "{device}"), "unknown placeholder {device}"),
    ],
)
def test_correlate_errors(text: str, fragment: str) -> None:
    assert fragment in load_error(text).reason


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)
    with pytest.raises(RuleFileError) as info:
        RuleSet.load(tmp_path)
    assert info.value.path.endswith("b.yml")
    assert "duplicate rule id 'congestion'" in info.value.reason
    assert "a.yaml:2" in info.value.reason


def test_folder_load_and_reload_keeps_previous_on_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("ignored")
    first = RuleSet.load(tmp_path)
    assert [r.id for r in first] == ["congestion"]
    assert not first.changed()
    (tmp_path / "b.yaml").write_text("rules:\n  - id: broken\n    name: B\n")
    assert first.changed()
    current = first
    with pytest.raises(RuleFileError) as info:
        current = current.reload()
    assert info.value.path.endswith("b.yaml")
    assert info.value.line == 2
    assert current is first  # the caller still runs the previous rules
    assert [r.id for r in current] == ["congestion"]
    (tmp_path / "b.yaml").write_text(GOOD.replace("id: congestion", "id: second"))
    os.utime(tmp_path / "b.yaml", ns=(1, 1))
    current = current.reload()
    assert [r.id for r in current] == ["congestion", "second"]
    assert current.get("second").id == "second"
    with pytest.raises(KeyError):
        current.get("nope")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="no such file"):
        RuleSet.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("2d", 172800.0), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "5w", "1h-2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
