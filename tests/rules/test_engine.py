from __future__ import annotations

from pathlib import Path

import pytest

from ingest.batch import CommittedBatch
from rules import (
    AlertSignal,
    Evaluator,
    RuleFileError,
    RuleSet,
    format_duration,
    prefix_kind_resolver,
)

from .helpers import T0, FakeClock, dev, evaluator, num, presence, rule_yaml, rules, st

LOOP = dev("loop-chuo-001")
LOOP2 = dev("loop-chuo-002")


def feed(
    ev: Evaluator,
    values: list[float],
    *,
    step: float = 60.0,
    start: float = T0,
    device: object = LOOP,
    channel: str = "occupancy",
) -> list[list[AlertSignal]]:
    """One reading per step; the signals of each."""
    assert device is LOOP or device is LOOP2
    return [
        ev.on_readings([num(LOOP if device is LOOP else LOOP2, channel, start + i * step, v)])
        for i, v in enumerate(values)
    ]


def kinds(per_reading: list[list[AlertSignal]]) -> list[str]:
    return ["".join(s.kind[0] for s in signals) or "." for signals in per_reading]


def test_threshold_raise_and_default_clear() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n"))
    out = feed(ev, [0.5, 0.9, 0.95, 0.7])
    assert kinds(out) == [".", "r", ".", "c"]
    raise_ = out[1][0]
    assert raise_.subject == "r1|loop-chuo-001|occupancy"
    assert raise_.message == "loop-chuo-001 occupancy 0.9"
    assert raise_.value == 0.9
    assert raise_.ts == T0 + 60.0
    assert raise_.severity == "minor"
    assert raise_.district == "chuo"
    assert raise_.domain == "traffic"
    assert not raise_.suppressed
    assert ev.active_subjects() == frozenset()


def test_subject_filters_series() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n", channel="averageVehicleSpeed"))
    assert kinds(feed(ev, [0.9])) == ["."]
    park = dev("park-chuo-1")
    assert ev.on_readings([num(park, "averageVehicleSpeed", T0, 99.0)]) == []
    assert len(ev.on_readings([num(LOOP, "averageVehicleSpeed", T0, 99.0)])) == 1


def test_for_needs_the_condition_to_hold() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n    for: 3m\n"))
    # true for 2 minutes, false, then true for 3 minutes
    out = feed(ev, [0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9])
    assert kinds(out) == [".", ".", ".", ".", ".", ".", ".", "r"]
    assert out[7][0].ts == T0 + 7 * 60.0


def test_hysteresis_with_clear_when() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n    clear_when: value < 0.5\n"))
    out = feed(ev, [0.9, 0.7, 0.79, 0.81, 0.6, 0.49, 0.7, 0.85])
    assert kinds(out) == ["r", ".", ".", ".", ".", "c", ".", "r"]


def test_gap_restarts_the_for_timer() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n    for: 5m\n"))
    # period learned as 60 s; gap_factor 2.5 → a 4-minute gap resets
    feed(ev, [0.1, 0.1, 0.1])
    out = [
        ev.on_readings([num(LOOP, "occupancy", T0 + t, 0.9)])
        for t in (180, 240, 300, 540, 600, 660, 720, 780, 840)
    ]
    # timer starts at 180, gap 300→540 resets it to 540; raise at 540 + 300 = 840
    assert kinds(out) == [".", ".", ".", ".", ".", ".", ".", ".", "r"]
    assert ev.pending("r1|loop-chuo-001|occupancy") is None


def test_explicit_max_gap_and_senml_ut() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n    for: 2m\n    max_gap: 90s\n"))
    out = [ev.on_readings([num(LOOP, "occupancy", T0 + t, 0.9)]) for t in (0, 60, 160, 220, 280)]
    assert kinds(out) == [".", ".", ".", ".", "r"]  # 60 → 160 is a 100 s gap
    ev2, _ = evaluator(rule_yaml("    when: value > 0.8\n    for: 2m\n"))
    # ut 20 s: a gap is over 2.5 x 20 = 50 s, so every 60 s step restarts the timer
    out = [ev2.on_readings([num(LOOP, "occupancy", T0 + t, 0.9, ut=20.0)]) for t in (0, 60, 120)]
    assert kinds(out) == [".", ".", "."]
    steps = (200, 230, 260, 290, 320)
    out = [ev2.on_readings([num(LOOP, "occupancy", T0 + t, 0.9, ut=20.0)]) for t in steps]
    assert kinds(out) == [".", ".", ".", ".", "r"]


