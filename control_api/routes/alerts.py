"""Alerts and incidents: list, detail with history, and people's actions.

Every action carries the ``version`` the caller saw. A stale version gets 409
with the alert as it is now (who acknowledged it and when), so of twenty
people acknowledging at once exactly one succeeds.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from control_api.auth import Principal
from control_api.context import ApiContext
from control_api.deps import Context, client_address, requires
from control_api.roles import Permission
from control_api.schemas import AlertEventOut, AlertOut, Page, error_responses
from rules import (
    Actor,
    Alert,
    AlertNotFound,
    ForbiddenTransition,
    NotPermitted,
    VersionConflict,
    alert_from_row,
)

router = APIRouter(prefix="/api/v1", tags=["alerts"])

View = Annotated[Principal, Depends(requires(Permission.VIEW))]
Act = Annotated[Principal, Depends(requires(Permission.ALERTS))]

Severity = Literal["critical", "major", "minor", "warning"]
State = Literal[
    "active_unacked", "active_acked", "cleared_unacked", "closed",
    "shelved", "suppressed", "out_of_service",
]  # fmt: skip


class AlertPage(Page):
    """One page of alerts, newest first."""

    items: list[AlertOut]


class AlertDetail(AlertOut):
    """An alert with every transition, oldest first."""

    events: list[AlertEventOut]


class IncidentOut(BaseModel):
    """A group of alerts raised together in one district (alert flood control)."""

    id: str
    district: str
    opened_at: datetime
    source: str
    alerts: int = Field(description="Member alerts, open or not.")
    open_alerts: int
    worst_severity: Severity | None


class IncidentDetail(IncidentOut):
    """An incident with its member alerts."""

    members: list[AlertOut]


class Versioned(BaseModel):
    """The version the caller saw, and an optional note."""

    version: int = Field(ge=1)
    note: str = Field(default="", max_length=2000)


class CommentIn(BaseModel):
    """A note on an alert."""

    version: int = Field(ge=1)
    note: str = Field(min_length=1, max_length=2000)


class AssignIn(Versioned):
    """Give the alert to a person."""

    assignee: str = Field(min_length=1, max_length=64)


class ShelveIn(BaseModel):
    """Hide an alert until a time, with a reason."""

    version: int = Field(ge=1)
    until: datetime = Field(description="With a time zone offset.")
    reason: str = Field(min_length=1, max_length=2000)


def _encode_cursor(row: dict[str, Any]) -> str:
    # The stored timestamp itself (microseconds), not a float that could round.
    key = [row["raised_at"].isoformat(), row["id"]]
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raised_at, alert_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(raised_at), str(alert_id)
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"cursor {cursor!r} is not one this API gave"
        ) from exc


def alert_out(ctx: ApiContext, alert: Alert, domain: str | None = None) -> AlertOut:
    """The API view of an alert, with its rule's name, domain and acknowledging role."""
    rule = ctx.rule(alert.rule_id)
    if domain is None and rule is not None and len(rule.subject.domains) == 1:
        domain = rule.subject.domains[0]
    return AlertOut.of(
        alert,
        rule_name=rule.name if rule else "",
        domain=domain,
        ack_role=rule.ack_role if rule else None,
    )


def _rules_of_domain(ctx: ApiContext, domain: str) -> list[str]:
    return [r.id for r in ctx.lifecycle.rules.values() if domain in r.subject.domains]


_TEXT_HELP = "Case-insensitive text in the message, rule id or subject."


@router.get("/alerts", responses=error_responses(401, 403, 422))
async def list_alerts(
    ctx: Context,
    _: View,
    *,
    state: Annotated[list[State] | None, Query(description="Any of these states.")] = None,
    severity: Annotated[list[Severity] | None, Query()] = None,
    domain: Annotated[Literal["traffic", "facility", "emergency"] | None, Query()] = None,
    district: Annotated[str | None, Query(max_length=64)] = None,
    open_only: Annotated[bool, Query(alias="open", description="Only alerts not closed.")] = False,
    text: Annotated[str | None, Query(max_length=200, description=_TEXT_HELP)] = None,
    incident: Annotated[str | None, Query(max_length=64)] = None,
    source: Literal["live", "replay", "drill"] = "live",
    run: Annotated[str | None, Query(max_length=64, description="A replay run id.")] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AlertPage:
    """Alerts, newest first, filtered; follow ``next_cursor`` for older ones."""
    after = _decode_cursor(cursor) if cursor else None
    params: dict[str, Any] = {
        "states": state,
        "severities": severity,
        "district": district,
        "domain": domain,
        "domain_rules": _rules_of_domain(ctx, domain) if domain else [],
        "open": open_only,
        "pattern": f"%{text}%" if text else None,
        "incident": incident,
        "source": source,
        "run": run,
        "c_at": after[0] if after else None,
        "c_id": after[1] if after else None,
        "limit": limit + 1,
    }
    query = """
        SELECT a.*, d.domain AS device_domain
        FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
        WHERE a.source = %(source)s
          AND (%(run)s::text IS NULL OR a.run_id = %(run)s)
          AND (NOT %(open)s OR a.state <> 'closed')
          AND (%(states)s::text[] IS NULL OR a.state = ANY(%(states)s))
          AND (%(severities)s::text[] IS NULL OR a.severity = ANY(%(severities)s))
          AND (%(district)s::text IS NULL OR a.district = %(district)s)
          AND (%(domain)s::text IS NULL OR d.domain = %(domain)s
               OR (d.domain IS NULL AND a.rule_id = ANY(%(domain_rules)s)))
          AND (%(pattern)s::text IS NULL OR a.message ILIKE %(pattern)s
               OR a.rule_id ILIKE %(pattern)s OR a.subject ILIKE %(pattern)s)
          AND (%(incident)s::text IS NULL OR a.incident_id = %(incident)s)
          AND (%(c_at)s::timestamptz IS NULL OR (a.raised_at, a.id) < (%(c_at)s, %(c_id)s))
        ORDER BY a.raised_at DESC, a.id DESC
        LIMIT %(limit)s
    """
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(query, params)
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return AlertPage(
        items=[alert_out(ctx, alert_from_row(r), r["device_domain"]) for r in rows],
        next_cursor=_encode_cursor(rows[-1]) if more and rows else None,
    )


async def _load(ctx: ApiContext, alert_id: str) -> Alert:
    alert = await ctx.alert_store.get(alert_id)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id!r}")
    return alert


