"""The shipped rule set loads, fits the simulated city, and tells a fire from noise."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ingest.model import Domain
from rules import AlertLifecycle, Evaluator, FloodGrouper, RuleSet
from simulators.catalogue import GENERATOR_CHANNELS

from .helpers import T0, FakeClock, dev, num, presence, st

DEFAULT = Path(__file__).resolve().parents[2] / "rules" / "default"


def test_default_rules_load_and_match_the_catalogue() -> None:
    rs = RuleSet.load(DEFAULT)
    assert len(rs) >= 20
    for rule in rs:
        subjects = [rule.subject]
        if rule.correlation is not None:
            subjects = [c.subject for c in rule.correlation.conditions]
        for subject in subjects:
            for kind in subject.kinds:
                assert kind in GENERATOR_CHANNELS, (rule.id, kind)
                known = {name for name, _ in GENERATOR_CHANNELS[kind]}
                assert set(subject.channels) <= known, (rule.id, subject.channels)
        assert rule.category, rule.id
    domains = {d for r in rs for d in r.subject.domains}
    assert domains == {"traffic", "facility", "emergency"}
    mix = Counter(r.severity for r in rs)
    assert mix["critical"] <= len(rs) // 4
    assert mix["warning"] + mix["minor"] > len(rs) // 2


def _building(
    evaluator: Evaluator, t: float, *, smoke: float, temp: float, panel: str
) -> list[str]:
    readings = [
        num(dev("smoke-chuo-001", domain="emergency"), "smokeObscuration", t, smoke),
        num(dev("smoke-chuo-001", domain="emergency"), "alarm", t, 1.0 if smoke >= 3 else 0.0),
        num(dev("clim-chuo-001", domain="facility"), "temperature", t, temp),
        st(dev("fire-chuo-001", domain="emergency"), "state", t, panel),
    ]
    return [f"{s.kind}:{s.rule_id}" for s in evaluator.on_readings(readings)]


def test_fire_scenario_raises_smoke_fire_alarm_and_confirmation_in_order() -> None:
    clock = FakeClock()
    ev = Evaluator(RuleSet.load(DEFAULT), clock)
    seen: list[str] = []
    for minute in range(10):  # a quiet building
        seen += _building(ev, T0 + 30 * minute, smoke=0.05, temp=24.0, panel="normal")
    assert seen == []
    t = T0 + 300
    seen += _building(ev, t, smoke=8.0, temp=24.0, panel="normal")
    seen += _building(ev, t + 30, smoke=15.0, temp=26.0, panel="normal")
    seen += _building(ev, t + 60, smoke=15.0, temp=31.0, panel="normal")
    seen += _building(ev, t + 90, smoke=15.0, temp=38.0, panel="alarm")
    assert seen == ["raise:smoke-detected", "raise:fire-panel-alarm", "raise:fire-confirmed"]


def test_earthquake_flood_is_grouped_into_one_incident() -> None:
    clock = FakeClock()
    ev = Evaluator(RuleSet.load(DEFAULT), clock)
    lc = AlertLifecycle(RuleSet.load(DEFAULT).rules, clock=clock)
    flood = FloodGrouper()
    devices: list[tuple[str, str, Domain, float | str]] = [
        *[(f"seis-chuo-{i}", "seismicIntensity", "emergency", 5.2) for i in range(3)],
        *[(f"call-chuo-{i}", "pressed", "emergency", 1.0) for i in range(4)],
        *[(f"sig-chuo-{i}", "fault", "traffic", 1.0) for i in range(5)],
        *[(f"pump-chuo-{i}", "state", "facility", "fault") for i in range(2)],
    ]
    incidents: dict[str, str] = {}
    for i, (device_id, channel, domain, value) in enumerate(devices):
        ref = dev(device_id, domain=domain)
        reading = (
            st(ref, channel, T0 + i, value)
            if isinstance(value, str)
            else num(ref, channel, T0 + i, float(value))
        )
        for sig in ev.on_readings([reading]):
            alert, _ = lc.raise_(sig)
            incidents.update(flood.observe(alert.id, alert.district, sig.ts))
    assert len(incidents) == 14
    assert set(incidents.values()) == {f"inc-chuo-{int(T0)}"}


def test_outage_does_not_storm() -> None:
    clock = FakeClock()
    ev = Evaluator(RuleSet.load(DEFAULT), clock)
    gauges = [dev(f"river-chuo-{i}", domain="emergency") for i in range(5)]
    ev.on_readings([num(g, "currentLevel", T0, 1.2) for g in gauges])
    ev.on_presence([presence(g, "offline", 1) for g in gauges])
    clock.advance(600)
    signals = ev.tick()
    by_rule = Counter((s.rule_id, s.suppressed) for s in signals)
    # the silent gauges are reported, but suppressed: their device is offline
    assert by_rule == {("river-gauge-silent", True): 5, ("emergency-device-offline", False): 5}
