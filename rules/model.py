"""Rules as loaded values: what a rule file says, validated and parsed.

These are immutable; the loader builds them, the evaluator and the alert
lifecycle read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final, Literal

from rules.expr import Call, Node, Str, walk

__all__ = [
    "ROLES",
    "ROLE_COVERS",
    "SEVERITIES",
    "CorrelateCondition",
    "Correlation",
    "EscalationStep",
    "Role",
    "Rule",
    "Severity",
    "Subject",
    "raised_severity",
]

Severity = Literal["warning", "minor", "major", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("warning", "minor", "major", "critical")
"""Lowest first."""
Role = Literal["operator", "responder", "engineer", "admin"]
ROLES: Final[tuple[Role, ...]] = ("operator", "responder", "engineer", "admin")
ROLE_COVERS: Final[dict[Role, frozenset[Role]]] = {
    "operator": frozenset({"operator"}),
    "responder": frozenset({"operator", "responder"}),
    "engineer": frozenset({"engineer"}),
    "admin": frozenset(ROLES),
}
"""Whose alerts a role may acknowledge: a rule's ``ack_role`` must be in this set.

A responder does everything an operator does on alerts and also handles
emergency alerts; engineers answer the device-health alerts addressed to them
(a silent gauge, a device offline) and nothing else.
"""


def raised_severity(current: Severity, to: Severity | None) -> Severity:
    """The higher of ``current`` and ``to`` (escalation never lowers a severity)."""
    if to is None:
        return current
    return to if SEVERITIES.index(to) > SEVERITIES.index(current) else current


@dataclass(frozen=True, slots=True)
class Subject:
    """Which series a rule (or a correlation condition) applies to.

    Every field is a tuple of alternatives; an empty tuple matches anything.
    ``districts`` and ``devices`` are shell-style globs (``loop-*``).
    """

    domains: tuple[str, ...] = ()
    districts: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()

    def matches(
        self, domain: str, district: str, kind: str | None, device_id: str, channel: str
    ) -> bool:
        """Whether one series (device + channel) is in this subject."""
        if self.domains and domain not in self.domains:
            return False
        if self.kinds and kind not in self.kinds:
            return False
        if self.channels and channel not in self.channels:
            return False
        if self.districts and not any(fnmatchcase(district, g) for g in self.districts):
            return False
        return not self.devices or any(fnmatchcase(device_id, g) for g in self.devices)


@dataclass(frozen=True, slots=True)
class EscalationStep:
    """One escalation step.

    Due ``after`` seconds past the ack deadline (``raised + ack_timeout``) while
    the alert is still unacknowledged.
    """

    after_s: float
    notify: Role
    severity: Severity | None = None


@dataclass(frozen=True, slots=True)
class CorrelateCondition:
    """One condition of a correlation rule, on its own series."""

    subject: Subject
    when: Node
    when_text: str
    label: str


@dataclass(frozen=True, slots=True)
class Correlation:
    """Several conditions, each on different series of one district, within a window."""

    within_s: float
    conditions: tuple[CorrelateCondition, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule.

    A *series rule* has a ``when`` and is evaluated per matching series
    (subject key ``rule|device|channel``); a *device rule* has no channel in
    its subject and uses only ``offline()`` (key ``rule|device|*``); a
    *correlation rule* has ``correlation`` and is evaluated per district (key
    ``rule|district:<name>|*``).
    """

    id: str
    name: str
    description: str
    subject: Subject
    severity: Severity
    message: str
    when: Node | None = None
    when_text: str = ""
    clear_when: Node | None = None
    clear_when_text: str = ""
    for_s: float = 0.0
    max_gap_s: float | None = None
    ack_timeout_s: float | None = None
    escalation: tuple[EscalationStep, ...] = ()
    ack_role: Role = "operator"
    resolve_manually: bool = False
    renotify_after_s: float | None = None
    category: str = ""
    subcategory: str = ""
    correlation: Correlation | None = None
    source: str = ""
    """``file:line`` where the rule is defined."""

    @property
    def kind(self) -> Literal["series", "device", "correlation"]:
        """How the rule is evaluated."""
        if self.correlation is not None:
            return "correlation"
        return "series" if self.subject.channels else "device"

    def expressions(self) -> tuple[Node, ...]:
        """Every expression of the rule."""
        out = [n for n in (self.when, self.clear_when) if n is not None]
        if self.correlation is not None:
            out.extend(c.when for c in self.correlation.conditions)
        return tuple(out)

    @property
    def uses_timers(self) -> bool:
        """Whether the rule can change without a reading (``no_data``, ``offline``)."""
        return any(
            isinstance(n, Call) and n.func in ("no_data", "offline")
            for e in self.expressions()
            for n in walk(e)
        )

    def windows(self) -> dict[str | None, float]:
        """Longest window each referenced channel needs (``None``: the own channel)."""
        need: dict[str | None, float] = {}
        for expr in self.expressions():
            for n in walk(expr):
                if isinstance(n, Call) and n.func not in ("offline", "zscore", "abs", "within"):
                    seconds = getattr(n.args[0], "seconds", 0.0)
                    ch = n.args[1].value if len(n.args) > 1 and isinstance(n.args[1], Str) else None
                    need[ch] = max(need.get(ch, 0.0), seconds)
                if isinstance(n, Call) and n.func == "within":
                    need[None] = max(need.get(None, 0.0), getattr(n.args[0], "seconds", 0.0))
        return need

    def baseline_channels(self) -> tuple[str | None, ...]:
        """Channels whose hour-of-week baseline the rule needs (``None``: its own)."""
        out: list[str | None] = []
        for expr in self.expressions():
            for n in walk(expr):
                if isinstance(n, Call) and n.func == "zscore":
                    out.append(n.args[0].value if n.args and isinstance(n.args[0], Str) else None)
        return tuple(out)
