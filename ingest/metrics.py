"""Prometheus metrics of the ingester, in a registry of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(slots=True)
class IngestMetrics:
    """The ingester's counters, gauges and histograms."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    prefix: str = "cityops_ingest_"
    """``cityops_replay_`` for the replay sandbox's pipeline, in the same registry."""
    received: Counter = field(init=False)
    stored: Counter = field(init=False)
    dead_lettered: Counter = field(init=False)
    duplicates: Counter = field(init=False)
    presence: Counter = field(init=False)
    batch_seconds: Histogram = field(init=False)
    batch_size: Histogram = field(init=False)
    queue_depth: Gauge = field(init=False)
    ack_lag_seconds: Gauge = field(init=False)
    paused: Gauge = field(init=False)
    storage_errors: Counter = field(init=False)
    connected: Gauge = field(init=False)
    stale_devices: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        p = self.prefix
        self.received = Counter(p + "messages_received", "MQTT messages received", registry=r)
        self.stored = Counter(p + "readings_stored", "Readings committed", registry=r)
        self.dead_lettered = Counter(
            p + "dead_letters", "Messages dead-lettered, by reason kind", ["kind"], registry=r
        )
        self.duplicates = Counter(
            p + "duplicates_skipped", "Readings already stored (redelivery)", registry=r
        )
        self.presence = Counter(p + "presence_updates", "Presence messages applied", registry=r)
        self.batch_seconds = Histogram(
            p + "batch_commit_seconds",
            "Time to commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_messages",
            "Messages per committed batch",
            buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Messages received and not yet committed", registry=r
        )
        self.ack_lag_seconds = Gauge(
            p + "ack_lag_seconds", "Age of the oldest message not yet acknowledged", registry=r
        )
        self.paused = Gauge(p + "paused", "1 while reading is paused by backpressure", registry=r)
        self.storage_errors = Counter(
            p + "storage_errors", "Failed batch commits (retried)", registry=r
        )
        self.connected = Gauge(p + "mqtt_connected", "1 while connected to the broker", registry=r)
        self.stale_devices = Gauge(
            p + "stale_devices", "Devices silent past their expected period", registry=r
        )
