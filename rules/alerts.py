"""Alert values: states, actions, the transition table, and the frozen records.

The states are fixed in DESIGN.md (after ISA-18.2); :mod:`rules.lifecycle`
applies the transitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from rules.model import Role, Severity

__all__ = [
    "ACTIONS",
    "ALLOWED",
    "OPEN_STATES",
    "STATES",
    "SYSTEM",
    "Action",
    "Actor",
    "Alert",
    "AlertEvent",
    "AlertSource",
    "AlertState",
]

AlertState = Literal[
    "normal",
    "active_unacked",
    "active_acked",
    "cleared_unacked",
    "closed",
    "shelved",
    "suppressed",
    "out_of_service",
]
STATES: Final[tuple[AlertState, ...]] = (
    "normal",
    "active_unacked",
    "active_acked",
    "cleared_unacked",
    "closed",
    "shelved",
    "suppressed",
    "out_of_service",
)
Action = Literal[
    "raise",
    "clear",
    "acknowledge",
    "comment",
    "assign",
    "shelve",
    "unshelve",
    "resolve",
    "put_out_of_service",
    "return_to_service",
    "escalate",
    "renotify",
    "suppress",
    "unsuppress",
]
ACTIONS: Final[tuple[Action, ...]] = (
    "raise",
    "clear",
    "acknowledge",
    "comment",
    "assign",
    "shelve",
    "unshelve",
    "resolve",
    "put_out_of_service",
    "return_to_service",
    "escalate",
    "renotify",
    "suppress",
    "unsuppress",
)
AlertSource = Literal["live", "replay", "drill"]

_ACTIVE: tuple[AlertState, ...] = ("active_unacked", "active_acked", "cleared_unacked")
_PARKED: tuple[AlertState, ...] = ("shelved", "suppressed", "out_of_service")
OPEN_STATES: Final[frozenset[AlertState]] = frozenset({*_ACTIVE, *_PARKED})

ALLOWED: Final[dict[AlertState, frozenset[Action]]] = {
    "normal": frozenset({"raise"}),
    "active_unacked": frozenset(
        {"raise", "clear", "acknowledge", "comment", "assign", "shelve", "resolve",
         "put_out_of_service", "escalate", "suppress"}
    ),
    "active_acked": frozenset(
        {"raise", "clear", "comment", "assign", "shelve", "resolve", "put_out_of_service",
         "renotify", "suppress"}
    ),
    "cleared_unacked": frozenset(
        {"raise", "acknowledge", "comment", "assign", "shelve", "resolve",
         "put_out_of_service", "escalate", "suppress"}
    ),
    "closed": frozenset({"raise", "comment"}),
    "shelved": frozenset(
        {"raise", "clear", "comment", "assign", "unshelve", "resolve", "put_out_of_service"}
    ),
    "suppressed": frozenset(
        {"raise", "clear", "comment", "assign", "unsuppress", "put_out_of_service"}
    ),
    "out_of_service": frozenset({"raise", "clear", "comment", "assign", "return_to_service"}),
}  # fmt: skip
"""State → the actions it allows. ``raise`` on ``closed`` opens a new alert."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who does something: a user with a role, or cityops itself."""

    name: str
    role: Role | Literal["system"]


SYSTEM: Final = Actor("cityops", "system")


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: a rule's condition on one subject, from raise to close."""

    id: str
    rule_id: str
    subject: str
    severity: Severity
    state: AlertState
    version: int
    message: str
    raised_at: float
    updated_at: float
    active: bool = True
    """Whether the condition is active now (kept while shelved, suppressed, out of service)."""
    acked: bool = False
    occurrences: int = 1
    value: float | None = None
    device_id: str | None = None
    channel: str | None = None
    district: str = ""
    acked_by: str | None = None
    acked_at: float | None = None
    cleared_at: float | None = None
    closed_at: float | None = None
    unacked_since: float = 0.0
    assignee: str | None = None
    shelved_until: float | None = None
    shelve_reason: str | None = None
    escalation_level: int = 0
    chattering: bool = False
    incident_id: str | None = None
    source: AlertSource = "live"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One transition, as written to ``alert_events``."""

    alert_id: str
    version: int
    action: Action
    from_state: AlertState
    to_state: AlertState
    actor: str
    at: float
    note: str = ""
    notify: Role | None = None
    """The role to page (raise, escalate, renotify); ``None`` when nobody is paged."""
