"""Lossless MQTT → TimescaleDB ingest: the public names sibling packages use."""

from ingest.batch import BatchSink, BatchSource, CommittedBatch, DecodedBatch, DecodedSink
from ingest.decode import DEFAULT_LIMITS, DecodeLimits, decode_message
from ingest.errors import DecodeError, IngestError, StorageUnavailable
from ingest.model import DOMAINS, DeadLetter, DeviceRef, Domain, Presence, Reading
from ingest.mqtt import MqttOptions
from ingest.pipeline import REPLAY_PREFIX, PipelineOptions, split_replay_topic
from ingest.service import IngestConfig, IngestService, run_ingest, stop_on_signals

__all__ = [
    "DEFAULT_LIMITS",
    "DOMAINS",
    "REPLAY_PREFIX",
    "BatchSink",
    "BatchSource",
    "CommittedBatch",
    "DeadLetter",
    "DecodeError",
    "DecodeLimits",
    "DecodedBatch",
    "DecodedSink",
    "DeviceRef",
    "Domain",
    "IngestConfig",
    "IngestError",
    "IngestService",
    "MqttOptions",
    "PipelineOptions",
    "Presence",
    "Reading",
    "StorageUnavailable",
    "decode_message",
    "run_ingest",
    "split_replay_topic",
    "stop_on_signals",
]
