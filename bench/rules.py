"""Rules benchmark: readings/s evaluated with 500 rules over 10,000 series.

Run: ``.venv/bin/python -m bench.rules`` (about 30 seconds, one core).

Synthetic city: 200 devices in 10 districts, each with 50 numeric channels
(10,000 series), one reading per series every 10 s of device time, values a
bounded random walk. 500 rules, ten per channel, mixing plain thresholds,
``for:`` timers, window aggregates (avg / max / p95 / rate over 1 to 15
minutes) and ``clear_when`` hysteresis.

* ``cityops``: :class:`rules.Evaluator` fed batches of 500 readings.
* ``naive``: the same rules evaluated the obvious way in the same run: every
  rule checked against every reading (subject matching by ``fnmatch``),
  windows as Python lists filtered per aggregate.
* latency: time of ``on_readings`` for one reading (the evaluation share of
  the reading → alert-event latency), p50 / p99.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ingest.model import DeviceRef, Reading
from rules import Evaluator, Rule, load_rules_text

T0 = 1_767_225_600.0
CHANNELS = 50
DEVICES = 200
DISTRICTS = 10
RULES = 500
STEP_S = 10.0

AGGS = (
    ("value", 0.0, None),
    ("avg", 300.0, "5m"),
    ("max", 60.0, "1m"),
    ("p95", 900.0, "15m"),
    ("rate", 60.0, "1m"),
)


@dataclass(frozen=True, slots=True)
class Spec:
    """One synthetic rule, in both forms."""

    rule_id: str
    channel: str
    agg: str
    window_s: float
    window: str | None
    threshold: float
    clear: float
    for_s: float


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> float:
        return self.t


def make_specs() -> list[Spec]:
    rng = random.Random(7)
    specs = []
    for i in range(RULES):
        agg, window_s, window = AGGS[(i // CHANNELS) % len(AGGS)]
        high = 0.4 if agg == "rate" else 70.0 + rng.random() * 15.0
        specs.append(
            Spec(
                rule_id=f"r{i:03d}",
                channel=f"c{i % CHANNELS:02d}",
                agg=agg,
                window_s=window_s,
                window=window,
                threshold=high,
                clear=high * 0.9,
                for_s=60.0 if i % 3 == 0 else 0.0,
            )
        )
    return specs


def to_yaml(specs: list[Spec]) -> str:
    lines = ["rules:"]
    for s in specs:
        term = "value" if s.window is None else f"{s.agg}({s.window})"
        lines += [
            f"  - id: {s.rule_id}",
            f"    name: {s.rule_id}",
            f"    subject: {{domain: facility, device: 'dev-*', channel: {s.channel}}}",
            f"    when: {term} > {s.threshold}",
            f"    clear_when: {term} < {s.clear}",
            "    severity: minor",
            "    message: '{device} {channel} {value}'",
        ]
        if s.for_s:
            lines.append(f"    for: {int(s.for_s)}s")
    return "\n".join(lines) + "\n"


def make_readings(n: int) -> list[Reading]:
    rng = random.Random(11)
    devices = [DeviceRef("facility", f"d{i % DISTRICTS}", f"dev-{i:04d}") for i in range(DEVICES)]
    level = [50.0] * (DEVICES * CHANNELS)
    out: list[Reading] = []
    k = 0
    ts = T0
    while len(out) < n:
        for d, device in enumerate(devices):
            for c in range(CHANNELS):
                i = d * CHANNELS + c
                level[i] += 0.05 * (50.0 - level[i]) + rng.gauss(0.0, 3.0)  # mean-reverting
                out.append(Reading(device, f"c{c:02d}", ts + (k % 97) * 0.01, level[i], None, None))
                k += 1
        ts += STEP_S
    return out[:n]


class Naive:
    """Every rule against every reading, windows as Python lists."""

    def __init__(self, specs: list[Spec]) -> None:
        self.specs = specs
        self.windows: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.active: dict[str, bool] = {}
        self.pending: dict[str, float] = {}
        self.horizon = max(s.window_s for s in specs)

    def agg(self, spec: Spec, points: list[tuple[float, float]], now: float) -> float | None:
        if spec.agg == "value":
            return points[-1][1]
        vals = [v for t, v in points if t >= now - spec.window_s]
        if not vals:
            return None
        if spec.agg == "avg":
            return sum(vals) / len(vals)
        if spec.agg == "max":
            return max(vals)
        if spec.agg == "p95":
            ordered = sorted(vals)
            return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        ts = [t for t, _ in points if t >= now - spec.window_s]
        if len(vals) < 2 or ts[-1] == ts[0]:
            return None
        return (vals[-1] - vals[0]) / (ts[-1] - ts[0])

    def on_readings(self, readings: list[Reading]) -> int:
        signals = 0
        for r in readings:
            key = (r.device.device_id, r.channel)
            points = self.windows.setdefault(key, [])
            points.append((r.ts, r.value or 0.0))
            while points[0][0] < r.ts - self.horizon:
                points.pop(0)
            for spec in self.specs:
                if not (fnmatchcase(r.device.device_id, "dev-*") and spec.channel == r.channel):
                    continue
                subject = f"{spec.rule_id}|{key[0]}|{key[1]}"
                x = self.agg(spec, points, r.ts)
                if x is None:
                    continue
                if not self.active.get(subject):
                    if x > spec.threshold:
                        start = self.pending.setdefault(subject, r.ts)
                        if r.ts - start >= spec.for_s:
                            self.active[subject] = True
                            signals += 1
                    else:
                        self.pending.pop(subject, None)
                elif x < spec.clear:
                    self.active[subject] = False
                    signals += 1
        return signals


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    signals = fn()
    return time.perf_counter() - start, signals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--naive-readings", type=int, default=20_000)
    args = parser.parse_args()
    specs = make_specs()
    rules: tuple[Rule, ...] = load_rules_text(to_yaml(specs), "bench")
    readings = make_readings(args.readings)
    warm = readings[: 10 * DEVICES * CHANNELS // 10]

    clock = Clock()
    ev = Evaluator(rules, clock)
    ev.on_readings(warm)  # first sight of every series: rule matching, buffers

    def run_engine() -> int:
        n = 0
        batch = 500
        for i in range(len(warm), len(readings), batch):
            n += len(ev.on_readings(readings[i : i + batch]))
        return n

    engine_s, engine_signals = timed(run_engine)
    engine_n = len(readings) - len(warm)

    lat_ev = Evaluator(rules, clock)
    lat_ev.on_readings(readings[: len(warm)])
    lat: list[float] = []
    for r in readings[len(warm) : len(warm) + 20_000]:
        t = time.perf_counter()
        lat_ev.on_readings([r])
        lat.append(time.perf_counter() - t)
    lat.sort()

    naive = Naive(specs)
    naive.on_readings(warm)
    sub = readings[len(warm) : len(warm) + args.naive_readings]
    naive_s, naive_signals = timed(lambda: naive.on_readings(sub))

    rows = [
        ("cityops Evaluator (numpy windows)", engine_n, engine_s, engine_signals),
        ("naive (all rules x all readings, lists)", len(sub), naive_s, naive_signals),
    ]
    series = DEVICES * CHANNELS
    print(f"rules: {len(rules)}, series: {series}, rules per series: {RULES // CHANNELS}")
    print(f"{'evaluator':<42} {'readings':>9} {'seconds':>8} {'readings/s':>11} {'signals':>8}")
    for name, n, secs, signals in rows:
        print(f"{name:<42} {n:>9} {secs:>8.2f} {n / secs:>11,.0f} {signals:>8}")
    speedup = (engine_n / engine_s) / (len(sub) / naive_s)
    print(f"speed-up: {speedup:.1f}x")
    p50 = statistics.median(lat) * 1e6
    p99 = lat[int(0.99 * len(lat))] * 1e6
    print(f"per-reading evaluation latency (10 rules each): p50 {p50:.0f} us, p99 {p99:.0f} us")


if __name__ == "__main__":
    main()
