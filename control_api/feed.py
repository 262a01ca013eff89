"""What feeds the live hub: the broker (``cityops api``) or the ingest process (``cityops up``).

:class:`BrokerFeed` subscribes on its own (non-shared, clean session: every
API instance sees everything) to readings and presence under ``city/#``,
replays under ``cityops/replay/#`` and alert events under
``cityops/alerts/#``. It decodes with the ingest package's decoder (in this
process nothing else parses these messages) and hands the hub batches, at
most every :attr:`FeedOptions.batch_delay_s`.

Overflow policy: the live view is a view, the database is the truth. The
client's incoming queue is bounded at :attr:`FeedOptions.max_queued`; beyond
it the broker's messages are dropped and counted (a browser then shows the
next value; a missed alert event is repaired by the periodic KPI and
snapshot refresh). Reconnects use jittered backoff; while disconnected,
``/readyz`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from prometheus_client import Counter

from cityops.backoff import Backoff
from cityops.settings import MqttEndpoint
from ingest import (
    REPLAY_PREFIX,
    CommittedBatch,
    DecodeError,
    Presence,
    Reading,
    decode_message,
    split_replay_topic,
)

__all__ = ["BrokerFeed", "FeedOptions", "run_staleness_feed"]

log = logging.getLogger(__name__)

FEED_MESSAGES = Counter(
    "cityops_api_feed_messages_total", "Broker messages taken by the live feed", ["kind"]
)

ALERTS_TOPIC = "cityops/alerts/"


@dataclass(frozen=True, slots=True)
class FeedOptions:
    """Batching and bounds of the broker feed."""

    batch_delay_s: float = 0.05
    batch_max: int = 5000
    max_queued: int = 200_000
    keepalive_s: int = 30


class _Pending:
    """Decoded messages not yet handed to the hub, by source."""

    def __init__(self) -> None:
        self.readings: dict[str, list[Reading]] = {"live": [], "replay": []}
        self.presences: dict[str, list[Presence]] = {"live": [], "replay": []}
        self.count = 0
        self.since = 0.0

    def add(self, source: str, decoded: list[Reading] | Presence) -> None:
        if not self.count:
            self.since = time.monotonic()
        self.count += 1
        if isinstance(decoded, Presence):
            self.presences[source].append(decoded)
        else:
            self.readings[source].extend(decoded)

    def drain(self) -> list[CommittedBatch]:
        now = time.time()
        batches = []
        for source in ("live", "replay"):
            readings, presences = self.readings[source], self.presences[source]
            if readings or presences:
                batches.append(
                    CommittedBatch(
                        readings=tuple(readings),
                        presences=tuple(presences),
                        dead_letters=(),
                        committed_at=now,
                        source=source,
                    )
                )
                self.readings[source], self.presences[source] = [], []
        self.count = 0
        return batches


class BrokerFeed:
    """Subscribes to the broker and feeds the hub until cancelled."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        hub: Any,
        client_id: str,
        options: FeedOptions | None = None,
        on_connection: Callable[[bool], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._hub = hub
        self._client_id = client_id
        self._options = options or FeedOptions()
        self._on_connection = on_connection or (lambda _: None)
        self._pending = _Pending()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Connect, subscribe and feed; reconnect with backoff forever (until cancelled)."""
        backoff = Backoff()
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._on_connection(False)
                delay = backoff.next_delay()
                log.warning("live feed: broker %s lost (%s); retry in %.1f s",
                            self._endpoint.url, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
            else:
                backoff.reset()

    async def _session(self) -> None:
        e = self._endpoint
        async with aiomqtt.Client(
            e.host,
            e.port,
            username=e.username,
            password=e.password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=e.ssl_context(),
            keepalive=self._options.keepalive_s,
            max_queued_incoming_messages=self._options.max_queued,
        ) as client:
            await client.subscribe(
                [("city/#", 0), (f"{REPLAY_PREFIX}#", 0), (f"{ALERTS_TOPIC}#", 1)]
            )
            self.connected.set()
            self._on_connection(True)
            log.info("live feed subscribed on %s", e.url)
            async with asyncio.TaskGroup() as tasks:
                flusher = tasks.create_task(self._flush_periodically())
                try:
                    async for message in client.messages:
                        self._take(message)
                finally:
                    flusher.cancel()

    def _take(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if topic.startswith(ALERTS_TOPIC):
            FEED_MESSAGES.labels("alert").inc()
            self._flush()  # keep readings before the alert that they caused
            self._hub.on_alert_message(payload)
            return
        source = "live"
        try:
            if topic.startswith(REPLAY_PREFIX):
                _, topic = split_replay_topic(topic)
                source = "replay"
            props = message.properties
            content_type = getattr(props, "ContentType", None) if props else None
            decoded = decode_message(
                topic, payload, received_at=time.time(), content_type=content_type
            )
        except DecodeError:
            FEED_MESSAGES.labels("undecodable").inc()
            return  # the ingester dead-letters it; the live view just skips it
        FEED_MESSAGES.labels(source).inc()
        self._pending.add(source, decoded)
        if self._pending.count >= self._options.batch_max:
            self._flush()

    def _flush(self) -> None:
        for batch in self._pending.drain():
            self._hub.on_batch(batch)

    async def _flush_periodically(self) -> None:
        delay = self._options.batch_delay_s
        while True:
            await asyncio.sleep(delay)
            if self._pending.count and time.monotonic() - self._pending.since >= delay:
                self._flush()


async def run_staleness_feed(pool: Any, hub: Any, *, interval_s: float = 5.0) -> None:
    """Tell the hub when devices become stale or report again, from ``devices.stale_since``.

    The ingester's staleness monitor writes the column; an API instance learns
    of it here (every ``interval_s``), whether it runs beside the ingester or not.
    """
    known: dict[str, float] | None = None
    while True:
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT id, extract(epoch FROM stale_since) AS since FROM devices"
                    " WHERE stale_since IS NOT NULL"
                )
                now_stale = {r["id"]: float(r["since"]) for r in await cur.fetchall()}
        except Exception:  # the next round retries; the hub keeps what it knows
            log.warning("staleness refresh failed", exc_info=True)
        else:
            if known is not None:
                for device_id, since in now_stale.items():
                    if device_id not in known:
                        hub.on_staleness(device_id, stale=True, at=since)
                for device_id in known.keys() - now_stale.keys():
                    hub.on_staleness(device_id, stale=False, at=time.time())
            known = now_stale
        await asyncio.sleep(interval_s)
