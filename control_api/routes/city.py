"""The city the console draws: districts with their polygons, devices with positions.

The city model (``ApiConfig.city``) is the register of what is installed
where. At start-up the API writes each model device's kind, name and position
into ``devices`` where those are still empty (a device that has reported
keeps its identity; a device that has not yet reported shows as "unknown").
Rules that select by ``kind`` and the map both rely on it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel

from control_api.auth import Pool, Principal
from control_api.deps import Context, requires
from control_api.roles import Permission
from control_api.schemas import error_responses

router = APIRouter(prefix="/api/v1", tags=["city"])
log = logging.getLogger(__name__)
_DEADLOCK_RETRIES = 3

View = Annotated[Principal, Depends(requires(Permission.VIEW))]


class DistrictOut(BaseModel):
    """A district and its outline, ``[lat, lon]`` pairs."""

    name: str
    label: str
    use: str
    polygon: list[tuple[float, float]]


class CityOut(BaseModel):
    """The city model's map: districts, the bounding box, the time zone offset."""

    name: str
    label: str
    utc_offset_h: float
    timezone: str
    """The IANA zone the console shows times in (``Asia/Tokyo`` by default)."""
    bounds: tuple[float, float, float, float]
    """South, west, north, east."""
    districts: list[DistrictOut]
    devices: int


@router.get("/city", responses=error_responses(401, 403, 404))
async def city(ctx: Context, _: View) -> CityOut:
    """The configured city model (device positions come with ``/devices`` and the snapshot)."""
    model = ctx.city
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no city model is configured")
    lats = [p[0] for d in model.districts for p in d.polygon]
    lons = [p[1] for d in model.districts for p in d.polygon]
    return CityOut(
        name=model.name,
        label=model.label,
        utc_offset_h=model.utc_offset_h,
        timezone=ctx.config.timezone,
        bounds=(min(lats), min(lons), max(lats), max(lons)),
        districts=[
            DistrictOut(name=d.name, label=d.label, use=d.use, polygon=list(d.polygon))
            for d in model.districts
        ],
        devices=len(model.devices),
    )


async def register_city_devices(pool: Pool, model: Any) -> int:
    """Fill kind, name and position of the model's devices; returns rows inserted or filled."""
    rows = [
        (d.id, d.domain, d.district, d.kind, f"{d.kind} {d.id}", d.lat, d.lon, d.period_s)
        for d in model.devices
    ]
    rows.sort()  # one lock order for every writer of these rows
    for attempt in range(_DEADLOCK_RETRIES):
        try:
            return await _upsert_devices(pool, rows)
        except psycopg.errors.DeadlockDetected:
            # The ingester writes presence and staleness to the same rows meanwhile.
            log.warning("device registration deadlocked (attempt %d): retrying", attempt + 1)
    return await _upsert_devices(pool, rows)


async def _upsert_devices(pool: Pool, rows: list[tuple[Any, ...]]) -> int:
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO devices (id, domain, district, kind, name, lat, lon, expected_period_s)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET"
            " kind = coalesce(devices.kind, EXCLUDED.kind),"
            " name = coalesce(devices.name, EXCLUDED.name),"
            " lat = coalesce(devices.lat, EXCLUDED.lat),"
            " lon = coalesce(devices.lon, EXCLUDED.lon)"
            " WHERE devices.kind IS NULL OR devices.lat IS NULL OR devices.name IS NULL",
            rows,
        )
        return len(rows)
