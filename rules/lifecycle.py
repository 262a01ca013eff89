"""The alert lifecycle state machine (pure), after ISA-18.2.

States (fixed in DESIGN.md)::

            raise                      ack
 normal ───────────► active_unacked ─────────► active_acked
                         │  clear                   │ clear
                         ▼                          ▼
                   cleared_unacked ──── ack ────► closed

plus ``shelved`` (hidden until a deadline, with a reason), ``suppressed`` (by
design: device offline, replay or drill) and ``out_of_service`` (device under
maintenance). An alert in one of those three keeps tracking whether its
condition is active and whether it was acknowledged; leaving it returns to
``active_acked`` / ``active_unacked`` while the condition is active, or to
``closed`` when it cleared meanwhile.

Every method takes an :class:`Alert` and returns the new one (``version + 1``)
with the :class:`AlertEvent` that records the transition; nothing is
mutated, so storage can write both in one transaction with
``WHERE version = expected``. ``rules.alerts.ALLOWED`` is the transition table.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from rules.alerts import (
    ALLOWED,
    SYSTEM,
    Action,
    Actor,
    Alert,
    AlertEvent,
    AlertSource,
    AlertState,
)
from rules.engine import AlertSignal, Clock
from rules.errors import ForbiddenTransition, NotPermitted, VersionConflict
from rules.model import ROLE_COVERS, EscalationStep, Role, Rule, raised_severity

__all__ = ["AlertLifecycle"]


def _resting(alert: Alert) -> AlertState:
    """Where an alert goes when it leaves shelved / suppressed / out of service."""
    if not alert.active:
        return "closed"
    return "active_acked" if alert.acked else "active_unacked"


class AlertLifecycle:
    """Applies actions to alerts under the rules' policies.

    Args:
        rules: The rules by id (for ack role, manual resolve, timers).
        clock: Time of each transition.
        new_id: Makes the id of a new alert (default: a random UUID).
    """

    def __init__(
        self,
        rules: Mapping[str, Rule] | Iterable[Rule],
        *,
        clock: Clock,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.rules: dict[str, Rule] = (
            dict(rules) if isinstance(rules, Mapping) else {r.id: r for r in rules}
        )
        self.clock = clock
        self.new_id = new_id or (lambda: uuid.uuid4().hex)

    def replace_rules(self, rules: Mapping[str, Rule] | Iterable[Rule]) -> None:
        """Use a reloaded rule set from now on (alerts keep their rule ids)."""
        self.rules = dict(rules) if isinstance(rules, Mapping) else {r.id: r for r in rules}

    # -- helpers ---------------------------------------------------------------

    def _rule(self, alert: Alert) -> Rule | None:
        return self.rules.get(alert.rule_id)

    def _check(self, alert: Alert, action: Action, expected_version: int | None = None) -> None:
        if expected_version is not None and expected_version != alert.version:
            raise VersionConflict(
                alert.id, expected_version, alert.version, alert.acked_by, alert.acked_at
            )
        if action not in ALLOWED[alert.state]:
            why = ""
            if action == "acknowledge" and alert.acked_by:
                why = f"already acknowledged by {alert.acked_by} at {alert.acked_at:.0f}"
            raise ForbiddenTransition(alert.id, alert.state, action, why)

    def _may_ack(self, alert: Alert, by: Actor, action: Action) -> None:
        rule = self._rule(alert)
        role = rule.ack_role if rule is not None else "operator"
        if by.role != "system" and role not in ROLE_COVERS[by.role]:
            why = f"{by.name} is {by.role}; this alert needs {role} or admin"
            raise NotPermitted(alert.id, action, why)

    def _next(
        self,
        alert: Alert,
        action: Action,
        to: AlertState,
        by: Actor,
        *,
        note: str = "",
        notify: Role | None = None,
        **changes: Any,
    ) -> tuple[Alert, AlertEvent]:
        at = self.clock.now()
        if to == "closed" and alert.state != "closed":
            changes.setdefault("closed_at", at)
        new = replace(alert, state=to, version=alert.version + 1, updated_at=at, **changes)
        event = AlertEvent(
            alert.id, new.version, action, alert.state, to, by.name, at, note, notify
        )
        return new, event

    # -- condition edges ---------------------------------------------------------

    def raise_(
        self,
        signal: AlertSignal,
        existing: Alert | None = None,
        *,
        source: AlertSource = "live",
        out_of_service: bool = False,
    ) -> tuple[Alert, AlertEvent]:
        """A rule's condition became active.

        With no open alert (``existing`` ``None`` or closed) a new alert opens:
        ``active_unacked``; ``out_of_service`` when the device is under
        maintenance; ``suppressed`` when the signal is suppressed or the
        source is a replay or drill (they never page). On an open alert the
        occurrence count rises and a cleared one becomes active again.
        """
        at = self.clock.now()
        rule = self.rules.get(signal.rule_id)
        notify = rule.ack_role if rule is not None else None
        if existing is None or existing.state == "closed":
            parked = signal.suppressed or source != "live" or out_of_service
            state: AlertState = "active_unacked"
            if source != "live" or signal.suppressed:
                state = "suppressed"
            elif out_of_service:
                state = "out_of_service"
            alert = Alert(
                id=self.new_id(),
                rule_id=signal.rule_id,
                subject=signal.subject,
                severity=signal.severity,
                state=state,
                version=1,
                message=signal.message,
                raised_at=at,
                updated_at=at,
                value=signal.value,
                device_id=signal.device_id,
                channel=signal.channel,
                district=signal.district,
                unacked_since=at,
                chattering=signal.chattering,
                source=source,
            )
            event = AlertEvent(
                alert.id, 1, "raise", "normal", state, SYSTEM.name, at, signal.message,
                None if parked else notify,
            )  # fmt: skip
            return alert, event
        self._check(existing, "raise")
        to: AlertState = existing.state
        if existing.state == "cleared_unacked":
            to = "active_unacked"
        paged = to == "active_unacked" and existing.state != "active_unacked"
        return self._next(
            existing,
            "raise",
            to,
            SYSTEM,
            note=signal.message,
            notify=notify if paged else None,
            active=True,
            occurrences=existing.occurrences + 1,
            value=signal.value,
            message=signal.message,
            chattering=existing.chattering or signal.chattering,
        )

    def clear(self, alert: Alert, signal: AlertSignal | None = None) -> tuple[Alert, AlertEvent]:
        """The condition returned to normal."""
        self._check(alert, "clear")
        at = self.clock.now()
        to: AlertState = alert.state
        if alert.state == "active_unacked":
            to = "cleared_unacked"
        elif alert.state in ("active_acked", "suppressed"):
            to = "closed"  # acknowledged, or by design nobody needs to: done
        chattering = alert.chattering or (signal is not None and signal.chattering)
        return self._next(
            alert, "clear", to, SYSTEM, active=False, cleared_at=at, chattering=chattering
        )

    # -- people ------------------------------------------------------------------

    def acknowledge(
        self, alert: Alert, by: Actor, note: str = "", expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Acknowledge; the second of two concurrent acks gets :class:`VersionConflict`."""
        self._check(alert, "acknowledge", expected_version)
        self._may_ack(alert, by, "acknowledge")
        to: AlertState = "active_acked" if alert.state == "active_unacked" else "closed"
        at = self.clock.now()
        return self._next(
            alert, "acknowledge", to, by, note=note, acked=True, acked_by=by.name, acked_at=at
        )

    def comment(
        self, alert: Alert, by: Actor, note: str, expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Add a note without changing the state."""
        self._check(alert, "comment", expected_version)
        return self._next(alert, "comment", alert.state, by, note=note)

    def assign(
        self, alert: Alert, by: Actor, to: str, note: str = "", expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Make ``to`` (a user name) responsible for the alert."""
        self._check(alert, "assign", expected_version)
        return self._next(alert, "assign", alert.state, by, note=note or to, assignee=to)

    def shelve(
        self,
        alert: Alert,
        by: Actor,
        until: float,
        reason: str,
        expected_version: int | None = None,
    ) -> tuple[Alert, AlertEvent]:
        """Hide the alert until ``until`` (audited; a reason is required)."""
        self._check(alert, "shelve", expected_version)
        if not reason.strip():
            raise NotPermitted(alert.id, "shelve", "a reason is required")
        if until <= self.clock.now():
            raise NotPermitted(alert.id, "shelve", f"until ({until:.0f}) is not in the future")
        return self._next(
            alert, "shelve", "shelved", by, note=reason, shelved_until=until, shelve_reason=reason
        )

    def unshelve(
        self, alert: Alert, by: Actor = SYSTEM, expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Show the alert again (by hand, or by :meth:`advance` at the deadline)."""
        self._check(alert, "unshelve", expected_version)
        return self._resume(alert, "unshelve", by, shelved_until=None, shelve_reason=None)

    def _resume(
        self, alert: Alert, action: Action, by: Actor, **changes: Any
    ) -> tuple[Alert, AlertEvent]:
        to = _resting(alert)
        rule = self._rule(alert)
        notify = rule.ack_role if rule is not None and to == "active_unacked" else None
        if to == "active_unacked":
            changes["unacked_since"] = self.clock.now()
            changes["escalation_level"] = 0
        return self._next(alert, action, to, by, notify=notify, **changes)

    def resolve(
        self, alert: Alert, by: Actor, note: str, expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Close the alert by hand; only for rules with ``resolve_manually: true``."""
        self._check(alert, "resolve", expected_version)
        rule = self._rule(alert)
        if rule is None or not rule.resolve_manually:
            raise NotPermitted(alert.id, "resolve", f"rule {alert.rule_id!r} clears by itself")
        self._may_ack(alert, by, "resolve")
        if not note.strip():
            raise NotPermitted(alert.id, "resolve", "a note is required")
        at = self.clock.now()
        acked: dict[str, Any] = (
            {} if alert.acked else {"acked": True, "acked_by": by.name, "acked_at": at}
        )
        return self._next(alert, "resolve", "closed", by, note=note, **acked)

    def put_out_of_service(
        self, alert: Alert, by: Actor, note: str, expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """The device is under maintenance: park the alert."""
        self._check(alert, "put_out_of_service", expected_version)
        return self._next(alert, "put_out_of_service", "out_of_service", by, note=note)

    def return_to_service(
        self, alert: Alert, by: Actor, note: str = "", expected_version: int | None = None
    ) -> tuple[Alert, AlertEvent]:
        """Maintenance is over."""
        self._check(alert, "return_to_service", expected_version)
        return self._with_note(self._resume(alert, "return_to_service", by), note)

    @staticmethod
    def _with_note(pair: tuple[Alert, AlertEvent], note: str) -> tuple[Alert, AlertEvent]:
        alert, event = pair
        return alert, replace(event, note=note)

    def suppress(
        self, alert: Alert, by: Actor = SYSTEM, note: str = ""
    ) -> tuple[Alert, AlertEvent]:
        """Suppress by design (device went offline, drill started)."""
        self._check(alert, "suppress")
        return self._next(alert, "suppress", "suppressed", by, note=note)

    def unsuppress(
        self, alert: Alert, by: Actor = SYSTEM, note: str = ""
    ) -> tuple[Alert, AlertEvent]:
        """End a suppression."""
        self._check(alert, "unsuppress")
        return self._with_note(self._resume(alert, "unsuppress", by), note)

    # -- timers ------------------------------------------------------------------

    def steps(self, alert: Alert) -> tuple[EscalationStep, ...]:
        """The escalation steps of the alert's rule (one implicit step without a list)."""
        rule = self._rule(alert)
        if rule is None or rule.ack_timeout_s is None:
            return ()
        return rule.escalation or (EscalationStep(0.0, rule.ack_role),)

    def escalate(self, alert: Alert) -> tuple[Alert, AlertEvent]:
        """Apply the next escalation step: page its role, raise the severity."""
        self._check(alert, "escalate")
        steps = self.steps(alert)
        if alert.escalation_level >= len(steps):
            raise ForbiddenTransition(alert.id, alert.state, "escalate", "no escalation step left")
        step = steps[alert.escalation_level]
        severity = raised_severity(alert.severity, step.severity)
        note = f"step {alert.escalation_level + 1}: notify {step.notify}"
        if severity != alert.severity:
            note += f", severity {alert.severity} → {severity}"
        return self._next(
            alert,
            "escalate",
            alert.state,
            SYSTEM,
            note=note,
            notify=step.notify,
            escalation_level=alert.escalation_level + 1,
            severity=severity,
        )

    def renotify(self, alert: Alert) -> tuple[Alert, AlertEvent]:
        """Acknowledged but still active past ``renotify_after``: unacknowledged again."""
        self._check(alert, "renotify")
        rule = self._rule(alert)
        notify = rule.ack_role if rule is not None else None
        return self._next(
            alert,
            "renotify",
            "active_unacked",
            SYSTEM,
            note="still active after acknowledgement",
            notify=notify,
            acked=False,
            unacked_since=self.clock.now(),
            escalation_level=0,
        )

    def advance(self, alert: Alert) -> tuple[Alert, list[AlertEvent]]:
        """Apply every timer that is due now: unshelve, escalation steps, re-notify.

        Returns:
            The alert after all due transitions, and their events in order.
        """
        now = self.clock.now()
        events: list[AlertEvent] = []
        shelved_until = alert.shelved_until
        if alert.state == "shelved" and shelved_until is not None and now >= shelved_until:
            alert, event = self.unshelve(alert)
            events.append(event)
        rule = self._rule(alert)
        if rule is None:
            return alert, events
        if alert.state in ("active_unacked", "cleared_unacked") and rule.ack_timeout_s:
            steps = self.steps(alert)
            while alert.escalation_level < len(steps):
                due = (
                    alert.unacked_since + rule.ack_timeout_s + steps[alert.escalation_level].after_s
                )
                if now < due:
                    break
                alert, event = self.escalate(alert)
                events.append(event)
        if (
            alert.state == "active_acked"
            and rule.renotify_after_s is not None
            and alert.acked_at is not None
            and now - alert.acked_at >= rule.renotify_after_s
        ):
            alert, event = self.renotify(alert)
            events.append(event)
        return alert, events