def test_late_reading_updates_window_but_triggers_nothing() -> None:
    ev, _ = evaluator(rule_yaml("    when: avg(10m) > 0.5\n"))
    feed(ev, [0.1, 0.1, 0.1])  # T0 .. T0+120
    late = ev.on_readings([num(LOOP, "occupancy", T0 + 90.0, 5.0)])
    assert late == []  # avg now 1.325, but no edge in the past
    dup = ev.on_readings([num(LOOP, "occupancy", T0 + 120.0, 0.1)])
    assert dup == []
    out = ev.on_readings([num(LOOP, "occupancy", T0 + 180.0, 0.1)])
    assert [s.kind for s in out] == ["raise"]  # the next in-order reading sees the late point


def test_offline_device_suppresses_its_threshold_alerts() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n"))
    assert ev.on_presence([presence(LOOP, "offline", 3)]) == []
    out = ev.on_readings([num(LOOP, "occupancy", T0, 0.9)])
    assert out[0].suppressed
    # a status from an older session is stale and ignored
    ev.on_presence([presence(LOOP, "online", 2)])
    out = ev.on_readings([num(LOOP, "occupancy", T0 + 60, 0.1)])
    assert out[0].kind == "clear"
    assert out[0].suppressed
    ev.on_presence([presence(LOOP, "online", 4)])
    out = ev.on_readings([num(LOOP, "occupancy", T0 + 120, 0.9)])
    assert not out[0].suppressed
    # other devices are not affected
    assert not ev.on_readings([num(LOOP2, "occupancy", T0 + 120, 0.9)])[0].suppressed


def test_chattering_is_detected_and_latched() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n"))
    out = feed(ev, [0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9], step=5.0)
    flags = [(s.kind, s.chattering) for signals in out for s in signals]
    assert flags == [
        ("raise", False),
        ("clear", False),
        ("raise", False),
        ("clear", False),
        ("raise", False),
        ("clear", True),
        ("raise", True),
    ]
    # slow cycles (one per minute) do not chatter
    ev2, _ = evaluator(rule_yaml("    when: value > 0.8\n"))
    out = feed(ev2, [0.9, 0.1] * 4, step=31.0)
    assert not any(s.chattering for signals in out for s in signals)
    # once latched, it stays latched
    out = feed(ev, [0.1, 0.9], step=600.0, start=T0 + 600)
    assert all(s.chattering for signals in out for s in signals)


def test_no_data_fires_on_tick_and_clears_on_data() -> None:
    ev, clock = evaluator(rule_yaml("    when: no_data(5m)\n", channel="intensity"))
    ev.on_readings([num(LOOP, "intensity", T0, 10.0)])
    clock.advance(299.0)
    assert ev.tick() == []
    clock.advance(1.0)
    (sig,) = ev.tick()
    assert sig.kind == "raise"
    assert sig.subject == "r1|loop-chuo-001|intensity"
    assert sig.ts == T0 + 300.0
    assert ev.tick() == []
    clock.advance(10.0)
    (clear,) = ev.on_readings([num(LOOP, "intensity", T0 + 310, 10.0)])
    assert clear.kind == "clear"


def test_no_data_counts_from_start_so_a_restart_does_not_storm() -> None:
    clock = FakeClock(T0 + 3600.0)  # the process starts an hour after the last data
    ev = Evaluator(rules(rule_yaml("    when: no_data(5m)\n", channel="intensity")), clock)
    ev.warm_up([num(dev(f"loop-chuo-{i:03d}"), "intensity", T0, 1.0) for i in range(50)])
    assert ev.tick() == []
    clock.advance(300.0)
    assert len(ev.tick()) == 50  # still silent 5 minutes after the restart: now they count


def test_offline_device_rule_runs_on_the_clock() -> None:
    text = (
        "- {id: off, name: Off, severity: warning, message: '{device} offline',"
        " when: offline(), for: 2m}"
    )
    ev, clock = evaluator(text)
    assert ev.on_presence([presence(LOOP, "offline", 1)]) == []
    clock.advance(119.0)
    assert ev.tick() == []
    clock.advance(1.0)
    (sig,) = ev.tick()
    assert (sig.kind, sig.subject, sig.message, sig.suppressed) == (
        "raise",
        "off|loop-chuo-001|*",
        "loop-chuo-001 offline",
        False,
    )
    (clear,) = ev.on_presence([presence(LOOP, "online", 2)])
    assert clear.kind == "clear"
    # offline then back online before the timer: nothing
    ev.on_presence([presence(LOOP, "offline", 2)])
    clock.advance(60.0)
    ev.on_presence([presence(LOOP, "online", 3)])
    clock.advance(120.0)
    assert ev.tick() == []


