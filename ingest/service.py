"""The ingest service: broker client, pipeline and metrics, composed.

Start-up order: database reachable → pipeline writer running → broker
connected and subscribed. Shutdown in reverse: stop reading, flush and commit
what is held, acknowledge it, disconnect (the session stays on the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from prometheus_client import start_http_server

from cityops.settings import MqttEndpoint
from ingest.batch import BatchSink
from ingest.decode import DecodeLimits
from ingest.metrics import IngestMetrics
from ingest.mqtt import InboundMessage, ManualAckClient, MqttOptions
from ingest.pipeline import (
    REPLAY_PREFIX,
    BatchStore,
    DiscardingStore,
    IngestPipeline,
    PipelineOptions,
)
from ingest.presence import StalenessMonitor, StalenessOptions, StalenessService
from ingest.store import ReadingStore, StoreOptions

if TYPE_CHECKING:
    from rules.service import AlertService

log = logging.getLogger(__name__)

READINGS_FILTER = "city/#"
REPLAY_FILTER = "cityops/replay/#"
DRILL_PROPERTY = "cityops-drill"
"""MQTT 5 user property of a replay into the live namespace (``cityops replay --live``)."""


@dataclass(slots=True)
class _SharedSource:
    """One pipeline's view of the shared client: reading pauses while any pipeline asks."""

    client: ManualAckClient
    holds: set[str]
    name: str

    def ack(self, generation: int, mid: int) -> bool:
        return self.client.ack(generation, mid)

    def pause_reading(self) -> None:
        self.holds.add(self.name)
        self.client.pause_reading()

    def resume_reading(self) -> None:
        self.holds.discard(self.name)
        if not self.holds:
            self.client.resume_reading()


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Everything the ingest service needs, typed."""

    mqtt: MqttEndpoint
    database_url: str
    client_id: str = "cityops-ingest"
    shared_group: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    mqtt_options: MqttOptions | None = None
    store: StoreOptions = field(default_factory=StoreOptions)
    staleness: StalenessOptions = field(default_factory=StalenessOptions)
    shutdown_timeout_s: float = 30.0
    replay: bool = True
    """Also store replayed traffic (``cityops/replay/#``) in the replay sandbox."""
    rules_path: Path | None = None
    """Evaluate these rules on the decoded stream (None: no rules engine)."""
    store_readings: bool = True
    """False for the rules service: decode and evaluate, leave storage to the ingesters."""
    track_staleness: bool = True
    """Track device staleness; only a process that sees every message can (not a
    member of a shared subscription)."""

    @property
    def subscriptions(self) -> list[str]:
        """Topic filters, through an MQTT 5 shared subscription when scaled out."""
        filters = [READINGS_FILTER, REPLAY_FILTER] if self.replay else [READINGS_FILTER]
        if self.shared_group:
            return [f"$share/{self.shared_group}/{f}" for f in filters]
        return filters


class IngestService:
    """A running ingester; use ``async with IngestService(config) as svc``."""

    def __init__(self, config: IngestConfig, *, sinks: tuple[BatchSink, ...] = ()) -> None:
        self.config = config
        self.metrics = IngestMetrics()
        self.store: BatchStore = self._store_for(sandbox=False)
        self.staleness = StalenessMonitor(options=config.staleness, metrics=self.metrics)
        self._staleness_service = StalenessService(self.staleness, config.database_url)
        self._staleness_task: asyncio.Task[None] | None = None
        self.pipeline = IngestPipeline(
            store=self.store,
            options=config.pipeline,
            limits=config.limits,
            metrics=self.metrics,
            sinks=(self.staleness, *sinks) if config.track_staleness else sinks,
        )
        self.replay_pipeline = IngestPipeline(
            store=self._store_for(sandbox=True),
            options=config.pipeline,
            limits=config.limits,
            metrics=IngestMetrics(registry=self.metrics.registry, prefix="cityops_replay_"),
            sinks=sinks,
        )
        # A drill (a replay into the live namespace) is stored in the live
        # tables, but reaches the sinks marked as a drill: it never pages.
        self.drill_pipeline = IngestPipeline(
            store=self._store_for(sandbox=False),
            options=config.pipeline,
            limits=config.limits,
            metrics=IngestMetrics(registry=self.metrics.registry, prefix="cityops_drill_"),
            sinks=sinks,
            drill=True,
        )
        self.client: ManualAckClient | None = None
        self._writers: list[asyncio.Task[None]] = []
        self.alerts: AlertService | None = None
        self._alerts_task: asyncio.Task[None] | None = None
        if config.rules_path is not None:
            # Imported here: rules builds on ingest, not the other way round.
            from rules.loader import RuleSet  # noqa: PLC0415
            from rules.service import AlertService, MqttAlertPublisher  # noqa: PLC0415
            from rules.store import AlertStore  # noqa: PLC0415

            self.alerts = AlertService(
                RuleSet.load(config.rules_path),
                store=AlertStore(config.database_url),
                publisher=MqttAlertPublisher(config.mqtt, client_id=f"{config.client_id}-alerts"),
                database_url=config.database_url,
            )
            for pipeline in self._pipelines:
                pipeline.add_decoded_sink(self.alerts)

    def _store_for(self, *, sandbox: bool) -> BatchStore:
        cfg = self.config
        if not cfg.store_readings:
            return DiscardingStore(sandbox=sandbox)
        return ReadingStore(cfg.database_url, cfg.store, sandbox=sandbox)

    @property
    def _pipelines(self) -> tuple[IngestPipeline, ...]:
        return (self.pipeline, self.replay_pipeline, self.drill_pipeline)

    async def __aenter__(self) -> IngestService:
        cfg = self.config
        if cfg.metrics_port is not None:
            start_http_server(
                cfg.metrics_port, addr=cfg.metrics_host, registry=self.metrics.registry
            )
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)
        if cfg.track_staleness:
            try:
                restored = await self._staleness_service.restore()
                log.info("last reports of %d known devices restored", restored)
            except psycopg.Error as exc:
                # Ingest must start even when the database is down: it holds batches.
                log.warning("device staleness starts empty: %s", exc)
            self._staleness_task = asyncio.create_task(
                self._staleness_service.run(), name="ingest-staleness"
            )
        if self.alerts is not None:
            try:
                await self.alerts.start()
            except Exception as exc:
                log.warning("rules start without history: %s", exc)
            self._alerts_task = asyncio.create_task(self.alerts.run(), name="alerts")
        self._writers = [
            asyncio.create_task(self.pipeline.run(), name="ingest-writer"),
            asyncio.create_task(self.replay_pipeline.run(), name="ingest-replay-writer"),
            asyncio.create_task(self.drill_pipeline.run(), name="ingest-drill-writer"),
        ]
        live = self.pipeline.on_message
        replay = self.replay_pipeline.on_message
        drill = self.drill_pipeline.on_message

        def route(msg: InboundMessage) -> None:
            if msg.topic.startswith(REPLAY_PREFIX):
                replay(msg)
            elif msg.user_properties and any(k == DRILL_PROPERTY for k, _ in msg.user_properties):
                drill(msg)
            else:
                live(msg)

        options = cfg.mqtt_options or MqttOptions(client_id=cfg.client_id)
        self.client = ManualAckClient(
            cfg.mqtt,
            options,
            subscriptions=cfg.subscriptions,
            on_message=route,
            on_connection_change=lambda up: self.metrics.connected.set(1 if up else 0),
        )
        holds: set[str] = set()
        self.pipeline.attach(_SharedSource(self.client, holds, "live"))
        self.replay_pipeline.attach(_SharedSource(self.client, holds, "replay"))
        self.drill_pipeline.attach(_SharedSource(self.client, holds, "drill"))
        await self.client.__aenter__()
        log.info("ingesting %s from %s", ", ".join(cfg.subscriptions), cfg.mqtt.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Flush, commit, acknowledge, disconnect."""
        for pipeline in self._pipelines:
            pipeline.stop()
        if self._writers:
            try:
                async with asyncio.timeout(self.config.shutdown_timeout_s):
                    await asyncio.gather(*self._writers)
            except TimeoutError:
                log.error(
                    "could not flush within %.0f s; unacknowledged messages will be redelivered",
                    self.config.shutdown_timeout_s,
                )
                for writer in self._writers:
                    writer.cancel()
                await asyncio.gather(*self._writers, return_exceptions=True)
            self._writers = []
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._alerts_task is not None:
            self._alerts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alerts_task
            self._alerts_task = None
        if self.alerts is not None:
            await self.alerts.store.close()
            closer = getattr(self.alerts.publisher, "close", None)
            if closer is not None:
                await closer()
        if self._staleness_task is not None:
            self._staleness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._staleness_task
            self._staleness_task = None
        await self.store.close()
        await self.replay_pipeline.close_store()
        await self.drill_pipeline.close_store()

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        """Wait until the broker connection is up."""
        assert self.client is not None
        await self.client.wait_connected(timeout_s)


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGTERM/SIGINT; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handle(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal %d: exiting now", signum)
            raise SystemExit(128 + signum)
        log.info("signal %d: shutting down", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_ingest(config: IngestConfig) -> None:
    """Run the ingester until SIGTERM or SIGINT."""
    async with stop_on_signals() as stop, IngestService(config):
        await stop.wait()
