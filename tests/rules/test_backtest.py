"""``cityops backtest``: the live evaluator over recordings and stored ranges, and its report."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from cityops.cli import main
from rules import AlertSignal, RuleSet, Severity
from rules.backtest import (
    BacktestError,
    BacktestOptions,
    InputCounts,
    RecordingSource,
    StoredRange,
    run_backtest,
)
from rules.report import (
    InputSummary,
    build_report,
    compare_reports,
    render_comparison,
    render_report,
)
from simulators import (
    RecordedMessage,
    RecordingWriter,
    Simulation,
    compile_plan,
    load_city,
    load_scenario,
)

DEFAULT = Path(__file__).resolve().parents[2] / "rules" / "default"
START = 1_780_412_400.0 + 14 * 3600  # Wednesday 2026-06-03 14:00 JST, 05:00 UTC
FIRE = ["smoke-detected", "fire-panel-alarm", "fire-confirmed"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cityops.cli.main`` configures the root logger on the captured stderr: undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def fire_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Thirty minutes of the test city with a fire at +5 min, recorded.

    The simulator runs as fast as possible straight into the recording
    writer; each message's receive time is its simulated publish time, as
    ``cityops record`` would have captured a real-time run.
    """
    city = load_city("testville")
    plan = compile_plan([load_scenario("fire")], city, start=START, seed=1)
    sim = Simulation(city, seed=1, start=START, plan=plan)
    path = tmp_path_factory.mktemp("backtest") / "fire.rec"
    with RecordingWriter(path, fsync=False) as writer:
        for m in [*sim.run(START + 30 * 60), *sim.finish()]:
            writer.append(RecordedMessage(m.t, m.topic, m.payload, m.qos, m.retain, m.content_type))
    return path


