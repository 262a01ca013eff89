"""CAP 1.2 export: one alert's document, and the feed of active public-safety alerts."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from control_api.auth import Principal
from control_api.cap import (
    ATOM_MEDIA_TYPE,
    CAP_MEDIA_TYPE,
    CapArea,
    CapFeedEntry,
    alert_to_cap,
    cap_feed,
    district_area,
)
from control_api.context import ApiContext
from control_api.deps import Context, requires
from control_api.errors import CapError
from control_api.roles import Permission
from control_api.schemas import error_responses
from rules import AlertEvent, alert_from_row

router = APIRouter(prefix="/api/v1", tags=["cap"])

View = Annotated[Principal, Depends(requires(Permission.VIEW))]
Language = Annotated[str, Query(pattern=r"^(en-US|ja-JP)$", description="CAP info language.")]


def _event(row: dict[str, Any]) -> AlertEvent:
    at = row["at"]
    return AlertEvent(
        alert_id=row["alert_id"],
        version=row["version"],
        action=row["action"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        actor=row["actor"],
        at=at.timestamp() if isinstance(at, datetime) else float(at),
        note=row["note"],
        notify=row["notify"],
    )


def _area(ctx: ApiContext, district: str) -> CapArea | None:
    if ctx.city is None or not district:
        return None
    try:
        return district_area(ctx.city, district)
    except CapError:
        return CapArea(district)


def _sender(ctx: ApiContext) -> str:
    return ctx.config.cap_sender


@router.get(
    "/alerts/{alert_id}/cap",
    response_class=Response,
    responses={
        200: {"content": {CAP_MEDIA_TYPE: {}}, "description": "A CAP 1.2 alert document"},
        **error_responses(401, 403, 404, 422),
    },
)
async def alert_cap(alert_id: str, ctx: Context, _: View, language: Language = "en-US") -> Response:
    """The alert at its current version as an OASIS CAP 1.2 document.

    A first raise is ``Alert``; later versions are ``Update`` referencing the
    first; a false alarm resolved by hand is ``Cancel``; replays and drills
    are ``Exercise``.
    """
    alert = await ctx.alert_store.get(alert_id)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id!r}")
    events = [_event(e) for e in await ctx.alert_store.events(alert_id)]
    body = alert_to_cap(
        alert,
        events=events,
        sender=_sender(ctx),
        area=_area(ctx, alert.district),
        rule=ctx.rule(alert.rule_id),
        tz=ZoneInfo(ctx.config.timezone),
        language=language,
    )
    return Response(body, media_type=CAP_MEDIA_TYPE)


@router.get(
    "/cap/feed",
    response_class=Response,
    responses={
        200: {"content": {ATOM_MEDIA_TYPE: {}}, "description": "Atom feed of CAP alerts"},
        **error_responses(401, 403, 422),
    },
)
async def public_feed(
    request: Request,
    ctx: Context,
    _: View,
    language: Language = "en-US",
    exercises: Annotated[bool, Query(description="Include replay and drill alerts.")] = False,
) -> Response:
    """Active public-safety alerts (and those closed in the last hour) as an Atom feed of CAP."""
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT * FROM alerts"
            " WHERE (state <> 'closed' OR closed_at > now() - interval '1 hour')"
            " AND (source = 'live' OR %s) ORDER BY updated_at DESC LIMIT 1000",
            (exercises,),
        )
        alerts = [alert_from_row(r) for r in await cur.fetchall()]
        ids = [a.id for a in alerts]
        cur = await conn.execute(
            "SELECT * FROM alert_events WHERE alert_id = ANY(%s) ORDER BY alert_id, version",
            (ids,),
        )
        by_alert: dict[str, list[AlertEvent]] = {}
        for row in await cur.fetchall():
            by_alert.setdefault(row["alert_id"], []).append(_event(row))
    base = str(request.url_for("public_feed"))
    entries = [
        CapFeedEntry(
            alert=a,
            rule=ctx.rule(a.rule_id),
            area=_area(ctx, a.district),
            events=tuple(by_alert.get(a.id, ())),
            link=str(request.url_for("alert_cap", alert_id=a.id)),
        )
        for a in alerts
    ]
    body = cap_feed(
        entries,
        sender=_sender(ctx),
        feed_url=base,
        updated=time.time(),
        tz=ZoneInfo(ctx.config.timezone),
        language=language,
        exercises=exercises,
    )
    return Response(body, media_type=ATOM_MEDIA_TYPE)
