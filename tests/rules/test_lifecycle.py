from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from rules import (
    ACTIONS,
    ALLOWED,
    STATES,
    Action,
    Actor,
    Alert,
    AlertEvent,
    AlertLifecycle,
    AlertSignal,
    AlertState,
    ForbiddenTransition,
    NotPermitted,
    VersionConflict,
)

from .helpers import T0, FakeClock, rules

RULES = rules(
    """\
- id: fire
  name: Fire
  subject: {channel: state}
  when: state == "alarm"
  severity: major
  message: "fire at {device}"
  ack_timeout: 2m
  escalation:
    - {after: 0s, notify: responder}
    - {after: 5m, notify: admin, severity: critical}
  ack_role: responder
  resolve_manually: true
  renotify_after: 10m
- id: plain
  name: Plain
  subject: {channel: x}
  when: value > 1
  severity: minor
  message: m
"""
)
ANA = Actor("ana", "responder")
BEN = Actor("ben", "responder")
OPS = Actor("olga", "operator")
ADMIN = Actor("root", "admin")


def signal(
    rule_id: str = "fire", *, suppressed: bool = False, chattering: bool = False
) -> AlertSignal:
    return AlertSignal(
        "raise",
        rule_id,
        f"{rule_id}|fire-chuo-001|state",
        "major",
        "fire at fire-chuo-001",
        T0,
        device_id="fire-chuo-001",
        channel="state",
        district="chuo",
        suppressed=suppressed,
        chattering=chattering,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lc(clock: FakeClock) -> AlertLifecycle:
    ids = iter(f"a{i}" for i in range(1000))
    return AlertLifecycle(RULES, clock=clock, new_id=lambda: next(ids))


def in_state(lc: AlertLifecycle, state: AlertState) -> Alert:
    """An alert brought to ``state`` through real transitions."""
    if state == "normal":
        return replace(lc.raise_(signal())[0], state="normal")
    if state == "suppressed":
        return lc.raise_(signal(suppressed=True))[0]
    alert, _ = lc.raise_(signal())
    if state == "active_unacked":
        return alert
    if state == "active_acked":
        return lc.acknowledge(alert, ANA)[0]
    if state == "shelved":
        return lc.shelve(alert, ANA, lc.clock.now() + 600, "maintenance crew on site")[0]
    if state == "out_of_service":
        return lc.put_out_of_service(alert, ADMIN, "detector replaced")[0]
    alert, _ = lc.clear(alert)
    if state == "cleared_unacked":
        return alert
    assert state == "closed"
    return lc.acknowledge(alert, ANA)[0]


def act(lc: AlertLifecycle, alert: Alert, action: Action) -> tuple[Alert, AlertEvent]:
    calls: dict[Action, Callable[[], tuple[Alert, AlertEvent]]] = {
        "raise": lambda: lc.raise_(signal(), alert),
        "clear": lambda: lc.clear(alert),
        "acknowledge": lambda: lc.acknowledge(alert, ANA, "on it"),
        "comment": lambda: lc.comment(alert, ANA, "crew dispatched"),
        "assign": lambda: lc.assign(alert, ANA, "ben"),
        "shelve": lambda: lc.shelve(alert, ANA, lc.clock.now() + 600, "known issue"),
        "unshelve": lambda: lc.unshelve(alert, ANA),
        "resolve": lambda: lc.resolve(alert, ANA, "false alarm"),
        "put_out_of_service": lambda: lc.put_out_of_service(alert, ADMIN, "maintenance"),
        "return_to_service": lambda: lc.return_to_service(alert, ADMIN, "done"),
        "escalate": lambda: lc.escalate(alert),
        "renotify": lambda: lc.renotify(alert),
        "suppress": lambda: lc.suppress(alert),
        "unsuppress": lambda: lc.unsuppress(alert),
    }
    return calls[action]()


EXPECTED: dict[tuple[AlertState, Action], AlertState] = {
    ("normal", "raise"): "active_unacked",
    ("active_unacked", "raise"): "active_unacked",
    ("active_unacked", "clear"): "cleared_unacked",
    ("active_unacked", "acknowledge"): "active_acked",
    ("active_unacked", "comment"): "active_unacked",
    ("active_unacked", "assign"): "active_unacked",
    ("active_unacked", "shelve"): "shelved",
    ("active_unacked", "resolve"): "closed",
    ("active_unacked", "put_out_of_service"): "out_of_service",
    ("active_unacked", "escalate"): "active_unacked",
    ("active_unacked", "suppress"): "suppressed",
    ("active_acked", "raise"): "active_acked",
    ("active_acked", "clear"): "closed",
    ("active_acked", "comment"): "active_acked",
    ("active_acked", "assign"): "active_acked",
    ("active_acked", "shelve"): "shelved",
    ("active_acked", "resolve"): "closed",
    ("active_acked", "put_out_of_service"): "out_of_service",
    ("active_acked", "renotify"): "active_unacked",
    ("active_acked", "suppress"): "suppressed",
    ("cleared_unacked", "raise"): "active_unacked",
    ("cleared_unacked", "acknowledge"): "closed",
    ("cleared_unacked", "comment"): "cleared_unacked",
    ("cleared_unacked", "assign"): "cleared_unacked",
    ("cleared_unacked", "shelve"): "shelved",
    ("cleared_unacked", "resolve"): "closed",
    ("cleared_unacked", "put_out_of_service"): "out_of_service",
    ("cleared_unacked", "escalate"): "cleared_unacked",
    ("cleared_unacked", "suppress"): "suppressed",
    ("closed", "raise"): "active_unacked",
    ("closed", "comment"): "closed",
    ("shelved", "raise"): "shelved",
    ("shelved", "clear"): "shelved",
    ("shelved", "comment"): "shelved",
    ("shelved", "assign"): "shelved",
    ("shelved", "unshelve"): "active_unacked",
    ("shelved", "resolve"): "closed",
    ("shelved", "put_out_of_service"): "out_of_service",
    ("suppressed", "raise"): "suppressed",
    ("suppressed", "clear"): "closed",
    ("suppressed", "comment"): "suppressed",
    ("suppressed", "assign"): "suppressed",
    ("suppressed", "unsuppress"): "active_unacked",
    ("suppressed", "put_out_of_service"): "out_of_service",
    ("out_of_service", "raise"): "out_of_service",
    ("out_of_service", "clear"): "out_of_service",
    ("out_of_service", "comment"): "out_of_service",
    ("out_of_service", "assign"): "out_of_service",
    ("out_of_service", "return_to_service"): "active_unacked",
}


def test_expected_table_is_the_allowed_table() -> None:
    allowed = {(s, a) for s, actions in ALLOWED.items() for a in actions}
    assert allowed == set(EXPECTED)
    assert set(ALLOWED) == set(STATES)


@pytest.mark.parametrize(("state", "action"), sorted(EXPECTED))
def test_every_allowed_transition(lc: AlertLifecycle, state: AlertState, action: Action) -> None:
    alert = in_state(lc, state)
    if state == "normal":
        new, event = lc.raise_(signal())
    else:
        new, event = act(lc, alert, action)
    assert new.state == EXPECTED[state, action]
    assert event.to_state == new.state
    assert event.action == action
    if state in ("normal", "closed") and action == "raise":
        assert new.id != alert.id
        assert new.version == 1
        assert event.from_state == "normal"
    else:
        assert new.id == alert.id
        assert new.version == alert.version + 1
        assert event.version == new.version
        assert event.from_state == state
    assert event.at == lc.clock.now()


FORBIDDEN = [(s, a) for s in STATES for a in ACTIONS if a not in ALLOWED[s]]


@pytest.mark.parametrize(("state", "action"), FORBIDDEN)
def test_every_forbidden_transition(lc: AlertLifecycle, state: AlertState, action: Action) -> None:
    alert = in_state(lc, state)
    with pytest.raises(ForbiddenTransition) as info:
        act(lc, alert, action)
    err = info.value
    assert (err.alert_id, err.state, err.action) == (alert.id, state, action)
    assert str(err).startswith(f"alert {alert.id!r} is {state}; cannot {action}")


def test_two_acks_at_once_one_wins_the_other_learns_who(
    lc: AlertLifecycle, clock: FakeClock
) -> None:
    alert, _ = lc.raise_(signal())
    seen_by_both = alert.version
    clock.advance(5)
    acked, event = lc.acknowledge(alert, ANA, "going", expected_version=seen_by_both)
    assert (acked.acked_by, acked.acked_at, event.actor, event.note) == (
        "ana",
        T0 + 5,
        "ana",
        "going",
    )
    with pytest.raises(VersionConflict) as info:
        lc.acknowledge(acked, BEN, expected_version=seen_by_both)
    err = info.value
    assert (err.acked_by, err.acked_at, err.expected_version, err.actual_version) == (
        "ana",
        T0 + 5,
        1,
        2,
    )
    assert "acknowledged by ana" in str(err)
    # without a version the second ack is a forbidden transition naming the first
    with pytest.raises(ForbiddenTransition, match="already acknowledged by ana"):
        lc.acknowledge(replace(acked, state="closed"), BEN)


def test_ack_needs_the_rule_role(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    with pytest.raises(NotPermitted, match="olga is operator; this alert needs responder or admin"):
        lc.acknowledge(alert, OPS)
    assert lc.acknowledge(alert, ADMIN)[0].state == "active_acked"


def test_resolve_only_where_the_rule_allows(lc: AlertLifecycle) -> None:
    plain, _ = lc.raise_(signal("plain"))
    with pytest.raises(NotPermitted, match="clears by itself"):
        lc.resolve(plain, ADMIN, "x")
    fire, _ = lc.raise_(signal())
    with pytest.raises(NotPermitted, match="note is required"):
        lc.resolve(fire, ANA, " ")
    closed, event = lc.resolve(fire, ANA, "false alarm: cooking")
    assert (closed.state, closed.acked_by, event.note) == ("closed", "ana", "false alarm: cooking")
    assert closed.closed_at == T0


def test_shelve_needs_reason_and_future_and_expires(lc: AlertLifecycle, clock: FakeClock) -> None:
    alert, _ = lc.raise_(signal())
    with pytest.raises(NotPermitted, match="reason"):
        lc.shelve(alert, ANA, T0 + 60, "")
    with pytest.raises(NotPermitted, match="future"):
        lc.shelve(alert, ANA, T0, "x")
    shelved, _ = lc.shelve(alert, ANA, T0 + 60, "crew on site")
    assert (shelved.shelved_until, shelved.shelve_reason) == (T0 + 60, "crew on site")
    clock.advance(59)
    assert lc.advance(shelved) == (shelved, [])
    clock.advance(1)
    back, events = lc.advance(shelved)
    assert back.state == "active_unacked"
    assert back.shelved_until is None
    assert [e.action for e in events] == ["unshelve"]
    assert events[0].notify == "responder"


def test_parked_alert_that_cleared_meanwhile_returns_closed(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    shelved, _ = lc.shelve(alert, ANA, T0 + 60, "x")
    shelved, _ = lc.clear(shelved)
    assert shelved.state == "shelved"
    assert not shelved.active
    assert lc.unshelve(shelved)[0].state == "closed"
    oos, _ = lc.put_out_of_service(lc.acknowledge(alert, ANA)[0], ADMIN, "m")
    assert lc.return_to_service(oos, ADMIN)[0].state == "active_acked"


def test_re_raise_counts_occurrences_and_latches_chattering(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    alert, _ = lc.clear(alert)
    alert, event = lc.raise_(signal(chattering=True), alert)
    assert (alert.state, alert.occurrences, alert.chattering) == ("active_unacked", 2, True)
    assert event.notify == "responder"
    alert, event = lc.raise_(signal(), alert)
    assert (alert.occurrences, alert.chattering, event.notify) == (3, True, None)


def test_replays_and_suppressed_signals_never_page(lc: AlertLifecycle) -> None:
    alert, event = lc.raise_(signal(), source="replay")
    assert (alert.state, alert.source, event.notify) == ("suppressed", "replay", None)
    alert, event = lc.raise_(signal(suppressed=True))
    assert (alert.state, event.notify) == ("suppressed", None)
    _, event = lc.raise_(signal())
    assert event.notify == "responder"


def test_escalation_timing(lc: AlertLifecycle, clock: FakeClock) -> None:
    alert, _ = lc.raise_(signal())
    clock.advance(119)
    assert lc.advance(alert)[1] == []
    clock.advance(1)  # ack_timeout 2m: step 1 (after 0s)
    alert, events = lc.advance(alert)
    assert [(e.action, e.notify) for e in events] == [("escalate", "responder")]
    assert (alert.escalation_level, alert.severity) == (1, "major")
    clock.advance(299)
    assert lc.advance(alert)[1] == []
    clock.advance(1)  # step 2 at ack_timeout + 5m raises the severity
    alert, events = lc.advance(alert)
    assert [(e.notify, e.note) for e in events] == [
        ("admin", "step 2: notify admin, severity major → critical")
    ]
    assert alert.severity == "critical"
    clock.advance(3600)
    assert lc.advance(alert)[1] == []  # no step left
    with pytest.raises(ForbiddenTransition, match="no escalation step left"):
        lc.escalate(alert)


def test_escalation_catches_up_and_stops_at_ack(lc: AlertLifecycle, clock: FakeClock) -> None:
    alert, _ = lc.raise_(signal())
    clock.advance(1000)
    _, events = lc.advance(alert)
    assert [e.notify for e in events] == ["responder", "admin"]
    acked, _ = lc.acknowledge(alert, ANA)
    assert lc.advance(acked)[1] == []


def test_renotify_when_acked_but_still_active(lc: AlertLifecycle, clock: FakeClock) -> None:
    alert, _ = lc.raise_(signal())
    acked, _ = lc.acknowledge(alert, ANA)
    clock.advance(599)
    assert lc.advance(acked)[1] == []
    clock.advance(1)
    again, events = lc.advance(acked)
    assert again.state == "active_unacked"
    assert not again.acked
    assert [(e.action, e.notify) for e in events] == [("renotify", "responder")]
    assert again.unacked_since == clock.now()
    # and escalation starts over from there
    clock.advance(120)
    assert [e.action for e in lc.advance(again)[1]] == ["escalate"]


def test_rule_without_timers_never_escalates(lc: AlertLifecycle, clock: FakeClock) -> None:
    alert, _ = lc.raise_(signal("plain"))
    clock.advance(86400)
    assert lc.advance(alert)[1] == []
    assert lc.steps(alert) == ()


def test_assign_comment_and_audit_fields(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    alert, event = lc.assign(alert, OPS, "ben")
    assert (alert.assignee, event.actor, event.note) == ("ben", "olga", "ben")
    alert, event = lc.comment(alert, ANA, "on scene", expected_version=alert.version)
    assert (event.note, event.from_state, event.to_state) == (
        "on scene",
        "active_unacked",
        "active_unacked",
    )
    with pytest.raises(VersionConflict):
        lc.comment(alert, ANA, "stale", expected_version=1)



def test_a_raise_for_a_device_out_of_service_opens_parked_and_pages_nobody(
    lc: AlertLifecycle,
) -> None:
    alert, event = lc.raise_(signal(), out_of_service=True)
    assert alert.state == "out_of_service"
    assert event.notify is None
    # maintenance over: the alert counts again, as active and unacknowledged
    back, _ = lc.return_to_service(alert, ADMIN, "", alert.version)
    assert back.state == "active_unacked"
