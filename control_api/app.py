"""The FastAPI application: one lifespan composes the process.

Start-up, in order: the database pool (waits until it can connect), the rules
(for acknowledging roles and names), the alert store and commands, the live
hub and its feed from the broker; shutdown in reverse. Every error leaves as
``{"error": {"code", "message"}}`` with the status the route documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter, Histogram
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from control_api.audit import AuditLog
from control_api.auth import AuthStore, Pool
from control_api.context import ApiConfig, ApiContext
from control_api.errors import ControlApiError, HistoryUnavailable, InvalidRange, SeriesNotFound
from control_api.feed import BrokerFeed, run_staleness_feed
from control_api.jobs import jobs_lifespan
from control_api.live import LiveHub
from control_api.live_ws import SharedSnapshots, run_kpi_feed
from control_api.routes import admin, alerts, auth, cap, city, devices, health, history, live, ops
from control_api.routes.alerts import ConflictError
from control_api.routes.city import register_city_devices
from control_api.snapshot import Kpis, Snapshot, build_snapshot, query_kpis
from ingest import BatchSource
from rules import (
    AlertCommands,
    AlertLifecycle,
    AlertPublisher,
    AlertStore,
    AlertStoreError,
    FanOutPublisher,
    MqttAlertPublisher,
    RuleSet,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "cityops_api_requests_total", "HTTP requests by route and status", ["route", "status"]
)
HTTP_LATENCY = Histogram(
    "cityops_api_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


class _SystemClock:
    def now(self) -> float:
        return time.time()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    code = _CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    body: dict[str, Any] = {"code": code, "message": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": body}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        extra: dict[str, Any] = {}
        if isinstance(exc, ConflictError):
            extra["code"] = "version_conflict" if "version" in exc.detail else "conflict"
            extra["current"] = exc.current.model_dump(mode="json") if exc.current else None
        response = _error(exc.status_code, str(exc.detail), **extra)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, f"{where}: {first['msg']}", errors=errors)

    @app.exception_handler(InvalidRange)
    async def invalid_range(_: Request, exc: InvalidRange) -> Response:
        return _error(422, str(exc))

    @app.exception_handler(SeriesNotFound)
    async def series_not_found(_: Request, exc: SeriesNotFound) -> Response:
        return _error(404, str(exc))

    @app.exception_handler(HistoryUnavailable)
    async def history_unavailable(_: Request, exc: HistoryUnavailable) -> Response:
        return _error(503, str(exc))

    @app.exception_handler(ControlApiError)
    async def api_error(_: Request, exc: ControlApiError) -> Response:
        return _error(422, str(exc))

    @app.exception_handler(AlertStoreError)
    async def store_error(_: Request, exc: AlertStoreError) -> Response:
        return _error(503, str(exc))

    @app.exception_handler(psycopg.DataError)
    async def data_error(_: Request, exc: psycopg.DataError) -> Response:
        # Input the database cannot hold (a NUL byte in a text, a number out of range).
        return _error(422, f"invalid input: {exc.diag.message_primary or exc}")

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(_: Request, exc: PoolTimeout) -> Response:
        return _error(503, f"database unavailable: {exc}")


def _install_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        HTTP_LATENCY.labels(name).observe(time.perf_counter() - started)
        HTTP_REQUESTS.labels(name, str(response.status_code)).inc()
        return response


def _load_city(name: str) -> Any:
    """The city model for district areas; without it CAP areas carry names only."""
    from simulators import CityModelError, load_city  # noqa: PLC0415 (optional at run time)

    try:
        return load_city(name)
    except CityModelError as exc:
        log.warning("city model %r not loaded (%s): CAP areas will carry names only", name, exc)
        return None


@contextlib.asynccontextmanager
async def open_pool(config: ApiConfig) -> AsyncIterator[Pool]:
    """The connection pool, open and proven usable."""
    pool: Pool = AsyncConnectionPool(
        config.database_url,
        min_size=config.pool_min_size,
        max_size=config.pool_max_size,
        kwargs={"row_factory": dict_row, "autocommit": True},
        connection_class=AsyncConnection[dict[str, Any]],
        timeout=config.db_timeout_s,
        open=False,
        name="cityops-api",
    )
    await pool.open(wait=True, timeout=config.db_timeout_s)
    try:
        yield pool
    finally:
        await pool.close()


def _snapshot_reader(pool: Pool, source: BatchSource) -> Callable[[], Awaitable[Snapshot]]:
    async def read() -> Snapshot:
        async with pool.connection() as conn:
            return await build_snapshot(conn, source=source)

    return read


def _kpi_reader(pool: Pool) -> Callable[[], Awaitable[Kpis]]:
    async def read() -> Kpis:
        async with pool.connection() as conn:
            return await query_kpis(conn)

    return read


@contextlib.asynccontextmanager
async def _live(ctx: ApiContext, *, own_feed: bool) -> AsyncIterator[None]:
    """The hub's background feeds, in a task group that ends with the process."""
    config = ctx.config
    ctx.snapshots = {
        source: SharedSnapshots(_snapshot_reader(ctx.pool, source))
        for source in ("live", "replay", "drill")
    }

    def connection(up: bool) -> None:
        ctx.broker_connected = up

    async with asyncio.TaskGroup() as tasks:
        feeds = [
            tasks.create_task(run_kpi_feed(ctx.hub, _kpi_reader(ctx.pool))),
            tasks.create_task(run_staleness_feed(ctx.pool, ctx.hub)),
        ]
        if own_feed:
            feed = BrokerFeed(
                config.mqtt, hub=ctx.hub, client_id=f"{config.client_id}-live",
                on_connection=connection,
            )  # fmt: skip
            feeds.append(tasks.create_task(feed.run()))
        try:
            yield
        finally:
            for task in feeds:
                task.cancel()


