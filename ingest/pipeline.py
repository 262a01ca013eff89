"""The ingest engine: decode → batch → commit → acknowledge → sinks.

Two kinds of consumers: *decoded sinks* (the rules engine) get the readings
as decoded, once per event-loop turn, so an alert does not wait for the
batching window and the commit; *batch sinks* (the live hub, staleness) get
each batch after its commit.

Overflow policy (every queue is bounded): messages are decoded as they arrive
into the open batch; a full batch is sealed and queued for the writer. When
the messages held in memory (sealed plus open) reach ``max_buffered_messages``
the pipeline pauses reading the socket: the broker keeps the rest in the
session queue. Reading resumes below half that mark. Nothing is acknowledged
before its batch is committed (or dead-lettered in that same commit), so a
crash at any instant loses nothing; the broker redelivers and the idempotent
store keeps one copy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cityops.backoff import Backoff
from ingest.batch import (
    Batch,
    BatchSink,
    BatchSource,
    CommittedBatch,
    DecodedBatch,
    DecodedSink,
    StoreResult,
)
from ingest.decode import DecodeLimits, decode_message
from ingest.errors import DecodeError, StorageUnavailable
from ingest.metrics import IngestMetrics
from ingest.model import DeadLetter, Presence, Reading
from ingest.mqtt import InboundMessage

log = logging.getLogger(__name__)


class AckingSource(Protocol):
    """What the pipeline needs of the MQTT client."""

    def ack(self, generation: int, mid: int) -> bool:
        """Acknowledge one message of a connection generation."""

    def pause_reading(self) -> None:
        """Stop reading the socket."""

    def resume_reading(self) -> None:
        """Read again."""


class BatchStore(Protocol):
    """Where committed batches go: ``ingest.store.ReadingStore``, or nowhere."""

    sandbox: bool

    def home_of(self, device_id: str) -> tuple[str, str] | None:
        """The (domain, district) a device is registered in, if known."""

    async def write(self, batch: Batch) -> StoreResult:
        """Commit a batch (raises ``StorageUnavailable``)."""

    async def close(self) -> None:
        """Release the connection."""


@dataclass(slots=True)
class DiscardingStore:
    """Stores nothing: the rules service decodes and evaluates, the ingesters store.

    Its batches are "committed" at once, so messages are acknowledged after
    the batch window; a crash loses no alert because the restarted rules
    service rebuilds its windows from the readings the ingesters stored.
    """

    sandbox: bool = False

    def home_of(self, device_id: str) -> tuple[str, str] | None:
        """Unknown here: identity is checked where readings are stored."""
        return None

    async def write(self, batch: Batch) -> StoreResult:
        """Nothing to write."""
        return StoreResult(
            stored=0, duplicates=0, dead_letters=len(batch.dead_letters), presence_applied=0
        )

    async def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """Batching and buffering bounds."""

    batch_max_messages: int = 2_000
    batch_max_readings: int = 20_000
    batch_max_delay_s: float = 0.05
    """How long the first message of a batch may wait for others."""
    max_buffered_messages: int = 8_000
    """Pause reading at this many uncommitted messages (keep below the MQTT window)."""
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0
    sender_property: str | None = None
    """An MQTT 5 user property in which the broker names the publishing user
    (e.g. stamped by EMQX's rule engine): a reading or status whose topic names
    another device is dead-lettered. Mosquitto tells nothing: leave it unset."""
    trusted_senders: frozenset[str] = frozenset()
    """Users that may publish for any device (gateways such as ``cityops-simulator``)."""


def check_sender(
    user_properties: tuple[tuple[str, str], ...],
    decoded: Presence | list[Reading],
    options: PipelineOptions,
) -> None:
    """Refuse a message whose broker-stamped sender is not the device of its topic.

    A message without the property passes: the broker did not tell.

    Raises:
        DecodeError: the sender is another user and not a trusted gateway.
    """
    sender = next((v for k, v in user_properties if k == options.sender_property), None)
    if sender is None or sender in options.trusted_senders:
        return
    device = decoded.device if isinstance(decoded, Presence) else decoded[0].device
    if sender != device.device_id:
        msg = f"sender mismatch: published by {sender!r}, topic names {device.device_id!r}"
        raise DecodeError(msg)


REPLAY_PREFIX = "cityops/replay/"
_RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def split_replay_topic(topic: str) -> tuple[str, str]:
    """``cityops/replay/{run_id}/city/…`` → (run id, the original topic).

    Raises:
        DecodeError: not a replay topic, or a malformed run id.
    """
    if not topic.startswith(REPLAY_PREFIX):
        msg = f"topic {topic!r}: not under {REPLAY_PREFIX}"
        raise DecodeError(msg)
    run_id, _, inner = topic[len(REPLAY_PREFIX) :].partition("/")
    if _RUN_ID.fullmatch(run_id) is None:
        msg = f"topic {topic!r}: run id {run_id!r} must match [a-z0-9][a-z0-9-]* (≤ 63)"
        raise DecodeError(msg)
    return run_id, inner


def _reason_kind(reason: str) -> str:
    """A low-cardinality label for the dead-letter metric."""
    head = reason.split(":", 1)[0].split(" ", 1)[0]
    return head[:32] or "other"


class IngestPipeline:
    """Turns MQTT messages into committed, acknowledged batches."""

    def __init__(
        self,
        *,
        store: BatchStore,
        options: PipelineOptions | None = None,
        limits: DecodeLimits | None = None,
        metrics: IngestMetrics | None = None,
        sinks: Sequence[BatchSink] = (),
        drill: bool = False,
    ) -> None:
        self._store = store
        self._options = options or PipelineOptions()
        self._limits = limits or DecodeLimits()
        self.metrics = metrics or IngestMetrics()
        self._sinks = list(sinks)
        self._decoded_sinks: list[DecodedSink] = []
        self._decoded_readings: list[Reading] = []
        self._decoded_presences: list[Presence] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handover_due = False
        self._source: AckingSource | None = None
        self._open = Batch()
        self._sealed: collections.deque[Batch] = collections.deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._sandbox = store.sandbox
        self._batch_source: BatchSource = (
            "replay" if store.sandbox else ("drill" if drill else "live")
        )

    def attach(self, source: AckingSource) -> None:
        """Set the client whose messages this pipeline acknowledges."""
        self._source = source

    def add_sink(self, sink: BatchSink) -> None:
        """Add a consumer of committed batches."""
        self._sinks.append(sink)

    def add_decoded_sink(self, sink: DecodedSink) -> None:
        """Add a consumer of decoded readings (before their commit)."""
        self._decoded_sinks.append(sink)

    @property
    def buffered(self) -> int:
        """Messages received and not yet committed."""
        return self._buffered

    # -- hot path: one call per MQTT message, on the event loop -------------

    def on_message(self, msg: InboundMessage) -> None:
        """Decode one message into the open batch (never raises on bad input)."""
        batch = self._open
        if batch.messages == 0:
            batch.opened_at = time.monotonic()
            batch.first_received_at = msg.received_at
            self._wake.set()
        topic = msg.topic
        run_id = ""
        try:
            if self._sandbox:
                run_id, topic = split_replay_topic(topic)
            decoded = decode_message(
                topic,
                msg.payload,
                received_at=msg.received_at,
                content_type=msg.content_type,
                limits=self._limits,
            )
            if self._options.sender_property is not None and msg.user_properties and decoded:
                check_sender(msg.user_properties, decoded, self._options)
        except DecodeError as exc:
            batch.dead_letters.append(DeadLetter(msg.topic, msg.payload, str(exc), msg.received_at))
        else:
            if isinstance(decoded, Presence):
                batch.presences.append(decoded)
                if self._sandbox:
                    batch.presence_run_ids.append(run_id)
                if self._decoded_sinks:
                    self._decoded_presences.append(decoded)
                    self._schedule_handover()
            elif decoded:
                home = self._store.home_of(decoded[0].device.device_id)
                device = decoded[0].device
                if home is not None and home != (device.domain, device.district):
                    reason = (
                        f"device {device.device_id!r} is registered in {home[0]}/{home[1]},"
                        f" not {device.domain}/{device.district}"
                    )
                    batch.dead_letters.append(
                        DeadLetter(msg.topic, msg.payload, reason, msg.received_at)
                    )
                else:
                    batch.readings.extend(decoded)
                    batch.reading_received_at.extend([msg.received_at] * len(decoded))
                    if self._sandbox:
                        batch.reading_run_ids.extend([run_id] * len(decoded))
                    if self._decoded_sinks:
                        self._decoded_readings.extend(decoded)
                        self._schedule_handover()
        if msg.qos > 0:
            batch.acks.append((msg.generation, msg.mid))
        batch.messages += 1
        self._buffered += 1
        opts = self._options
        if batch.messages >= opts.batch_max_messages or len(batch.readings) >= (
            opts.batch_max_readings
        ):
            self._seal()
        if self._buffered >= opts.max_buffered_messages and self._source is not None:
            self._source.pause_reading()
            self.metrics.paused.set(1)

    def _schedule_handover(self) -> None:
        """Hand decoded readings to the decoded sinks after this loop turn's messages."""
        if self._handover_due:
            return
        self._handover_due = True
        if self._loop is None:
            self._hand_over_decoded()  # no writer running (a test): right away
        else:
            self._loop.call_soon(self._hand_over_decoded)

    def _hand_over_decoded(self) -> None:
        self._handover_due = False
        decoded = DecodedBatch(
            tuple(self._decoded_readings), tuple(self._decoded_presences), self._batch_source
        )
        self._decoded_readings.clear()
        self._decoded_presences.clear()
        for sink in self._decoded_sinks:
            try:
                sink.on_decoded(decoded)
            except Exception:
                log.exception("decoded sink %r failed; ingest goes on", sink)

    def _seal(self) -> None:
        if self._open.messages:
            self._sealed.append(self._open)
            self._open = Batch()
            self._wake.set()

    # -- writer ---------------------------------------------------------------

    async def _next_batch(self) -> Batch | None:
        """The next batch to commit, or None when stopping with nothing left."""
        delay = self._options.batch_max_delay_s
        while True:
            if self._sealed:
                return self._sealed.popleft()
            if self._open.messages:
                if self._stopping:
                    self._seal()
                    continue
                remaining = self._open.opened_at + delay - time.monotonic()
                if remaining <= 0:
                    self._seal()
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                continue
            if self._stopping:
                return None
            self._wake.clear()
            await self._wake.wait()

    async def run(self) -> None:
        """Commit batches until ``stop()``; then flush what is buffered and return."""
        self._loop = asyncio.get_running_loop()
        backoff = Backoff(self._options.retry_initial_s, self._options.retry_max_s)
        while True:
            self._update_lag()
            batch = await self._next_batch()
            if batch is None:
                return
            await self._commit_with_retry(batch, backoff)

    async def _commit_with_retry(self, batch: Batch, backoff: Backoff) -> None:
        while True:
            started = time.monotonic()
            try:
                result = await self._store.write(batch)
            except StorageUnavailable as exc:
                self.metrics.storage_errors.inc()
                delay = backoff.next_delay()
                log.warning(
                    "holding %d messages: %s; retry %d in %.2f s",
                    self._buffered,
                    exc,
                    backoff.attempts,
                    delay,
                )
                self._update_lag()
                await asyncio.sleep(delay)
                continue
            break
        if backoff.attempts:
            log.info("database back after %d failed attempts", backoff.attempts)
        backoff.reset()
        m = self.metrics
        m.batch_seconds.observe(time.monotonic() - started)
        m.batch_size.observe(batch.messages)
        m.received.inc(batch.messages)
        m.stored.inc(result.stored)
        m.duplicates.inc(result.duplicates)
        m.presence.inc(result.presence_applied)
        for letter in (*batch.dead_letters, *result.rejected):
            m.dead_lettered.labels(_reason_kind(letter.reason)).inc()
        source = self._source
        if source is not None:
            ack = source.ack
            for generation, mid in batch.acks:
                ack(generation, mid)
        self._buffered -= batch.messages
        if (
            source is not None
            and self._buffered < self._options.max_buffered_messages // 2
            and not self._stopping
        ):
            source.resume_reading()
            m.paused.set(0)
        committed = CommittedBatch(
            readings=tuple(batch.readings),
            presences=tuple(batch.presences),
            dead_letters=(*batch.dead_letters, *result.rejected),
            committed_at=time.time(),
            source=self._batch_source,
        )
        for sink in self._sinks:
            try:
                sink.on_batch(committed)
            except Exception:
                log.exception("sink %r failed on a batch; ingest goes on", sink)

    def _update_lag(self) -> None:
        oldest: float | None = None
        for b in (*self._sealed, self._open):
            if b.messages and b.first_received_at is not None:
                oldest = b.first_received_at if oldest is None else min(oldest, b.first_received_at)
        self.metrics.queue_depth.set(self._buffered)
        self.metrics.ack_lag_seconds.set(0.0 if oldest is None else time.time() - oldest)

    async def close_store(self) -> None:
        """Close the store's connection (after ``run`` returned)."""
        await self._store.close()

    def stop(self) -> None:
        """Stop taking messages; ``run`` returns after flushing what it holds."""
        self._stopping = True
        if self._source is not None:
            self._source.pause_reading()
        self._wake.set()
