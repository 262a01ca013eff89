"""Backtest reports: the alerts a rule set would have raised, and their quality.

Pure: a list of :class:`~rules.engine.AlertSignal` in, report values out,
plus their JSON shape and rich tables for the command line (building a table
prints nothing). The signals go through the real :class:`AlertLifecycle`,
with nobody acting on them, so an alert here is what the console would have
shown had nobody acknowledged anything: one open alert per (rule, subject),
a new raise while it is open counts an occurrence, and a suppressed alert
(device offline) closes when it clears.

The quality figures are ISA-18.2's (FACTS.md): they count *annunciated*
raises, the ones that would have paged someone (a new alert, or a cleared
alert becoming active again), not the suppressed ones.

* alerts per hour over the whole span, and the most in any 60 minutes;
* the peak in any 10 minutes, and floods: a flood starts when more than 10
  alerts fall in 10 minutes and ends when the 10-minute count drops back to
  10 or fewer;
* chattering alerts (latched by the evaluator: 3 cycles in 60 s);
* standing alerts: active without a break for more than 24 hours;
* the priority mix: share of the annunciated raises per severity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any, Final, TypedDict

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from rules.alerts import Alert
from rules.durations import format_duration
from rules.engine import AlertSignal
from rules.lifecycle import AlertLifecycle
from rules.model import SEVERITIES, Severity

__all__ = [
    "AlertDiff",
    "AlertRow",
    "BacktestReport",
    "Comparison",
    "InputSummary",
    "QualityFigures",
    "SpeedFigures",
    "build_report",
    "compare_reports",
    "comparison_json",
    "quality_figures",
    "render_comparison",
    "render_report",
    "report_json",
]

FLOOD_THRESHOLD: Final = 10
"""ISA-18.2: more than this many alerts in ``FLOOD_WINDOW_S`` is a flood."""
FLOOD_WINDOW_S: Final = 600.0
HOUR_S: Final = 3600.0
STANDING_AFTER_S: Final = 86_400.0
"""ISA-18.2: an alert active longer than this is a standing alert."""
_MIX_ORDER: Final[tuple[Severity, ...]] = tuple(reversed(SEVERITIES))  # critical first


@dataclass(frozen=True, slots=True)
class AlertRow:
    """One alert that would have fired.

    Attributes:
        rule_id: The rule.
        subject: ``rule|device|channel`` (the key of the one open alert).
        severity: The rule's severity.
        raised_at: First raise, device time.
        cleared_at: Last clear, or ``None`` when still active at the end.
        occurrences: Raises counted on this alert (the lifecycle's count).
        chattering: Latched as chattering.
        suppressed: Opened suppressed (its device was offline): it pages nobody.
        raise_times: Every raise, in order.
        longest_active_s: The longest stretch the condition stayed active
            (an alert still active counts up to the end of the input).
        message: The message of the first raise.
    """

    rule_id: str
    subject: str
    severity: Severity
    raised_at: float
    cleared_at: float | None
    occurrences: int
    chattering: bool
    suppressed: bool
    raise_times: tuple[float, ...]
    longest_active_s: float
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What a comparison matches on: rule id and subject."""
        return self.rule_id, self.subject


@dataclass(frozen=True, slots=True)
class QualityFigures:
    """ISA-18.2's alert-quality measures over one backtest.

    Attributes:
        duration_s: Simulated time covered.
        alerts: Annunciated raises (they would have paged someone).
        alerts_per_hour: ``alerts`` over the duration in hours.
        max_per_hour: Most annunciated raises in any 60 minutes.
        peak_10min: Most annunciated raises in any 10 minutes.
        peak_10min_at: End of that 10-minute window.
        floods: Floods (more than 10 alerts in 10 minutes).
        chattering: Alerts latched as chattering (suppressed ones excepted).
        standing: Alerts active for more than 24 hours without a break
            (suppressed ones excepted).
        suppressed: Raises recorded as suppressed (not annunciated).
        priority_mix: Percentage of ``alerts`` per severity, critical first.
    """

    duration_s: float
    alerts: int
    alerts_per_hour: float
    max_per_hour: int
    peak_10min: int
    peak_10min_at: float | None
    floods: int
    chattering: int
    standing: int
    suppressed: int
    priority_mix: dict[Severity, float]


@dataclass(frozen=True, slots=True)
class InputSummary:
    """What was read, for the report's header.

    Attributes:
        source: ``recording PATH`` or ``database FROM..TO``.
        messages: MQTT messages read (recordings) or rows read (database).
        readings: Readings evaluated.
        presences: Presence changes applied.
        malformed: Messages that did not decode (the live ingester would
            have dead-lettered them).
        ignored: Messages on topics that carry no device data (e.g. ``cityops/alerts/…``).
        corrupt_blocks: Recording blocks skipped as corrupt.
        truncated_tail: The recording ended in a torn block.
    """

    source: str
    messages: int = 0
    readings: int = 0
    presences: int = 0
    malformed: int = 0
    ignored: int = 0
    corrupt_blocks: int = 0
    truncated_tail: bool = False


@dataclass(frozen=True, slots=True)
class SpeedFigures:
    """How fast the backtest ran (``--speed-report``)."""

    elapsed_s: float
    readings: int
    simulated_s: float
    ticks: int

    @property
    def readings_per_s(self) -> float:
        """Readings evaluated per wall-clock second."""
        return self.readings / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.simulated_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BacktestReport:
    """The alerts one rule set would have raised over one input."""

    rules: str
    start: float
    end: float
    alerts: tuple[AlertRow, ...]
    figures: QualityFigures
    inputs: InputSummary
    speed: SpeedFigures | None = None


@dataclass(frozen=True, slots=True)
class AlertDiff:
    """One (rule, subject) as raised under rule set A and under rule set B."""

    rule_id: str
    subject: str
    severity: Severity
    a_raises: tuple[float, ...]
    b_raises: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Comparison:
    """How two rule sets differ over the same input."""

    a: BacktestReport
    b: BacktestReport
    only_a: tuple[AlertDiff, ...]
    only_b: tuple[AlertDiff, ...]
    changed: tuple[AlertDiff, ...]
    """In both, raised at different times (or a different number of times)."""


# -- building ------------------------------------------------------------------


class _SignalClock:
    """The lifecycle's clock: the time of the signal being applied."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


@dataclass(slots=True)
class _Track:
    alert: Alert
    suppressed: bool
    seq: int = 0
    raise_times: list[float] = field(default_factory=list)
    active_since: float | None = None
    longest_active_s: float = 0.0

    def row(self, end: float) -> AlertRow:
        longest = self.longest_active_s
        if self.active_since is not None:
            longest = max(longest, end - self.active_since)
        a = self.alert
        return AlertRow(
            rule_id=a.rule_id,
            subject=a.subject,
            severity=a.severity,
            raised_at=a.raised_at,
            cleared_at=None if a.active else a.cleared_at,
            occurrences=a.occurrences,
            chattering=a.chattering,
            suppressed=self.suppressed,
            raise_times=tuple(self.raise_times),
            longest_active_s=longest,
            message=a.message,
        )


def _alerts(
    signals: Iterable[AlertSignal], end: float
) -> tuple[list[AlertRow], list[tuple[float, Severity]], int]:
    """Alert rows, annunciated raises (time, severity), and the count of suppressed raises."""
    clock = _SignalClock()
    ids = count(1)
    lifecycle = AlertLifecycle((), clock=clock, new_id=lambda: f"bt-{next(ids)}")
    open_: dict[str, _Track] = {}
    done: list[_Track] = []
    annunciated: list[tuple[float, Severity]] = []
    suppressed = 0
    for s in signals:
        clock.t = s.ts
        track = open_.get(s.subject)
        if s.kind == "raise":
            alert, event = lifecycle.raise_(s, track.alert if track is not None else None)
            if track is None:
                suppressed_open = alert.state == "suppressed"
                track = open_[s.subject] = _Track(alert, suppressed_open, seq=next(ids))
            track.alert = alert
            track.raise_times.append(s.ts)
            if track.active_since is None:
                track.active_since = s.ts
            if event.to_state == "active_unacked" and event.from_state != "active_unacked":
                annunciated.append((s.ts, s.severity))
            else:
                suppressed += 1
        elif track is not None and track.alert.active:
            track.alert, _ = lifecycle.clear(track.alert, s)
            if track.active_since is not None:
                track.longest_active_s = max(track.longest_active_s, s.ts - track.active_since)
                track.active_since = None
            if track.alert.state == "closed":
                done.append(open_.pop(s.subject))
    tracks = sorted((*done, *open_.values()), key=lambda t: (t.alert.raised_at, t.seq))
    return [t.row(end) for t in tracks], annunciated, suppressed


def _window_counts(times: Sequence[float], window_s: float) -> tuple[int, float | None, int]:
    """Peak count in any window ``(t - window_s, t]``, where it ended, and floods.

    A flood starts when the count goes above ``FLOOD_THRESHOLD`` and ends when
    it falls back to the threshold or below (just before the next raise).
    """
    peak, peak_at, floods, in_flood = 0, None, 0, False
    first = 0
    for i, t in enumerate(times):
        while times[first] <= t - window_s:
            first += 1
        if i - first <= FLOOD_THRESHOLD:
            in_flood = False
        n = i - first + 1
        if n > peak:
            peak, peak_at = n, t
        if n > FLOOD_THRESHOLD and not in_flood:
            floods, in_flood = floods + 1, True
    return peak, peak_at, floods


def quality_figures(
    rows: Sequence[AlertRow],
    annunciated: Sequence[tuple[float, Severity]],
    *,
    duration_s: float,
    suppressed: int = 0,
) -> QualityFigures:
    """ISA-18.2's figures from alert rows and the annunciated raises (time, severity)."""
    times = sorted(t for t, _ in annunciated)
    peak, peak_at, floods = _window_counts(times, FLOOD_WINDOW_S)
    max_hour, _, _ = _window_counts(times, HOUR_S)
    n = len(times)
    by_severity = dict.fromkeys(_MIX_ORDER, 0)
    for _, severity in annunciated:
        by_severity[severity] += 1
    hours = max(duration_s, 1.0) / HOUR_S
    return QualityFigures(
        duration_s=duration_s,
        alerts=n,
        alerts_per_hour=n / hours,
        max_per_hour=max_hour,
        peak_10min=peak,
        peak_10min_at=peak_at,
        floods=floods,
        chattering=sum(1 for r in rows if r.chattering and not r.suppressed),
        standing=sum(1 for r in rows if r.longest_active_s > STANDING_AFTER_S and not r.suppressed),
        suppressed=suppressed,
        priority_mix={s: (100.0 * k / n if n else 0.0) for s, k in by_severity.items()},
    )


def build_report(
    signals: Iterable[AlertSignal],
    *,
    rules: str,
    start: float,
    end: float,
    inputs: InputSummary,
    speed: SpeedFigures | None = None,
) -> BacktestReport:
    """The report of one backtest.

    Args:
        signals: The evaluator's signals, in the order it produced them.
        rules: The rule file or folder, as the user named it.
        start: Start of the input, simulated time.
        end: End of the input, simulated time.
        inputs: What was read.
        speed: How fast it ran, when asked for.
    """
    rows, annunciated, suppressed = _alerts(signals, end)
    figures = quality_figures(rows, annunciated, duration_s=end - start, suppressed=suppressed)
    return BacktestReport(rules, start, end, tuple(rows), figures, inputs, speed)


def _by_key(report: BacktestReport) -> dict[tuple[str, str], tuple[Severity, list[float]]]:
    out: dict[tuple[str, str], tuple[Severity, list[float]]] = {}
    for row in report.alerts:
        out.setdefault(row.key, (row.severity, []))[1].extend(row.raise_times)
    return out


def compare_reports(a: BacktestReport, b: BacktestReport) -> Comparison:
    """Alerts only in A, only in B, and in both with different raise times.

    Alerts match by rule id and subject; raise times are compared to the
    millisecond.
    """
    ka, kb = _by_key(a), _by_key(b)
    only_a, only_b, changed = [], [], []
    for key in sorted(ka.keys() | kb.keys()):
        sev_a, times_a = ka.get(key, (None, []))
        sev_b, times_b = kb.get(key, (None, []))
        severity = sev_a or sev_b
        assert severity is not None  # the key came from one of them
        diff = AlertDiff(key[0], key[1], severity, tuple(sorted(times_a)), tuple(sorted(times_b)))
        if not times_b:
            only_a.append(diff)
        elif not times_a:
            only_b.append(diff)
        elif [round(t, 3) for t in diff.a_raises] != [round(t, 3) for t in diff.b_raises]:
            changed.append(diff)

    def first(d: AlertDiff) -> float:
        return min(d.a_raises or d.b_raises)

    return Comparison(
        a,
        b,
        tuple(sorted(only_a, key=first)),
        tuple(sorted(only_b, key=first)),
        tuple(sorted(changed, key=first)),
    )


# -- JSON ------------------------------------------------------------------------


class AlertJson(TypedDict):
    """One alert row as JSON (times in epoch seconds)."""

    rule_id: str
    subject: str
    severity: str
    raised_at: float
    cleared_at: float | None
    occurrences: int
    chattering: bool
    suppressed: bool
    raise_times: list[float]
    longest_active_s: float
    message: str


def _alert_json(row: AlertRow) -> AlertJson:
    return {
        "rule_id": row.rule_id,
        "subject": row.subject,
        "severity": row.severity,
        "raised_at": row.raised_at,
        "cleared_at": row.cleared_at,
        "occurrences": row.occurrences,
        "chattering": row.chattering,
        "suppressed": row.suppressed,
        "raise_times": list(row.raise_times),
        "longest_active_s": row.longest_active_s,
        "message": row.message,
    }


def _figures_json(f: QualityFigures) -> dict[str, Any]:
    return {
        "duration_s": f.duration_s,
        "alerts": f.alerts,
        "alerts_per_hour": round(f.alerts_per_hour, 3),
        "max_per_hour": f.max_per_hour,
        "peak_10min": f.peak_10min,
        "peak_10min_at": f.peak_10min_at,
        "floods": f.floods,
        "chattering": f.chattering,
        "standing": f.standing,
        "suppressed": f.suppressed,
        "priority_mix": {k: round(v, 2) for k, v in f.priority_mix.items()},
    }


def report_json(report: BacktestReport) -> dict[str, Any]:
    """The report as a JSON-ready mapping."""
    i = report.inputs
    out: dict[str, Any] = {
        "rules": report.rules,
        "start": report.start,
        "end": report.end,
        "input": {
            "source": i.source,
            "messages": i.messages,
            "readings": i.readings,
            "presences": i.presences,
            "malformed": i.malformed,
            "ignored": i.ignored,
            "corrupt_blocks": i.corrupt_blocks,
            "truncated_tail": i.truncated_tail,
        },
        "alerts": [_alert_json(r) for r in report.alerts],
        "quality": _figures_json(report.figures),
    }
    if report.speed is not None:
        s = report.speed
        out["speed"] = {
            "elapsed_s": round(s.elapsed_s, 3),
            "readings": s.readings,
            "readings_per_s": round(s.readings_per_s, 1),
            "simulated_s": s.simulated_s,
            "speedup": round(s.speedup, 1),
            "ticks": s.ticks,
        }
    return out


def _diff_json(d: AlertDiff) -> dict[str, Any]:
    return {
        "rule_id": d.rule_id,
        "subject": d.subject,
        "severity": d.severity,
        "a_raises": list(d.a_raises),
        "b_raises": list(d.b_raises),
    }


def comparison_json(c: Comparison) -> dict[str, Any]:
    """A comparison as a JSON-ready mapping: both reports and their differences."""
    return {
        "a": report_json(c.a),
        "b": report_json(c.b),
        "only_a": [_diff_json(d) for d in c.only_a],
        "only_b": [_diff_json(d) for d in c.only_b],
        "changed": [_diff_json(d) for d in c.changed],
    }


# -- text ------------------------------------------------------------------------

_SEVERITY_STYLE: Final = {
    "critical": "bold red",
    "major": "red",
    "minor": "yellow",
    "warning": "cyan",
}


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _severity(severity: str) -> Text:
    return Text(severity, style=_SEVERITY_STYLE.get(severity, ""))


def _header(report: BacktestReport) -> Text:
    i = report.inputs
    span = format_duration(max(report.end - report.start, 0.0))
    lines = [
        f"Backtest of {report.rules} over {i.source}",
        f"  {_iso(report.start)} → {_iso(report.end)} ({span} of simulated time)",
        f"  {i.messages:,} messages, {i.readings:,} readings, {i.presences:,} presence changes,"
        f" {i.malformed:,} malformed, {i.ignored:,} ignored",
    ]
    if i.corrupt_blocks or i.truncated_tail:
        lines.append(
            f"  recording: {i.corrupt_blocks} corrupt blocks skipped"
            + (", torn tail ignored" if i.truncated_tail else "")
        )
    return Text("\n".join(lines))


def _alerts_table(rows: Sequence[AlertRow], max_rows: int) -> RenderableType:
    table = Table(title=f"Alerts that would have fired ({len(rows)})", title_justify="left")
    for name in ("raised at", "rule", "subject", "severity", "cleared at", "occ.", "flags"):
        table.add_column(name, justify="right" if name == "occ." else "left")
    shown = rows if max_rows <= 0 else rows[:max_rows]
    for r in shown:
        flags = ", ".join(
            name for name, on in (("chattering", r.chattering), ("suppressed", r.suppressed)) if on
        )
        table.add_row(
            _iso(r.raised_at),
            r.rule_id,
            r.subject.split("|", 1)[1],
            _severity(r.severity),
            _iso(r.cleared_at) if r.cleared_at is not None else "still active",
            str(r.occurrences),
            flags,
        )
    if len(shown) < len(rows):
        more = len(rows) - len(shown)
        return Group(table, Text(f"… {more:,} more alerts (--max-rows 0 shows all, or --json)"))
    return table


def _figure_rows(f: QualityFigures) -> list[tuple[str, str, str]]:
    mix = " / ".join(f"{f.priority_mix[s]:.0f}" for s in _MIX_ORDER)
    return [
        ("simulated time", format_duration(f.duration_s), ""),
        ("alerts (annunciated)", f"{f.alerts:,}", ""),
        ("alerts per hour", f"{f.alerts_per_hour:.1f}", "≈ 6 (12 at most)"),
        ("most in any hour", f"{f.max_per_hour:,}", "≤ 12"),
        ("peak in any 10 min", f"{f.peak_10min:,}", "≤ 10"),
        ("floods (> 10 in 10 min)", f"{f.floods:,}", "0"),
        ("chattering alerts", f"{f.chattering:,}", "0"),
        ("standing alerts (> 24 h)", f"{f.standing:,}", "< 5"),
        ("suppressed raises", f"{f.suppressed:,}", ""),
        (f"priority mix % ({' / '.join(_MIX_ORDER)})", mix, "≈ 5 high / 15 medium / 80 low"),
    ]


def _quality_table(figures: Sequence[QualityFigures], names: Sequence[str]) -> Table:
    table = Table(title="Alert quality (ISA-18.2)", title_justify="left")
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("target")
    columns = [_figure_rows(f) for f in figures]
    for i, (label, _, target) in enumerate(columns[0]):
        table.add_row(label, *(col[i][1] for col in columns), target)
    return table


def _speed_text(speed: SpeedFigures) -> Text:
    return Text(
        f"Speed: {speed.readings:,} readings in {speed.elapsed_s:.2f} s"
        f" ({speed.readings_per_s:,.0f} readings/s, {speed.speedup:,.0f}x real time,"
        f" {speed.ticks:,} ticks)"
    )


def render_report(report: BacktestReport, *, max_rows: int = 200) -> list[RenderableType]:
    """The report as rich renderables: header, alerts table, quality table."""
    out: list[RenderableType] = [
        _header(report),
        _alerts_table(report.alerts, max_rows),
        _quality_table([report.figures], ["value"]),
    ]
    if report.speed is not None:
        out.append(_speed_text(report.speed))
    return out


def _diff_table(title: str, diffs: Sequence[AlertDiff], max_rows: int) -> RenderableType:
    if not diffs:
        return Text(f"{title}: none")
    table = Table(title=f"{title} ({len(diffs)})", title_justify="left")
    for name in ("rule", "subject", "severity", "A first raise", "B first raise", "A", "B"):
        table.add_column(name, justify="right" if name in ("A", "B") else "left")
    shown = diffs if max_rows <= 0 else diffs[:max_rows]
    for d in shown:
        table.add_row(
            d.rule_id,
            d.subject.split("|", 1)[1],
            _severity(d.severity),
            _iso(d.a_raises[0]) if d.a_raises else "-",
            _iso(d.b_raises[0]) if d.b_raises else "-",
            str(len(d.a_raises)),
            str(len(d.b_raises)),
        )
    if len(shown) < len(diffs):
        return Group(table, Text(f"… {len(diffs) - len(shown):,} more"))
    return table


def render_comparison(c: Comparison, *, max_rows: int = 200) -> list[RenderableType]:
    """A comparison as rich renderables: the differences, then the figures side by side."""
    out: list[RenderableType] = [
        _header(c.a),
        Text(f"compared with {c.b.rules}"),
        _diff_table(f"Only with A ({c.a.rules})", c.only_a, max_rows),
        _diff_table(f"Only with B ({c.b.rules})", c.only_b, max_rows),
        _diff_table("In both, raised at different times", c.changed, max_rows),
        _quality_table([c.a.figures, c.b.figures], ["A", "B"]),
    ]
    if c.a.speed is not None:
        out.append(_speed_text(c.a.speed))
    return out
