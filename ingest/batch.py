"""A batch: the unit that is committed, then acknowledged, then handed to sinks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ingest.model import DeadLetter, Presence, Reading

BatchSource = Literal["live", "replay", "drill"]


@dataclass(slots=True)
class Batch:
    """Decoded messages waiting to be committed together.

    ``acks`` holds ``(generation, mid)`` of every QoS 1 message in the batch,
    in receive order: they are acknowledged only after the commit.
    """

    readings: list[Reading] = field(default_factory=list)
    reading_received_at: list[float] = field(default_factory=list)
    presences: list[Presence] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    reading_run_ids: list[str] = field(default_factory=list)
    """Replay sandbox only: the run each reading belongs to."""
    presence_run_ids: list[str] = field(default_factory=list)
    """Replay sandbox only: the run each presence message belongs to."""
    acks: list[tuple[int, int]] = field(default_factory=list)
    messages: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    first_received_at: float | None = None

    def __len__(self) -> int:
        return self.messages


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What the database did with a batch."""

    stored: int
    duplicates: int
    dead_letters: int
    presence_applied: int
    rejected: tuple[DeadLetter, ...] = ()
    """Readings turned into dead letters by the store (e.g. device identity mismatch)."""


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """A batch after its commit: what the rules engine and live hub consume."""

    readings: tuple[Reading, ...]
    presences: tuple[Presence, ...]
    dead_letters: tuple[DeadLetter, ...]
    committed_at: float
    source: BatchSource = "live"
    """``replay`` (the sandbox) or ``drill`` (a live-namespace replay): never pages anyone."""


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """Readings and presence changes as decoded, before their commit.

    What the rules engine evaluates: handed over once per event-loop turn,
    so an alert does not wait for the batching window and the COPY. The
    readings are committed later (or held and retried while the database is
    down, never dropped); a crash before that commit redelivers them.
    """

    readings: tuple[Reading, ...]
    presences: tuple[Presence, ...]
    source: BatchSource = "live"


class DecodedSink(Protocol):
    """Consumes decoded readings in arrival order, before commit. Must not block the loop."""

    def on_decoded(self, batch: DecodedBatch) -> None:
        """Take the readings and presence changes decoded in one event-loop turn."""


class BatchSink(Protocol):
    """Consumes committed batches in commit order. Must not block the loop."""

    def on_batch(self, batch: CommittedBatch) -> None:
        """Take one committed batch."""