async def _device_domain(ctx: ApiContext, device_id: str | None) -> str | None:
    if device_id is None:
        return None
    async with ctx.pool.connection() as conn:
        cur = await conn.execute("SELECT domain FROM devices WHERE id = %s", (device_id,))
        row = await cur.fetchone()
    return None if row is None else str(row["domain"])


@router.get("/alerts/{alert_id}", responses=error_responses(401, 403, 404))
async def get_alert(alert_id: str, ctx: Context, _: View) -> AlertDetail:
    """One alert with its history of transitions."""
    alert = await _load(ctx, alert_id)
    events = await ctx.alert_store.events(alert_id)
    base = alert_out(ctx, alert, await _device_domain(ctx, alert.device_id))
    return AlertDetail(
        **base.model_dump(), events=[AlertEventOut.model_validate(e) for e in events]
    )


ActionName = Literal["acknowledge", "comment", "assign", "shelve", "unshelve", "resolve"]


def _command(
    ctx: ApiContext, action: ActionName, alert_id: str, change: ActionInput
) -> Callable[[Actor], Awaitable[Alert]]:
    """The alert command for ``action`` (one table for REST and the websocket)."""
    c, v, note = ctx.commands, change.version, change.note
    calls: dict[ActionName, Callable[[Actor], Awaitable[Alert]]] = {
        "acknowledge": lambda by: c.acknowledge(alert_id, by=by, expected_version=v, note=note),
        "comment": lambda by: c.comment(alert_id, by=by, note=note, expected_version=v),
        "assign": lambda by: c.assign(
            alert_id, by=by, to=change.assignee, note=note, expected_version=v
        ),
        "shelve": lambda by: c.shelve(
            alert_id, by=by, until=change.until, reason=note, expected_version=v
        ),
        "unshelve": lambda by: c.unshelve(alert_id, by=by, expected_version=v),
        "resolve": lambda by: c.resolve(alert_id, by=by, note=note, expected_version=v),
    }
    return calls[action]


@dataclass(frozen=True, slots=True)
class ActionInput:
    """What an action carries: the version seen, a note (the reason of a shelve), and more."""

    version: int
    note: str = ""
    assignee: str = ""
    until: float = 0.0


async def run_action(
    ctx: ApiContext,
    caller: Principal,
    alert_id: str,
    action: ActionName,
    change: ActionInput,
    *,
    request_addr: str,
) -> AlertOut:
    """Run one alert command, audit it, and map the rules errors to HTTP statuses.

    Shared by the REST routes and the websocket's commands.
    """
    call = _command(ctx, action, alert_id, change)
    try:
        alert: Alert = await call(Actor(caller.name, caller.role))
    except AlertNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except VersionConflict as exc:
        current = await ctx.alert_store.get(alert_id)
        await ctx.audit.record(
            actor=caller.name, action=f"alert.{action}", target=alert_id, outcome="failed",
            remote_addr=request_addr, detail={"reason": "version conflict"},
        )  # fmt: skip
        raise ConflictError(str(exc), alert_out(ctx, current) if current else None) from exc
    except NotPermitted as exc:
        await ctx.audit.record(
            actor=caller.name, action=f"alert.{action}", target=alert_id, outcome="denied",
            remote_addr=request_addr, detail={"reason": str(exc)},
        )  # fmt: skip
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
    except ForbiddenTransition as exc:
        current = await ctx.alert_store.get(alert_id)
        raise ConflictError(str(exc), alert_out(ctx, current) if current else None) from exc
    await ctx.audit.record(
        actor=caller.name, action=f"alert.{action}", target=alert_id,
        remote_addr=request_addr, detail={"version": alert.version, "state": alert.state},
    )  # fmt: skip
    return alert_out(ctx, alert, await _device_domain(ctx, alert.device_id))


