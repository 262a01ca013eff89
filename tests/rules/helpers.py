"""Fakes and builders shared by the rules tests."""

from __future__ import annotations

from dataclasses import dataclass

from ingest.model import DeviceRef, Domain, Presence, Reading
from rules import Evaluator, EvaluatorOptions, Rule, load_rules_text

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC, a Thursday


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    t: float = T0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def dev(device_id: str, district: str = "chuo", domain: Domain = "traffic") -> DeviceRef:
    return DeviceRef(domain, district, device_id)


def num(
    device: DeviceRef, channel: str, ts: float, value: float, ut: float | None = None
) -> Reading:
    return Reading(device, channel, ts, value, None, None, ut)


def st(device: DeviceRef, channel: str, ts: float, state: str) -> Reading:
    return Reading(device, channel, ts, None, state, None)


def presence(device: DeviceRef, state: str, session: int, ts: float = T0) -> Presence:
    assert state in ("online", "offline")
    return Presence(device, "online" if state == "online" else "offline", session, ts)


def rules(text: str) -> tuple[Rule, ...]:
    return load_rules_text(text, "test.yaml")


def evaluator(
    text: str, clock: FakeClock | None = None, **options: float
) -> tuple[Evaluator, FakeClock]:
    clk = clock or FakeClock()
    opts = EvaluatorOptions(**options) if options else None  # type: ignore[arg-type]
    return Evaluator(rules(text), clk, options=opts), clk


def rule_yaml(body: str, *, channel: str = "occupancy", kind: str = "loop-detector") -> str:
    """One rule ``r1`` on ``kind``/``channel`` with ``body`` (YAML lines, 4-space indent)."""
    return (
        "rules:\n"
        "  - id: r1\n"
        "    name: R1\n"
        f"    subject: {{kind: {kind}, channel: {channel}}}\n"
        "    severity: minor\n"
        '    message: "{device} {channel} {value}"\n' + body
    )
