"""History: a series or a group over a time range, bucketed so a chart stays small; CSV export."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from control_api.auth import Principal
from control_api.context import ApiContext
from control_api.deps import Context, requires
from control_api.history import (
    Bucket,
    GroupSelector,
    SeriesKey,
    SeriesRef,
    group_history,
    series_history,
    stream_csv,
)
from control_api.roles import Permission
from control_api.schemas import error_responses

router = APIRouter(prefix="/api/v1", tags=["history"])

View = Annotated[Principal, Depends(requires(Permission.VIEW))]
Start = Annotated[datetime, Query(description="Inclusive, with a UTC offset.")]
End = Annotated[datetime, Query(description="Exclusive, with a UTC offset.")]
BucketParam = Annotated[
    Literal["raw", "1m", "15m", "1h", "1d"] | None,
    Query(description="Force a resolution; by default one is chosen (≤ ~2,000 points)."),
]
Run = Annotated[str | None, Query(max_length=63, description="Read a replay run's sandbox.")]
_RESPONSES = error_responses(401, 403, 404, 422, 503)


class Point(BaseModel):
    """One point: a raw reading (``ts`` and ``value`` or ``state``) or a bucket."""

    ts: datetime = Field(description="The reading's time, or the bucket's start.")
    value: float | None = None
    state: str | None = None
    readings: int | None = Field(default=None, description="Readings in the bucket.")
    min: float | None = None
    max: float | None = None
    avg: float | None = None
    devices: int | None = Field(default=None, description="Group buckets: devices that reported.")


class SeriesHistoryOut(BaseModel):
    """A series over a range at the resolution served."""

    series_id: int
    device_id: str
    channel: str
    unit: str | None
    kind: Literal["numeric", "state"]
    bucket: Literal["raw", "1m", "15m", "1h", "1d"]
    start: datetime
    end: datetime
    run_id: str | None
    points: list[Point]


class GroupHistoryOut(BaseModel):
    """A channel aggregated over a group of devices."""

    channel: str
    domain: str | None
    district: str | None
    kind: str | None
    bucket: Literal["raw", "1m", "15m", "1h", "1d"]
    start: datetime
    end: datetime
    run_id: str | None
    devices: int
    points: list[Point]


def _point(p: Any) -> Point:
    fields = p._asdict()
    fields["ts"] = fields.pop("ts", None) or fields.pop("start")
    return Point(**fields)


async def _series(
    ctx: ApiContext, ref: SeriesRef, start: datetime, end: datetime, *, bucket: str | None,
    run: str | None,
) -> SeriesHistoryOut:  # fmt: skip
    async with ctx.pool.connection() as conn:
        h = await series_history(
            conn, ref, start, end, Bucket(bucket) if bucket else None, run_id=run
        )
    return SeriesHistoryOut(
        series_id=h.series_id, device_id=h.device_id, channel=h.channel, unit=h.unit,
        kind=h.kind, bucket=h.bucket.value, start=h.start, end=h.end, run_id=h.run_id,
        points=[_point(p) for p in h.points],
    )  # fmt: skip


@router.get("/series/{series_id}/history", responses=_RESPONSES)
async def history_by_id(
    series_id: int, start: Start, end: End, ctx: Context, _: View, *,
    bucket: BucketParam = None, run: Run = None,
) -> SeriesHistoryOut:  # fmt: skip
    """One series over ``[start, end)``: raw when short, else min/max/avg per bucket."""
    return await _series(ctx, series_id, start, end, bucket=bucket, run=run)


@router.get("/devices/{device_id}/series/{channel}/history", responses=_RESPONSES)
async def history_by_name(
    device_id: str, channel: str, start: Start, end: End, ctx: Context, _: View, *,
    bucket: BucketParam = None, run: Run = None,
) -> SeriesHistoryOut:  # fmt: skip
    """One series, named by device and channel."""
    return await _series(ctx, SeriesKey(device_id, channel), start, end, bucket=bucket, run=run)


@router.get("/history/group", responses=_RESPONSES)
async def history_of_group(
    channel: Annotated[str, Query(min_length=1, max_length=64)],
    start: Start, end: End, ctx: Context, _: View, *,
    domain: Literal["traffic", "facility", "emergency"] | None = None,
    district: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    bucket: BucketParam = None, run: Run = None,
) -> GroupHistoryOut:  # fmt: skip
    """A channel over a district, domain or kind: per bucket avg/min/max and reporting devices."""
    async with ctx.pool.connection() as conn:
        h = await group_history(
            conn, channel=channel, domain=domain, district=district, kind=kind, start=start,
            end=end, bucket=Bucket(bucket) if bucket else None, run_id=run,
        )  # fmt: skip
    return GroupHistoryOut(
        channel=channel, domain=domain, district=district, kind=kind, bucket=h.bucket.value,
        start=h.start, end=h.end, run_id=h.run_id, devices=h.devices,
        points=[_point(p) for p in h.points],
    )  # fmt: skip


async def _csv_response(
    ctx: ApiContext, source: SeriesRef | GroupSelector, start: datetime, end: datetime, *,
    bucket: str | None, run: str | None, filename: str,
) -> StreamingResponse:  # fmt: skip
    """Borrow a connection for the whole export; errors before the first byte keep their status."""
    stack = contextlib.AsyncExitStack()
    conn = await stack.enter_async_context(ctx.pool.connection())
    try:
        chunks = stream_csv(
            conn, source, start, end, Bucket(bucket) if bucket else None, run_id=run
        )
        await stack.enter_async_context(contextlib.aclosing(chunks))
        header = await anext(chunks)
    except BaseException:
        await stack.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        async with stack:
            yield header
            async for chunk in chunks:
                yield chunk

    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


_CSV_RESPONSES = {
    200: {"content": {"text/csv": {}}, "description": "CSV, streamed"},
    **_RESPONSES,
}


@router.get("/series/{series_id}/history.csv", response_class=StreamingResponse,
            responses=_CSV_RESPONSES)  # fmt: skip
async def export_series(
    series_id: int, start: Start, end: End, ctx: Context, _: View, *,
    bucket: BucketParam = None, run: Run = None,
) -> StreamingResponse:  # fmt: skip
    """Export one series as CSV (raw readings unless a bucket is given), streamed."""
    return await _csv_response(
        ctx, series_id, start, end, bucket=bucket, run=run, filename=f"series-{series_id}.csv"
    )


@router.get("/history/group.csv", response_class=StreamingResponse, responses=_CSV_RESPONSES)
async def export_group(
    channel: Annotated[str, Query(min_length=1, max_length=64)],
    start: Start, end: End, ctx: Context, _: View, *,
    domain: Literal["traffic", "facility", "emergency"] | None = None,
    district: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    bucket: BucketParam = None, run: Run = None,
) -> StreamingResponse:  # fmt: skip
    """Export a group aggregate as CSV, streamed."""
    selector = GroupSelector(channel=channel, domain=domain, district=district, kind=kind)
    return await _csv_response(
        ctx, selector, start, end, bucket=bucket, run=run, filename=f"{channel}.csv"
    )
