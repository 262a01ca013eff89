"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (can serve), ``/metrics``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from cityops.db import available_migrations
from control_api.auth import Principal
from control_api.deps import Context, requires
from control_api.roles import Permission
from control_api.schemas import error_responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    """Liveness."""

    status: str


class Readiness(BaseModel):
    """Whether each dependency is usable; 503 when any is not."""

    ready: bool
    database: bool
    migrations_current: bool
    broker: bool
    detail: list[str]


@router.get("/healthz")
async def healthz() -> Health:
    """The process is alive (no dependency is checked)."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(ctx: Context, response: Response) -> Readiness:
    """Database reachable with current migrations, and the broker connected."""
    detail: list[str] = []
    database = migrations = False
    try:
        async with ctx.pool.connection(timeout=ctx.config.db_timeout_s) as conn:
            cur = await conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_migrations")
            row = await cur.fetchone()
        database = True
        want = max(m.version for m in available_migrations())
        have = int(row["v"]) if row else 0
        migrations = have >= want
        if not migrations:
            detail.append(f"database schema is at {have}, this version needs {want}")
    except Exception as exc:
        detail.append(f"database: {exc}")
    broker = ctx.broker_connected or not ctx.config.live_from_broker
    if not broker:
        detail.append("broker: not connected")
    ready = database and migrations and broker
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(
        ready=ready, database=database, migrations_current=migrations, broker=broker, detail=detail
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401, 403)},
)
async def metrics(_: Annotated[Principal, Depends(requires(Permission.VIEW))]) -> Response:
    """Prometheus metrics (scrape with a bearer token)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