@pytest.mark.parametrize(
    ("when", "values", "expected"),
    [
        ("avg(3m) > 5", [0, 0, 9, 9, 9, 9], "....r."),
        ("min(3m) > 5", [9, 9, 0, 9, 9, 9, 9], "r.c...r"),
        ("max(2m) >= 9", [0, 9, 0, 0, 0], ".r..c"),
        ("p95(10m) > 8", [0] * 10 + [10, 10], "." * 11 + "r"),
        ("count(3m) >= 3", [1, 1, 1, 1], "..r."),
        ("rate(2m) > 0.05", [0, 1, 5, 12, 12, 12], "...r.c"),
        ("delta(2m) < -5", [10, 10, 2, 2, 2], "..r.c"),
        ("abs(value - 5) > 3", [5, 9, 5, 1], ".rcr"),
        ("value / 0 > 1 or value * 2 - 1 > 15", [1, 8, 9], "..r"),
    ],
)
def test_window_functions(when: str, values: list[float], expected: str) -> None:
    ev, _ = evaluator(rule_yaml(f"    when: {when}\n"))
    got = "".join(kinds(feed(ev, [float(v) for v in values])))
    assert got == expected


def test_state_rules_and_other_channel_reference() -> None:
    text = rule_yaml(
        '    when: state == "flashing" and max(5m, "fault") == 1\n',
        channel="phase",
        kind="signal-controller",
    )
    ev, _ = evaluator(text)
    sig = dev("sig-chuo-001")
    assert ev.on_readings([st(sig, "phase", T0, "flashing")]) == []  # no fault yet
    ev.on_readings([num(sig, "fault", T0 + 1, 1.0)])
    (raise_,) = ev.on_readings([st(sig, "phase", T0 + 2, "flashing")])
    assert raise_.state == "flashing"
    assert raise_.value is None
    assert raise_.message == "sig-chuo-001 phase n/a"
    (clear,) = ev.on_readings([st(sig, "phase", T0 + 3, "green")])
    assert clear.kind == "clear"


def test_zscore_needs_samples_then_fires_on_outliers() -> None:
    text = rule_yaml(
        "    when: zscore() > 4\n    clear_when: zscore() < 2\n",
        channel="activePower",
        kind="power-meter",
    )
    ev, _ = evaluator(text, baseline_min_samples=30)
    pwr = dev("pwr-chuo-001", domain="facility")
    out: list[AlertSignal] = []
    week = 7 * 86400.0
    # four weeks of the same hour: 15 samples each, values around 100 ± 5
    for w in range(4):
        for i in range(15):
            v = 100.0 + (5.0 if i % 2 else -5.0)
            out += ev.on_readings([num(pwr, "activePower", T0 + w * week + i * 60.0, v)])
        if w == 0:  # 15 samples: still learning, even a huge value cannot fire
            out += ev.on_readings([num(pwr, "activePower", T0 + 15 * 60.0, 1000.0)])
    assert out == []
    # the learning-period outlier widened the profile: only a large deviation fires
    assert ev.on_readings([num(pwr, "activePower", T0 + 4 * week + 840.0, 200.0)]) == []
    (raise_,) = ev.on_readings([num(pwr, "activePower", T0 + 4 * week + 900.0, 1000.0)])
    assert raise_.kind == "raise"
    (clear,) = ev.on_readings([num(pwr, "activePower", T0 + 4 * week + 960.0, 101.0)])
    assert clear.kind == "clear"
    arrays = ev.baselines.export()
    assert list(arrays["keys"]) == ["pwr-chuo-001|activePower"]