def create_app(
    config: ApiConfig,
    *,
    publisher: AlertPublisher | None = None,
    hub: LiveHub | None = None,
    extra_lifespan: Callable[[ApiContext], contextlib.AbstractAsyncContextManager[None]]
    | None = None,
) -> FastAPI:
    """The control API for ``config``.

    Args:
        config: Where the database, broker and rules are.
        publisher: Where alert events go (default: the broker, ``cityops/alerts/{id}``);
            the live hub always gets them too.
        hub: A live hub fed by the caller (``cityops up`` feeds it from the ingest
            pipeline in process); by default the API makes one and feeds it from
            the broker when ``config.live_from_broker``.
        extra_lifespan: Runs inside the lifespan with the built context.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(open_pool(config))
            rule_set = RuleSet.load(config.rules_path)
            lifecycle = AlertLifecycle(rule_set.rules, clock=_SystemClock())
            store = AlertStore(pool=pool, connect_timeout_s=config.db_timeout_s)
            pub = publisher
            if pub is None:
                mqtt_pub = MqttAlertPublisher(config.mqtt, client_id=f"{config.client_id}-alerts")
                stack.push_async_callback(mqtt_pub.close)
                pub = mqtt_pub
            live_hub = hub if hub is not None else LiveHub()
            if hub is not None or not config.live_from_broker:
                # No broker feed brings this API's own events back: hand them over here.
                pub = FanOutPublisher(pub, live_hub)
            ctx = ApiContext(
                config=config,
                pool=pool,
                auth=AuthStore(pool, policy=config.login),
                audit=AuditLog(pool),
                alert_store=store,
                lifecycle=lifecycle,
                commands=AlertCommands(store=store, lifecycle=lifecycle, publisher=pub),
                rule_set=rule_set,
                hub=live_hub,
            )
            ctx.city = _load_city(config.city) if config.city else None
            if ctx.city is not None:
                registered = await register_city_devices(pool, ctx.city)
                log.info("city %s: %d devices registered", ctx.city.name, registered)
            app.state.ctx = ctx
            await stack.enter_async_context(
                jobs_lifespan(ctx, recordings_dir=config.recordings_dir)
            )
            await stack.enter_async_context(
                _live(ctx, own_feed=hub is None and config.live_from_broker)
            )
            if extra_lifespan is not None:
                await stack.enter_async_context(extra_lifespan(ctx))
            log.info("control API ready (database pool %d..%d)", config.pool_min_size,
                     config.pool_max_size)  # fmt: skip
            yield

    app = FastAPI(
        title="cityops control API",
        version="1",
        description=(
            "The one door into cityops: devices, history, alerts and their lifecycle, "
            "replays and rules, CAP 1.2 export, and the live websocket `/api/v1/live`. "
            "Authenticate with the session cookie from `POST /api/v1/auth/login` (plus its "
            "CSRF token on changes) or an API token (`Authorization: Bearer …`)."
        ),
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    _install_metrics(app)
    for module in (health, auth, city, alerts, devices, history, cap, ops, admin, live):
        app.include_router(module.router)
    if config.console_dir is not None:
        # The console's static build at / (after the API routes, which take precedence).
        app.mount("/", StaticFiles(directory=config.console_dir, html=True), name="console")
    return app