def _cli(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--log-format", "text", "backtest", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _json(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = _cli([*args, "--json"], capsys)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def _first_raises(alerts: list[dict[str, Any]], rule_ids: Sequence[str]) -> list[str]:
    """Rule ids in the order their first alert was raised (report order)."""
    seen: list[str] = []
    for a in alerts:
        if a["rule_id"] in rule_ids and a["rule_id"] not in seen:
            seen.append(a["rule_id"])
    return seen


# -- recordings -------------------------------------------------------------------


def test_fire_recording_reports_smoke_then_alarm_then_confirmation(
    fire_recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _json(["--rules", str(DEFAULT), "--recording", str(fire_recording)], capsys)
    alerts = doc["alerts"]
    assert _first_raises(alerts, FIRE) == FIRE
    first = {r: next(a["raised_at"] for a in alerts if a["rule_id"] == r) for r in FIRE}
    assert START + 300 < first["smoke-detected"] < first["fire-panel-alarm"]
    assert first["fire-panel-alarm"] <= first["fire-confirmed"] < START + 600
    assert [a["raised_at"] for a in alerts] == sorted(a["raised_at"] for a in alerts)

    inputs = doc["input"]
    assert inputs["malformed"] == inputs["ignored"] == inputs["corrupt_blocks"] == 0
    assert inputs["readings"] > inputs["messages"] > 9000
    assert inputs["presences"] == 100  # 50 devices online at the start, offline at the end

    q = doc["quality"]
    assert q["duration_s"] == pytest.approx(doc["end"] - doc["start"])
    assert q["duration_s"] == pytest.approx(1800, abs=30)
    annunciated = sum(a["occurrences"] for a in alerts if not a["suppressed"])
    assert q["alerts"] == annunciated > 0
    assert q["alerts_per_hour"] * q["duration_s"] / 3600 == pytest.approx(q["alerts"], rel=1e-3)
    assert q["peak_10min"] <= q["max_per_hour"] <= q["alerts"]
    assert sum(q["priority_mix"].values()) == pytest.approx(100, abs=0.1)
    critical = sum(1 for a in alerts if a["severity"] == "critical")
    assert q["priority_mix"]["critical"] == pytest.approx(100 * critical / q["alerts"], abs=0.01)
    assert q["chattering"] == q["standing"] == q["suppressed"] == 0


def test_text_report_and_speed_report(
    fire_recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(
        ["--rules", str(DEFAULT), "--recording", str(fire_recording), "--speed-report"], capsys
    )
    assert code == 0, err
    assert "Alerts that would have fired" in out
    assert "fire-confirmed" in out
    assert "district:kita|*" in out
    assert "still active" in out
    assert "Alert quality (ISA-18.2)" in out
    assert "floods (> 10 in 10 min)" in out
    assert re.search(r"Speed: [\d,]+ readings in [\d.]+ s", out)
    assert "backtest:" in err  # plain progress lines: stderr is not a terminal


def _write_recording(path: Path, messages: Sequence[RecordedMessage]) -> None:
    with RecordingWriter(path, fsync=False) as writer:
        for m in messages:
            writer.append(m)


SILENCE_RULES = """
rules:
  - id: loop-silent
    name: Loop silent
    subject: {kind: loop-detector, channel: occupancy}
    when: no_data(30s)
    severity: warning
    message: "{device} silent"
  - id: occupancy-high
    name: Occupancy high
    subject: {kind: loop-detector, channel: occupancy}
    when: value > 0.5
    for: 20s
    severity: minor
    message: "{device} occupancy {value}"
"""


def test_clock_follows_the_recording_and_replayed_topics_are_unwrapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "silence.yaml"
    rules.write_text(SILENCE_RULES)
    topic = "cityops/replay/r1/city/traffic/kita/loop-kita-001"
    messages = [
        RecordedMessage(START + i, topic, b'{"ts":%d,"occupancy":%s}' % (START + i, occ))
        for i, occ in [(i, b"0.2" if i < 30 else b"0.8") for i in range(0, 61, 5)]
    ]
    messages += [
        RecordedMessage(START + 61, "city/traffic/kita/loop-kita-002", b"{not json"),
        RecordedMessage(START + 62, "cityops/alerts/abc", b"{}"),
        RecordedMessage(
            START + 63,
            "city/traffic/kita/loop-kita-002",
            b'[{"bt":%d,"n":"occupancy","u":"/","v":0.1}]' % (START + 63),
            content_type="application/senml+json",
        ),
        RecordedMessage(
            START + 200, "city/traffic/kita/loop-kita-002/status", b'{"state":"online","session":1}'
        ),
    ]
    path = tmp_path / "silence.rec"
    _write_recording(path, messages)
    doc = _json(["--rules", str(rules), "--recording", str(path)], capsys)
    raised = {(a["rule_id"], a["subject"].split("|")[1]): a["raised_at"] for a in doc["alerts"]}
    # for: 20s from the first high reading at +30 s; no_data(30s) after the last at +60 s,
    # found by the tick at +90 s of the recording's own clock, not the wall's.
    assert raised == {
        ("occupancy-high", "loop-kita-001"): START + 50,
        ("loop-silent", "loop-kita-001"): START + 90,
        ("loop-silent", "loop-kita-002"): START + 93,
    }
    assert doc["input"] | {"source": ""} == {
        "source": "",
        "messages": len(messages),
        "readings": 14,
        "presences": 1,
        "malformed": 1,
        "ignored": 1,
        "corrupt_blocks": 0,
        "truncated_tail": False,
    }
    assert doc["end"] - doc["start"] == 200


# -- compare -----------------------------------------------------------------------


def _stricter_rules(tmp_path: Path, threshold: int) -> Path:
    """The default rules with a stricter room temperature threshold (30 °C → ``threshold``)."""
    folder = tmp_path / f"strict-{threshold}"
    shutil.copytree(DEFAULT, folder)
    facility = folder / "facility.yaml"
    text = facility.read_text()
    assert "when: avg(10m) > 30\n" in text
    facility.write_text(text.replace("when: avg(10m) > 30\n", f"when: avg(10m) > {threshold}\n"))
    return folder


def test_compare_with_a_stricter_threshold(
    fire_recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = _stricter_rules(tmp_path, 33)
    args = ["--rules", str(DEFAULT), "--recording", str(fire_recording), "--compare", str(strict)]
    doc = _json(args, capsys)
    assert doc["only_a"] == doc["only_b"] == []
    changed = doc["changed"]
    assert {d["rule_id"] for d in changed} == {"room-temperature-high"}
    assert len(changed) == 2  # both climate sensors of the burning building
    for d in changed:
        assert len(d["a_raises"]) == len(d["b_raises"]) == 1
        assert d["b_raises"][0] > d["a_raises"][0]  # the stricter rule fires later
    assert (doc["a"]["rules"], doc["b"]["rules"]) == (str(DEFAULT), str(strict))
    assert doc["a"]["quality"]["alerts"] == doc["b"]["quality"]["alerts"]

    code, out, _ = _cli(args, capsys)
    assert code == 0
    assert "In both, raised at different times (2)" in out
    assert f"Only with A ({DEFAULT}): none" in out


def test_one_pass_evaluates_several_rule_sets(fire_recording: Path, tmp_path: Path) -> None:
    sets = [RuleSet.load(DEFAULT), RuleSet.load(_stricter_rules(tmp_path, 90))]
    source = RecordingSource(fire_recording)
    source.scan()
    start, end = source.span
    counts = InputCounts()
    run = run_backtest(sets, source.observations(counts), counts=counts, start=start, end=end)
    assert run.ticks == int(end - start)
    inputs = counts.summary(source.description)
    a, b = (
        build_report(s, rules=str(i), start=run.start, end=run.end, inputs=inputs)
        for i, s in enumerate(run.signals)
    )
    diff = compare_reports(a, b)
    assert {d.rule_id for d in diff.only_a} == {"room-temperature-high"}
    assert diff.only_b == diff.changed == ()
    assert b.figures.alerts == a.figures.alerts - len(diff.only_a)


# -- the database ------------------------------------------------------------------

_DEVICES = [
    ("smoke-kita-001", "emergency", "kita", None),
    ("clim-kita-001", "facility", "kita", None),
    ("fire-kita-001", "emergency", "kita", None),
    ("panel-b7", "emergency", "kita", "fire-panel"),  # kind from the registry, not the id
    ("river-kita-001", "emergency", "kita", "river-gauge"),
]


def _seed(url: str) -> None:
    """Ten minutes of a building on fire, and a river gauge going offline at +100 s."""
    with psycopg.connect(url) as conn:
        for device_id, domain, district, kind in _DEVICES:
            conn.execute(
                "INSERT INTO devices (id, domain, district, kind) VALUES (%s, %s, %s, %s)",
                (device_id, domain, district, kind),
            )
        series: dict[tuple[str, str], int] = {}
        for device_id, channel, unit in [
            ("smoke-kita-001", "smokeObscuration", "%"),
            ("smoke-kita-001", "alarm", None),
            ("clim-kita-001", "temperature", "Cel"),
            ("fire-kita-001", "state", None),
            ("panel-b7", "state", None),
        ]:
            row = conn.execute(
                "INSERT INTO series (device_id, channel, unit) VALUES (%s, %s, %s) RETURNING id",
                (device_id, channel, unit),
            ).fetchone()
            assert row is not None
            series[device_id, channel] = row[0]
        rows: list[tuple[float, int, float | None, str | None]] = []
        for t in range(-120, 600, 30):  # from before the range, which must be left out
            fire = t >= 300
            panel = "alarm" if t >= 390 else "normal"
            panel_b7 = "alarm" if t < 0 or t >= 420 else "normal"
            rows += [
                (
                    START + t,
                    series["smoke-kita-001", "smokeObscuration"],
                    12.0 if fire else 0.1,
                    None,
                ),
                (START + t, series["smoke-kita-001", "alarm"], 1.0 if fire else 0.0, None),
                (START + t, series["clim-kita-001", "temperature"], 41.0 if fire else 24.0, None),
                (START + t, series["fire-kita-001", "state"], None, panel),
                (START + t, series["panel-b7", "state"], None, panel_b7),
            ]
        conn.cursor().executemany(
            "INSERT INTO readings (ts, series_id, value, state, received_at)"
            " VALUES (to_timestamp(%s), %s, %s, %s, to_timestamp(%s))",
            [(ts, sid, value, state, ts + 0.2) for ts, sid, value, state in rows],
        )
        conn.cursor().executemany(
            "INSERT INTO presence_events (device_id, session, state, received_at)"
            " VALUES (%s, %s, %s, to_timestamp(%s))",
            [
                ("river-kita-001", 1, "online", START + 1),
                ("river-kita-001", 1, "offline", START + 100),
            ],
        )


def test_database_range(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(database_url)
    doc = _json(
        ["--rules", str(DEFAULT), "--database-url", database_url,
         "--from", str(START), "--to", "2026-06-03T05:10:00Z"],
        capsys,
    )  # fmt: skip
    assert (doc["start"], doc["end"]) == (START, START + 600)
    raised = {(a["rule_id"], a["subject"].split("|")[1]): a["raised_at"] for a in doc["alerts"]}
    assert raised == {
        ("smoke-detected", "smoke-kita-001"): START + 300,
        ("fire-panel-alarm", "fire-kita-001"): START + 390,
        ("fire-confirmed", "district:kita"): START + 390,
        ("fire-panel-alarm", "panel-b7"): START + 420,
        # offline at +100 s, `for: 5m` on the clock that follows the data
        ("emergency-device-offline", "river-kita-001"): START + 400,
    }
    assert _first_raises(doc["alerts"], FIRE) == FIRE
    inputs = doc["input"]
    assert inputs["readings"] == 5 * 20  # +0 s … +570 s, nothing from before the range
    assert inputs["presences"] == 2
    assert "secret" not in inputs["source"]


def test_database_range_streams_in_chunks(database_url: str) -> None:
    _seed(database_url)
    rules = RuleSet.load(DEFAULT)
    results = []
    for chunk_rows in (3, 10_000):
        counts = InputCounts()
        with StoredRange(database_url, start=START, end=START + 600, chunk_rows=chunk_rows) as db:
            run = run_backtest(
                [rules],
                db.observations(counts),
                counts=counts,
                start=START,
                end=START + 600,
                options=BacktestOptions(tick_s=5.0),
                kind_of=db.kind_of,
            )
        results.append([(s.kind, s.subject, s.ts) for s in run.signals[0]])
        assert counts.readings == 100
    assert results[0] == results[1]
    assert len(results[0]) >= 5


def test_database_unreachable_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://cityops:secret@127.0.0.1:1/cityops"
    code, _, err = _cli(
        ["--database-url", url, "--from", str(START), "--to", str(START + 60)], capsys
    )
    assert code == 2
    assert "cannot connect to postgresql://127.0.0.1:1/cityops" in err
    assert "secret" not in err


# -- errors ------------------------------------------------------------------------


def test_bad_rules_file_exits_2_with_file_and_line(
    fire_recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n  - id: r1\n    name: R1\n    subject: {channel: occupancy}\n"
        "    when: value > 1\n    for: 5 minutes\n    severity: minor\n    message: x\n"
    )
    for args in (
        ["--rules", str(bad), "--recording", str(fire_recording)],
        ["--rules", str(DEFAULT), "--compare", str(bad), "--recording", str(fire_recording)],
    ):
        code, out, err = _cli(args, capsys)
        assert code == 2
        assert out == ""
        assert re.search(rf"{re.escape(str(bad))}:6:\d+: rule 'r1' for: .*not a duration", err)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot open recording"),
        (b"hello, world" * 10, "is not a cityops recording"),
        (b"CYOPSREC\x01" + bytes(7), "holds no readable message (it is empty)"),
        (b"CYOPSREC\x01" + bytes(7) + b"\xb1\x0cRC" + bytes(40), "holds no readable message ("),
    ],
)
def test_missing_or_corrupt_recording_exits_2(
    content: bytes | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.rec"
    if content is not None:
        path.write_bytes(content)
    code, out, err = _cli(["--rules", str(DEFAULT), "--recording", str(path)], capsys)
    assert code == 2
    assert out == ""
    assert expected in err
    assert "Traceback" not in err


def test_range_without_database_says_which_variable_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CITYOPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("CITYOPS_DATA_DIR", str(tmp_path / "nothing-here"))
    code, _, err = _cli(["--from", "2026-06-03T05:00:00Z", "--to", "2026-06-03T06:00"], capsys)
    assert code == 2
    assert "set CITYOPS_DATABASE_URL" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--from", "1780462800"], "--from needs --to"),
        (["--recording", "x.rec", "--to", "1780462800"], "--to needs --from"),
        (
            ["--from", "2026-06-03T10:00Z", "--to", "2026-06-03T09:00Z", "--database-url", "x"],
            "before it starts",
        ),
    ],
)
def test_bad_ranges_exit_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(args, capsys)
    assert code == 2
    assert expected in err


def test_unparsable_time_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["backtest", "--from", "yesterday", "--to", "1"])
    assert exc.value.code == 2
    assert "neither epoch seconds nor an ISO 8601 time" in capsys.readouterr().err


def test_recording_source_needs_a_scan(tmp_path: Path) -> None:
    with pytest.raises(BacktestError, match="cannot open recording"):
        RecordingSource(tmp_path / "none.rec").scan()


# -- the report, on synthetic signals ---------------------------------------------


def _sig(
    kind: str,
    ts: float,
    subject: str = "s1",
    *,
    rule: str = "r1",
    severity: Severity = "minor",
    chattering: bool = False,
    suppressed: bool = False,
) -> AlertSignal:
    return AlertSignal(
        "raise" if kind == "raise" else "clear",
        rule,
        f"{rule}|{subject}|x",
        severity,
        f"{rule} {subject}",
        START + ts,
        chattering=chattering,
        suppressed=suppressed,
    )


def _report(signals: list[AlertSignal], duration_s: float = 3600.0, name: str = "a") -> Any:
    return build_report(
        signals, rules=name, start=START, end=START + duration_s, inputs=InputSummary("test")
    )


def test_reraise_counts_an_occurrence_on_the_same_alert() -> None:
    report = _report([_sig("raise", 0), _sig("clear", 10), _sig("raise", 20)])
    (row,) = report.alerts
    assert row.occurrences == 2
    assert row.raise_times == (START, START + 20)
    assert row.cleared_at is None  # active again at the end
    assert report.figures.alerts == 2


def test_suppressed_alerts_are_recorded_but_not_annunciated() -> None:
    report = _report(
        [_sig("raise", 0, suppressed=True), _sig("clear", 5, suppressed=True), _sig("raise", 10)]
    )
    first, second = report.alerts
    assert (first.suppressed, first.cleared_at) == (True, START + 5)
    assert (second.suppressed, second.raised_at) == (False, START + 10)
    assert report.figures.alerts == 1
    assert report.figures.suppressed == 1


def test_floods_peaks_and_hourly_maximum() -> None:
    burst_1 = [_sig("raise", 10 * i, f"a{i}") for i in range(11)]  # 11 within 100 s: a flood
    burst_2 = [_sig("raise", 2000 + 10 * i, f"b{i}") for i in range(12)]  # another
    steady = [_sig("raise", 5000 + 60 * i, f"c{i}") for i in range(10)]  # 10 in 10 min: none
    figures = _report([*burst_1, *burst_2, *steady], duration_s=7200).figures
    assert figures.floods == 2
    assert figures.peak_10min == 12
    assert figures.peak_10min_at == START + 2110
    assert figures.max_per_hour == 23  # both bursts within one hour
    assert figures.alerts == 33
    assert figures.alerts_per_hour == pytest.approx(16.5)


def test_a_long_flood_counts_once() -> None:
    signals = [_sig("raise", 30 * i, f"d{i}") for i in range(40)]  # 20 per 10 min for 20 min
    figures = _report(signals).figures
    assert figures.floods == 1
    assert figures.peak_10min == 20


def test_window_edges_are_exclusive() -> None:
    figures = _report([_sig("raise", 0, "e1"), _sig("raise", 600, "e2")]).figures
    assert figures.peak_10min == 1


def test_chattering_alerts_are_counted_once() -> None:
    signals = [
        _sig("raise", 0),
        _sig("clear", 5),
        _sig("raise", 10),
        _sig("clear", 15),
        _sig("raise", 20),
        _sig("clear", 25, chattering=True),
        _sig("raise", 30, chattering=True),
        _sig("raise", 40, "other"),
    ]
    report = _report(signals)
    assert [r.chattering for r in report.alerts] == [True, False]
    assert report.alerts[0].occurrences == 4
    assert report.figures.chattering == 1


def test_standing_alerts_are_active_for_more_than_a_day() -> None:
    day = 86_400.0
    signals = [
        _sig("raise", 0, "still-active"),
        _sig("raise", 0, "cleared-after-23h"),
        _sig("raise", 0, "cleared-after-24h1s"),
        _sig("clear", 23 * 3600, "cleared-after-23h"),
        _sig("clear", day + 1, "cleared-after-24h1s"),
        _sig("raise", 0, "suppressed", suppressed=True),
    ]
    report = _report(signals, duration_s=day + 3600)
    longest = {r.subject.split("|")[1]: r.longest_active_s for r in report.alerts}
    assert longest == {
        "still-active": day + 3600,
        "cleared-after-23h": 23 * 3600,
        "cleared-after-24h1s": day + 1,
        "suppressed": day + 3600,
    }
    assert report.figures.standing == 2  # the suppressed one pages nobody


def test_priority_mix() -> None:
    severities: list[Severity] = ["critical", "major", "minor", "minor"]
    signals = [_sig("raise", i, f"p{i}", severity=s) for i, s in enumerate(severities)]
    figures = _report(signals, duration_s=1800).figures
    assert figures.priority_mix == {"critical": 25.0, "major": 25.0, "minor": 50.0, "warning": 0.0}
    assert list(figures.priority_mix) == ["critical", "major", "minor", "warning"]
    assert figures.alerts_per_hour == 8.0


def test_compare_reports_matches_by_rule_and_subject() -> None:
    a = _report([_sig("raise", 0, "same"), _sig("raise", 5, "moved"), _sig("raise", 9, "gone")])
    b = _report(
        [_sig("raise", 0, "same"), _sig("raise", 50, "moved"), _sig("raise", 7, "new")], name="b"
    )
    diff = compare_reports(a, b)
    assert [d.subject for d in diff.only_a] == ["r1|gone|x"]
    assert [d.subject for d in diff.only_b] == ["r1|new|x"]
    (moved,) = diff.changed
    assert (moved.a_raises, moved.b_raises) == ((START + 5,), (START + 50,))


def _text(renderables: list[Any]) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    for r in renderables:
        console.print(r)
    return buffer.getvalue()


def test_text_rendering_truncates_long_tables() -> None:
    report = _report([_sig("raise", i, f"t{i}") for i in range(5)])
    text = _text(render_report(report, max_rows=3))
    assert "Alerts that would have fired (5)" in text
    assert "… 2 more alerts" in text
    assert text.count("still active") == 3
    other = _report([_sig("raise", 1, "t0")], name="b")
    text = _text(render_comparison(compare_reports(report, other), max_rows=0))
    assert "Only with A (a) (4)" in text
    assert "Only with B (b): none" in text
    assert "In both, raised at different times (1)" in text


def test_database_range_warms_up_on_the_hour_before(database_url: str, tmp_path: Path) -> None:
    """A `for: 10m` that had run 9 minutes at --from fires a minute into the range."""
    rules_yaml = (
        "rules:\n  - id: hot\n    name: Hot\n    subject: {channel: temperature}\n"
        "    when: value > 40\n    for: 10m\n    severity: major\n    message: hot\n"
    )
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO devices (id, domain, district, kind) VALUES ('clim-x', 'facility',"
            " 'kita', 'climate')"
        )
        row = conn.execute(
            "INSERT INTO series (device_id, channel, unit) VALUES ('clim-x', 'temperature',"
            " 'Cel') RETURNING id"
        ).fetchone()
        assert row is not None
        conn.cursor().executemany(
            "INSERT INTO readings (ts, series_id, value, received_at)"
            " VALUES (to_timestamp(%s), %s, 45.0, to_timestamp(%s))",
            [(START + t, row[0], START + t) for t in range(-540, 300, 30)],
        )
    (tmp_path / "hot.yaml").write_text(rules_yaml)
    rules = RuleSet.load(tmp_path / "hot.yaml")
    raised = {}
    for warm_up_s in (0.0, 3_600.0):
        counts = InputCounts()
        with StoredRange(database_url, start=START, end=START + 300, warm_up_s=warm_up_s) as db:
            run = run_backtest(
                [rules],
                db.observations(counts),
                counts=counts,
                start=START,
                end=START + 300,
                kind_of=db.kind_of,
                warm_up=db.warm_up_readings(),
            )
        assert counts.readings == 10  # the range's own readings only
        raised[warm_up_s] = [s.ts for s in run.signals[0] if s.kind == "raise"]
    assert raised[0.0] == []  # without warm-up the 10 minutes start over at --from
    assert raised[3_600.0]
    assert START + 55 <= raised[3_600.0][0] <= START + 65