class ConflictError(HTTPException):
    """409 with the alert's current state in the body."""

    def __init__(self, message: str, current: AlertOut | None) -> None:
        super().__init__(status.HTTP_409_CONFLICT, message)
        self.current = current


_ACTION_RESPONSES = error_responses(401, 403, 404, 409, 422)


@router.post("/alerts/{alert_id}/acknowledge", responses=_ACTION_RESPONSES)
async def acknowledge(
    alert_id: str, body: Versioned, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Acknowledge, with an optional note."""
    change = ActionInput(body.version, body.note)
    return await run_action(
        ctx, caller, alert_id, "acknowledge", change, request_addr=client_address(request)
    )


@router.post("/alerts/{alert_id}/comment", responses=_ACTION_RESPONSES)
async def comment(
    alert_id: str, body: CommentIn, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Add a note to the alert's timeline."""
    change = ActionInput(body.version, body.note)
    return await run_action(
        ctx, caller, alert_id, "comment", change, request_addr=client_address(request)
    )


@router.post("/alerts/{alert_id}/assign", responses=_ACTION_RESPONSES)
async def assign(
    alert_id: str, body: AssignIn, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Give the alert to a person."""
    change = ActionInput(body.version, body.note, assignee=body.assignee)
    return await run_action(
        ctx, caller, alert_id, "assign", change, request_addr=client_address(request)
    )


@router.post("/alerts/{alert_id}/shelve", responses=_ACTION_RESPONSES)
async def shelve(
    alert_id: str, body: ShelveIn, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Hide the alert until a time, with a reason (audited)."""
    if body.until.tzinfo is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "until needs a time zone offset")
    change = ActionInput(body.version, body.reason, until=body.until.timestamp())
    return await run_action(
        ctx, caller, alert_id, "shelve", change, request_addr=client_address(request)
    )


@router.post("/alerts/{alert_id}/unshelve", responses=_ACTION_RESPONSES)
async def unshelve(
    alert_id: str, body: Versioned, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Show a shelved alert again."""
    change = ActionInput(body.version)
    return await run_action(
        ctx, caller, alert_id, "unshelve", change, request_addr=client_address(request)
    )


@router.post("/alerts/{alert_id}/resolve", responses=_ACTION_RESPONSES)
async def resolve(
    alert_id: str, body: Versioned, request: Request, ctx: Context, caller: Act
) -> AlertOut:
    """Close the alert by hand, where its rule allows it."""
    change = ActionInput(body.version, body.note)
    return await run_action(
        ctx, caller, alert_id, "resolve", change, request_addr=client_address(request)
    )


_INCIDENTS = """
    SELECT i.id, i.district, i.opened_at, i.source,
           count(a.id) AS alerts,
           count(a.id) FILTER (WHERE a.state <> 'closed') AS open_alerts,
           (array_agg(a.severity ORDER BY array_position(
               ARRAY['critical','major','minor','warning'], a.severity)))[1] AS worst_severity
    FROM incidents i LEFT JOIN alerts a ON a.incident_id = i.id
    WHERE (%(id)s::text IS NULL OR i.id = %(id)s)
    GROUP BY i.id
    HAVING %(id)s::text IS NOT NULL OR NOT %(open)s
        OR count(a.id) FILTER (WHERE a.state <> 'closed') > 0
    ORDER BY i.opened_at DESC
    LIMIT %(limit)s
"""


@router.get("/incidents", responses=error_responses(401, 403, 422))
async def list_incidents(
    ctx: Context,
    _: View,
    open_only: Annotated[bool, Query(alias="open")] = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[IncidentOut]:
    """Incidents, newest first; by default only those with open alerts."""
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(_INCIDENTS, {"id": None, "open": open_only, "limit": limit})
        rows = await cur.fetchall()
    return [IncidentOut.model_validate(r) for r in rows]


@router.get("/incidents/{incident_id}", responses=error_responses(401, 403, 404))
async def get_incident(incident_id: str, ctx: Context, _: View) -> IncidentDetail:
    """One incident with its member alerts."""
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(_INCIDENTS, {"id": incident_id, "open": False, "limit": 1})
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no incident {incident_id!r}")
        cur = await conn.execute(
            "SELECT a.*, d.domain AS device_domain FROM alerts a"
            " LEFT JOIN devices d ON d.id = a.device_id"
            " WHERE a.incident_id = %s ORDER BY a.raised_at",
            (incident_id,),
        )
        members = await cur.fetchall()
    return IncidentDetail(
        **IncidentOut.model_validate(row).model_dump(),
        members=[alert_out(ctx, alert_from_row(m), m["device_domain"]) for m in members],
    )