def test_within_expression() -> None:
    text = rule_yaml('    when: within(2m, value > 0.8, avg(1m, "averageVehicleSpeed") < 10)\n')
    ev, _ = evaluator(text)
    assert ev.on_readings([num(LOOP, "occupancy", T0, 0.9)]) == []
    ev.on_readings([num(LOOP, "averageVehicleSpeed", T0 + 50, 5.0)])
    (raise_,) = ev.on_readings([num(LOOP, "occupancy", T0 + 60, 0.2)])  # both within 2 min
    assert raise_.kind == "raise"
    ev.on_readings([num(LOOP, "averageVehicleSpeed", T0 + 100, 40.0)])
    assert ev.on_readings([num(LOOP, "occupancy", T0 + 119, 0.2)]) == []
    (clear,) = ev.on_readings([num(LOOP, "occupancy", T0 + 180, 0.2)])  # 0.9 was at T0
    assert clear.kind == "clear"


FIRE = """\
- id: fire
  name: Fire
  severity: critical
  message: "fire in {district}: {devices}"
  correlate:
    within: 2m
    conditions:
      - {label: smoke, kind: smoke-detector, channel: smokeObscuration, when: value > 3}
      - label: heat
        kind: indoor-climate
        channel: temperature
        when: rate(2m) > 0.02 or value > 40
      - label: panel
        kind: fire-panel
        channel: state
        when: state == "trouble" or state == "alarm"
"""


def test_correlation_in_one_district() -> None:
    ev, _ = evaluator(FIRE)
    smoke, clim, panel = (
        dev("smoke-chuo-001", domain="emergency"),
        dev("clim-chuo-001", domain="facility"),
        dev("fire-chuo-001", domain="emergency"),
    )
    other_panel = dev("fire-aoba-001", "aoba", "emergency")
    assert ev.on_readings([num(smoke, "smokeObscuration", T0, 8.0)]) == []
    assert ev.on_readings([num(clim, "temperature", T0 + 30, 45.0)]) == []
    assert ev.on_readings([st(other_panel, "state", T0 + 40, "alarm")]) == []  # another district
    (raise_,) = ev.on_readings([st(panel, "state", T0 + 60, "trouble")])
    assert raise_.subject == "fire|district:chuo|*"
    assert raise_.devices == ("clim-chuo-001", "fire-chuo-001", "smoke-chuo-001")
    assert raise_.message == "fire in chuo: clim-chuo-001, fire-chuo-001, smoke-chuo-001"
    # the smoke clears; two minutes after it was last seen the correlation clears
    ev.on_readings([num(smoke, "smokeObscuration", T0 + 90, 0.1)])
    ev.on_readings([num(clim, "temperature", T0 + 100, 45.0)])
    assert ev.on_readings([st(panel, "state", T0 + 110, "trouble")]) == []
    assert ev.tick() == []
    (clear,) = ev.on_readings([num(clim, "temperature", T0 + 121, 45.0)])
    assert clear.kind == "clear"
    assert clear.ts == T0 + 121


def test_correlation_too_far_apart_does_not_fire() -> None:
    ev, _ = evaluator(FIRE)
    smoke, clim, panel = dev("smoke-x-1"), dev("clim-x-1"), dev("fire-x-1")
    out = ev.on_readings([num(smoke, "smokeObscuration", T0, 8.0)])
    out += ev.on_readings([num(clim, "temperature", T0 + 100, 45.0)])
    out += ev.on_readings([st(panel, "state", T0 + 121, "alarm")])
    assert out == []


def test_warm_up_rebuilds_timers_without_a_storm() -> None:
    text = rule_yaml("    when: value > 0.8\n    for: 10m\n")
    clock = FakeClock(T0 + 600.0)
    ev = Evaluator(rules(text), clock)
    history = []
    # LOOP: above the threshold for 9 minutes (timer running)
    history += [num(LOOP, "occupancy", T0 + 60 * i, 0.9) for i in range(1, 10)]
    # LOOP2: rose and fell in the past, then rose for 20 minutes (active now)
    history += [
        num(LOOP2, "occupancy", T0 - 1800 + 60 * i, 0.9 if 5 < i < 12 or i > 10 else 0.1)
        for i in range(30)
    ]
    assert ev.warm_up(reversed(history)) == []
    assert ev.pending("r1|loop-chuo-001|occupancy") == T0 + 60.0
    assert ev.active_subjects() == {"r1|loop-chuo-002|occupancy"}
    (raise_,) = ev.on_readings([num(LOOP, "occupancy", T0 + 660, 0.95)])
    assert raise_.subject == "r1|loop-chuo-001|occupancy"  # after 10 minutes, not 19
    assert ev.on_readings([num(LOOP2, "occupancy", T0 + 660, 0.95)]) == []  # already open


