"""Devices and their series: list with filters, detail, latest values, out of service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from control_api.auth import Principal
from control_api.context import ApiContext
from control_api.deps import Context, client_address, requires
from control_api.roles import Permission
from control_api.schemas import Page, error_responses
from rules import Actor, AlertStoreError, LifecycleError, alert_from_row

router = APIRouter(prefix="/api/v1", tags=["devices"])

View = Annotated[Principal, Depends(requires(Permission.VIEW))]
Admin = Annotated[Principal, Depends(requires(Permission.ADMIN))]
PresenceFilter = Literal["online", "offline", "stale", "unknown"]


class DeviceOut(BaseModel):
    """A device as the list shows it."""

    id: str
    domain: str
    district: str
    kind: str | None
    name: str | None
    lat: float | None
    lon: float | None
    presence: Literal["online", "offline", "unknown"]
    stale_since: datetime | None
    out_of_service: bool
    last_seen: datetime | None
    expected_period_s: float | None


class LatestValue(BaseModel):
    """The newest reading of one series."""

    series_id: int
    channel: str
    unit: str | None
    ts: datetime | None
    value: float | None
    state: str | None


class DeviceDetail(DeviceOut):
    """A device with its series and their newest readings."""

    first_seen: datetime
    metadata: dict[str, Any]
    presence_changed_at: datetime | None
    series: list[LatestValue]


class DevicePage(Page):
    """One page of devices, by id."""

    items: list[DeviceOut]


class ServiceIn(BaseModel):
    """Why the device goes out of (or back into) service."""

    note: str = Field(default="", max_length=2000)


_COLUMNS = (
    "d.id, d.domain, d.district, d.kind, d.name, d.lat, d.lon, d.presence, d.stale_since,"
    " d.out_of_service, d.last_seen, d.expected_period_s"
)

_LATEST = """
    SELECT s.id AS series_id, s.channel, s.unit, r.ts, r.value, r.state
    FROM series s
    LEFT JOIN LATERAL (
        SELECT ts, value, state FROM readings
        WHERE series_id = s.id ORDER BY ts DESC LIMIT 1
    ) r ON true
    WHERE s.device_id = %s
    ORDER BY s.channel
"""


@router.get("/devices", responses=error_responses(401, 403, 422))
async def list_devices(
    ctx: Context,
    _: View,
    *,
    domain: Literal["traffic", "facility", "emergency"] | None = None,
    district: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    presence: PresenceFilter | None = None,
    cursor: Annotated[str | None, Query(max_length=200, description="The last id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> DevicePage:
    """Devices by id, filtered; ``presence=stale`` means reporting late, whatever the status."""
    query = f"""
        SELECT {_COLUMNS} FROM devices d
        WHERE (%(domain)s::text IS NULL OR d.domain = %(domain)s)
          AND (%(district)s::text IS NULL OR d.district = %(district)s)
          AND (%(kind)s::text IS NULL OR d.kind = %(kind)s)
          AND (%(presence)s::text IS NULL
               OR (%(presence)s = 'stale' AND d.stale_since IS NOT NULL)
               OR (%(presence)s <> 'stale' AND d.presence = %(presence)s))
          AND (%(cursor)s::text IS NULL OR d.id > %(cursor)s)
        ORDER BY d.id LIMIT %(limit)s
    """
    params = {
        "domain": domain,
        "district": district,
        "kind": kind,
        "presence": presence,
        "cursor": cursor,
        "limit": limit + 1,
    }
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return DevicePage(
        items=[DeviceOut.model_validate(r) for r in rows],
        next_cursor=rows[-1]["id"] if more and rows else None,
    )


async def _device(ctx: ApiContext, device_id: str) -> dict[str, Any]:
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT {_COLUMNS}, d.first_seen, d.metadata, d.presence_changed_at"
            " FROM devices d WHERE d.id = %s",
            (device_id,),
        )
        row: dict[str, Any] | None = await cur.fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return row


@router.get("/devices/{device_id}", responses=error_responses(401, 403, 404))
async def get_device(device_id: str, ctx: Context, _: View) -> DeviceDetail:
    """One device with its series and their newest readings."""
    row = await _device(ctx, device_id)
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(_LATEST, (device_id,))
        series = await cur.fetchall()
    return DeviceDetail(**row, series=[LatestValue.model_validate(s) for s in series])


@router.get("/devices/{device_id}/latest", responses=error_responses(401, 403, 404))
async def latest_values(device_id: str, ctx: Context, _: View) -> list[LatestValue]:
    """The newest reading of each of the device's series."""
    await _device(ctx, device_id)
    async with ctx.pool.connection() as conn:
        cur = await conn.execute(_LATEST, (device_id,))
        return [LatestValue.model_validate(s) for s in await cur.fetchall()]


async def _set_service(
    ctx: ApiContext, caller: Principal, device_id: str, *, out: bool, note: str, addr: str
) -> DeviceOut:
    await _device(ctx, device_id)
    async with ctx.pool.connection() as conn:
        await conn.execute("UPDATE devices SET out_of_service = %s WHERE id = %s", (out, device_id))
        cur = await conn.execute(
            "SELECT * FROM alerts WHERE device_id = %s AND state <> 'closed'", (device_id,)
        )
        open_alerts = [alert_from_row(r) for r in await cur.fetchall()]
    by = Actor(caller.name, caller.role)
    moved = []
    for alert in open_alerts:
        try:
            if out and alert.state != "out_of_service":
                await ctx.commands.put_out_of_service(
                    alert.id, by=by, note=note, expected_version=alert.version
                )
            elif not out and alert.state == "out_of_service":
                await ctx.commands.return_to_service(
                    alert.id, by=by, note=note, expected_version=alert.version
                )
            else:
                continue
            moved.append(alert.id)
        except (LifecycleError, AlertStoreError) as exc:
            # An alert that cannot move (e.g. changed meanwhile) keeps its state;
            # the device flag is what matters for new alerts.
            moved.append(f"{alert.id}: {exc}")
    await ctx.audit.record(
        actor=caller.name,
        action="device.out_of_service" if out else "device.return_to_service",
        target=device_id,
        remote_addr=addr,
        detail={"note": note, "alerts": moved},
    )
    return DeviceOut.model_validate(await _device(ctx, device_id))


@router.post("/devices/{device_id}/out-of-service", responses=error_responses(401, 403, 404, 422))
async def put_out_of_service(
    device_id: str, body: ServiceIn, request: Request, ctx: Context, caller: Admin
) -> DeviceOut:
    """Put a device under maintenance: its open alerts go out of service too."""
    return await _set_service(
        ctx, caller, device_id, out=True, note=body.note, addr=client_address(request)
    )


@router.post(
    "/devices/{device_id}/return-to-service", responses=error_responses(401, 403, 404, 422)
)
async def return_to_service(
    device_id: str, body: ServiceIn, request: Request, ctx: Context, caller: Admin
) -> DeviceOut:
    """Maintenance is over: the device's alerts count again."""
    return await _set_service(
        ctx, caller, device_id, out=False, note=body.note, addr=client_address(request)
    )