def test_warm_up_reconciles_with_open_alerts() -> None:
    text = rule_yaml("    when: value > 0.8\n")
    ev, _ = evaluator(text)
    signals = ev.warm_up(
        [num(LOOP, "occupancy", T0, 0.9), num(LOOP2, "occupancy", T0, 0.1)],
        open_subjects={"r1|loop-chuo-002|occupancy"},
    )
    assert sorted((s.kind, s.subject) for s in signals) == [
        ("clear", "r1|loop-chuo-002|occupancy"),
        ("raise", "r1|loop-chuo-001|occupancy"),
    ]


def test_replace_rules_keeps_state_and_clears_removed() -> None:
    text = rule_yaml("    when: value > 0.8\n    for: 3m\n")
    ev, _ = evaluator(text)
    feed(ev, [0.9, 0.9], device=LOOP)
    feed(ev, [0.9], device=LOOP2)
    ev2_rules = rules(text.replace("r1", "r2", 1)) + rules(text)
    assert ev.replace_rules(ev2_rules) == []
    out = feed(ev, [0.9, 0.9], start=T0 + 120)
    assert kinds(out) == [".", "r"]  # r1 kept its timer; r2 started fresh
    (clear,) = ev.replace_rules(rules(text.replace("r1", "r2", 1)))
    assert (clear.kind, clear.subject) == ("clear", "r1|loop-chuo-001|occupancy")


def test_format_spec_on_a_missing_value_renders_na() -> None:
    text = rule_yaml("    when: state == 'x'\n").replace(
        '"{device} {channel} {value}"', '"{value:.1f} {unit}"'
    )
    ev, _ = evaluator(text)
    (sig,) = ev.on_readings([st(LOOP, "occupancy", T0, "x")])
    assert sig.message == "n/a n/a"


def test_correlation_clears_on_tick_when_the_district_moves_on() -> None:
    ev, _ = evaluator(FIRE)
    smoke, clim, panel = dev("smoke-chuo-1"), dev("clim-chuo-1"), dev("fire-chuo-1")
    ev.on_readings([num(smoke, "smokeObscuration", T0, 8.0), num(clim, "temperature", T0, 45.0)])
    (raise_,) = ev.on_readings([st(panel, "state", T0 + 1, "alarm")])
    assert raise_.kind == "raise"
    # only unrelated devices report in chuo afterwards: device time moves on
    ev.on_readings([num(LOOP, "occupancy", T0 + 200, 0.1)])
    (clear,) = ev.tick()
    assert (clear.kind, clear.subject, clear.ts) == ("clear", "fire|district:chuo|*", T0 + 200)


def test_hot_reload_from_disk_keeps_a_running_timer(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rule_yaml("    when: value > 0.8\n    for: 3m\n"))
    rule_set = RuleSet.load(path)
    ev = Evaluator(rule_set, FakeClock())
    feed(ev, [0.9, 0.9, 0.9])  # 2 of 3 minutes
    path.write_text("rules: [")  # an editor saving half a file
    with pytest.raises(RuleFileError):
        rule_set = rule_set.reload()
    path.write_text(rule_yaml("    when: value > 0.85\n    for: 3m\n"))
    rule_set = rule_set.reload()
    assert ev.replace_rules(rule_set) == []
    (raise_,) = ev.on_readings([num(LOOP, "occupancy", T0 + 180, 0.9)])
    assert raise_.ts == T0 + 180  # the timer that started at T0 carried over


def test_kind_resolver_and_unknown_prefix() -> None:
    resolve = prefix_kind_resolver()
    assert resolve(dev("smoke-chuo-001")) == "smoke-detector"
    assert resolve(dev("zz-chuo-001")) is None
    assert format_duration(5400) == "1h30m"
    assert format_duration(0.25) == "250ms"
    assert format_duration(0) == "0s"


def test_on_batch_takes_readings_before_presence() -> None:
    ev, _ = evaluator(rule_yaml("    when: value > 0.8\n"))
    batch = CommittedBatch(
        readings=(num(LOOP, "occupancy", T0, 0.9),),
        presences=(presence(LOOP, "offline", 1),),
        dead_letters=(),
        committed_at=T0,
    )
    (sig,) = ev.on_batch(batch)
    assert not sig.suppressed  # taken while the device was still online
    (clear,) = ev.on_readings([num(LOOP, "occupancy", T0 + 60, 0.1)])
    assert clear.suppressed
