"""Backtests: the live rule evaluator, run over recorded or stored data as fast as possible.

There is no second implementation of the rules here. :func:`run_backtest`
feeds the same :class:`~rules.engine.Evaluator` that serves live data, and
what makes it a backtest is only the clock: a :class:`ReplayClock` that
follows the replayed data instead of the wall, and is moved forward by
:func:`run_backtest` alone. So ``no_data()``, ``offline()`` and the ``for:``
timers of the rules that use them fire when they would have fired live:

* **recordings**: the clock reads each message's recorded receive time, which
  is what the live evaluator's wall clock read when that message arrived.
  Readings keep their own device time (windows, ``for:``, correlations), so
  a device with a skewed clock cannot drag every other timer along with it;
* **stored readings**: the receive time is not the order readings are read
  in, so the clock follows the device time of the readings (``ORDER BY ts``)
  and the receive time of presence changes.

Between two inputs the clock advances in steps of ``tick_s`` (one simulated
second by default) and :meth:`Evaluator.tick` runs at each step, as the live
service calls it every second.

Several rule sets can be evaluated in one pass (``--compare``): every
evaluator sees the same inputs at the same clock times, and the input is
read once (a database range is never held in memory: it is streamed through
server-side cursors in chunks).

Errors: everything that makes the input unusable is a :class:`BacktestError`
whose message names the file, the database host or the setting to fix.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit

import psycopg

from ingest import (
    DEFAULT_LIMITS,
    DOMAINS,
    REPLAY_PREFIX,
    DecodeError,
    DecodeLimits,
    DeviceRef,
    Domain,
    Presence,
    Reading,
    decode_message,
    split_replay_topic,
)
from rules.engine import AlertSignal, Evaluator, EvaluatorOptions
from rules.errors import RulesError
from rules.kinds import KindResolver, prefix_kind_resolver
from rules.loader import RuleSet
from rules.model import Rule
from rules.report import InputSummary
from simulators import RecordingError, RecordingReader

__all__ = [
    "BacktestError",
    "BacktestOptions",
    "BacktestRun",
    "InputCounts",
    "Observation",
    "RecordingSource",
    "ReplayClock",
    "StoredRange",
    "run_backtest",
]

log = logging.getLogger(__name__)

Observation: TypeAlias = tuple[float, Sequence[Reading] | Presence]
"""``(clock time, the readings of one message | one presence change)``."""

ProgressCallback = Callable[[float, "InputCounts"], None]
"""Called now and then with the simulated seconds done and the counts so far."""

_DEVICE_TOPIC_PREFIX: Final = "city/"


class BacktestError(RulesError):
    """The input of a backtest cannot be used: missing or corrupt recording, no database."""


class ReplayClock:
    """The evaluator's clock during a backtest: set by the runner, never by the wall."""

    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        """The simulated time reached."""
        return self.t


@dataclass(slots=True)
class InputCounts:
    """What a source has read so far."""

    messages: int = 0
    readings: int = 0
    presences: int = 0
    malformed: int = 0
    ignored: int = 0
    corrupt_blocks: int = 0
    truncated_tail: bool = False
    malformed_examples: list[str] = field(default_factory=list)
    """The first few decode errors, for the log."""

    def summary(self, source: str) -> InputSummary:
        """The counts as the report shows them."""
        return InputSummary(
            source=source,
            messages=self.messages,
            readings=self.readings,
            presences=self.presences,
            malformed=self.malformed,
            ignored=self.ignored,
            corrupt_blocks=self.corrupt_blocks,
            truncated_tail=self.truncated_tail,
        )

    def note_malformed(self, where: str, reason: str) -> None:
        """Count one message that does not decode."""
        self.malformed += 1
        if len(self.malformed_examples) < 5:
            self.malformed_examples.append(f"{where}: {reason}")


# -- recordings ------------------------------------------------------------------


class RecordingSource:
    """The messages of a recording file, decoded as the live ingester decodes them.

    Replayed traffic (``cityops/replay/{run}/city/…``) is unwrapped to its
    original topic. Messages on other non-device topics are ignored, and
    messages that do not decode are counted as malformed: the live ingester
    would have dead-lettered them.

    Args:
        path: The recording.
        limits: Decoding limits (the ingester's defaults).

    Raises:
        BacktestError: (on :meth:`scan`) the file is missing, not a
            recording, or holds no readable message.
    """

    def __init__(self, path: Path, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.path = path
        self.limits = limits
        self.first: float | None = None
        self.last: float | None = None
        self.total = 0

    @property
    def description(self) -> str:
        """How the report names this input."""
        return f"recording {self.path}"

    @property
    def span(self) -> tuple[float, float]:
        """Receive times of the first and last message (after :meth:`scan`)."""
        if self.first is None or self.last is None:
            msg = "RecordingSource.span needs a successful scan() first"
            raise RuntimeError(msg)
        return self.first, self.last

    def scan(self) -> None:
        """Read the file once for its message count and time span; check it is usable."""
        reader = RecordingReader(self.path)
        try:
            self.total, self.first, self.last = reader.block_counts()
        except RecordingError as exc:
            raise BacktestError(str(exc)) from exc
        if self.total == 0:
            stats = reader.stats
            why = (
                f"{stats.corrupt_blocks} corrupt blocks, {stats.skipped_bytes} bytes skipped"
                if stats.corrupt_blocks or stats.skipped_bytes
                else "it is empty"
            )
            msg = f"recording {str(self.path)!r} holds no readable message ({why})"
            raise BacktestError(msg)

    def observations(self, counts: InputCounts) -> Iterator[Observation]:
        """Each message's readings or presence, in file order, at its receive time."""
        reader = RecordingReader(self.path)
        limits = self.limits
        try:
            for message in reader:
                counts.messages += 1
                topic = message.topic
                if topic.startswith(REPLAY_PREFIX):
                    try:
                        _, topic = split_replay_topic(topic)
                    except DecodeError as exc:
                        counts.note_malformed(topic, str(exc))
                        continue
                elif not topic.startswith(_DEVICE_TOPIC_PREFIX):
                    counts.ignored += 1
                    continue
                try:
                    decoded = decode_message(
                        topic,
                        message.payload,
                        received_at=message.t,
                        content_type=message.content_type,
                        limits=limits,
                    )
                except DecodeError as exc:
                    counts.note_malformed(topic, str(exc))
                    continue
                if isinstance(decoded, Presence):
                    counts.presences += 1
                else:
                    counts.readings += len(decoded)
                yield message.t, decoded
        except RecordingError as exc:
            raise BacktestError(str(exc)) from exc
        finally:
            counts.corrupt_blocks = reader.stats.corrupt_blocks
            counts.truncated_tail = reader.stats.truncated_tail


# -- the database ------------------------------------------------------------------

_READINGS_SQL: Final = """
SELECT EXTRACT(EPOCH FROM r.ts)::float8, d.domain, d.district, d.id, d.kind,
       s.channel, r.value, r.state, s.unit, d.expected_period_s
  FROM readings r
  JOIN series s ON s.id = r.series_id
  JOIN devices d ON d.id = s.device_id
 WHERE r.ts >= %s AND r.ts < %s
 ORDER BY r.ts, r.series_id
"""
_PRESENCE_SQL: Final = """
SELECT EXTRACT(EPOCH FROM p.received_at)::float8, d.domain, d.district, d.id,
       p.state, p.session
  FROM presence_events p
  JOIN devices d ON d.id = p.device_id
 WHERE p.received_at >= %s AND p.received_at < %s
 ORDER BY p.received_at, p.session
"""


def _safe_url(url: str) -> str:
    """The database URL without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _domain(text: str) -> Domain | None:
    return text if text in DOMAINS else None


class StoredRange:
    """Readings and presence changes of ``[start, end)`` in TimescaleDB, in time order.

    Rows are streamed through server-side cursors, ``chunk_rows`` at a time,
    so a range of any length runs in constant memory. The device kind is
    taken from ``devices.kind`` when it is set (see :meth:`kind_of`).

    Args:
        database_url: ``postgresql://…``.
        start: Start of the range, epoch seconds (included).
        end: End of the range, epoch seconds (excluded).
        chunk_rows: Rows fetched per round trip.
        connect_timeout_s: Deadline to connect.
    """

    def __init__(
        self,
        database_url: str,
        *,
        start: float,
        end: float,
        chunk_rows: int = 10_000,
        connect_timeout_s: float = 10.0,
        warm_up_s: float = 3_600.0,
    ) -> None:
        if not end > start:
            msg = f"the range ends ({_iso(end)}) before it starts ({_iso(start)})"
            raise BacktestError(msg)
        self.database_url = database_url
        self.start = start
        self.end = end
        self.chunk_rows = chunk_rows
        self.connect_timeout_s = connect_timeout_s
        self.warm_up_s = warm_up_s
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._kinds: dict[str, str] = {}
        self._counts = InputCounts()
        self._prefix_kind = prefix_kind_resolver()

    @property
    def description(self) -> str:
        """How the report names this input."""
        return f"database {_safe_url(self.database_url)} {_iso(self.start)} → {_iso(self.end)}"

    def __enter__(self) -> StoredRange:
        try:
            self._conn = psycopg.connect(
                self.database_url, connect_timeout=max(1, round(self.connect_timeout_s))
            )
        except psycopg.Error as exc:
            msg = (
                f"cannot connect to {_safe_url(self.database_url)} within"
                f" {self.connect_timeout_s:.0f} s: {str(exc).strip()}"
            )
            raise BacktestError(msg) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def kind_of(self, device: DeviceRef) -> str | None:
        """The device's kind from ``devices.kind``, else from its id prefix."""
        return self._kinds.get(device.device_id) or self._prefix_kind(device)

    def _bounds(self) -> tuple[datetime, datetime]:
        return datetime.fromtimestamp(self.start, UTC), datetime.fromtimestamp(self.end, UTC)

    def warm_up_readings(self) -> list[Reading]:
        """The readings of ``warm_up_s`` before the range, as the live service warms up.

        They prime windows, ``for:`` timers and baselines silently: a ``for: 10m``
        that had run 9 minutes at ``start`` fires a minute into the range, as it
        would have live. Alerts already standing at ``start`` are not reported.

        Raises:
            BacktestError: the query failed.
        """
        conn = self._conn
        if conn is None or self.warm_up_s <= 0:
            return []
        bounds = (
            datetime.fromtimestamp(self.start - self.warm_up_s, UTC),
            datetime.fromtimestamp(self.start, UTC),
        )
        try:
            observed = self._readings(conn, bounds, InputCounts(), cursor="backtest_warm_up")
            readings = [
                r for _, group in observed if not isinstance(group, Presence) for r in group
            ]
            conn.commit()  # end the cursor's transaction before the range's
        except psycopg.Error as exc:
            msg = f"reading {_safe_url(self.database_url)} failed: {str(exc).strip()}"
            raise BacktestError(msg) from exc
        return readings

    def _readings(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        bounds: tuple[datetime, datetime],
        counts: InputCounts,
        *,
        cursor: str = "backtest_readings",
    ) -> Iterator[Observation]:
        kinds = self._kinds
        refs: dict[str, DeviceRef] = {}
        with conn.cursor(name=cursor) as cur:
            cur.itersize = self.chunk_rows
            cur.execute(_READINGS_SQL, bounds)
            group: list[Reading] = []
            group_ts = 0.0
            for ts, domain, district, device_id, kind, channel, value, state, unit, period in cur:
                counts.messages += 1
                ref = refs.get(device_id)
                if ref is None:
                    checked = _domain(domain)
                    if checked is None:
                        counts.note_malformed(device_id, f"unknown domain {domain!r}")
                        continue
                    ref = refs[device_id] = DeviceRef(checked, district, device_id)
                    if kind:
                        kinds[device_id] = kind
                if group and ts != group_ts:
                    yield group_ts, group
                    group = []
                group_ts = ts
                group.append(Reading(ref, channel, ts, value, state, unit, period))
                counts.readings += 1
            if group:
                yield group_ts, group

    def _presences(self, conn: psycopg.Connection[tuple[Any, ...]]) -> Iterator[Observation]:
        counts = self._counts
        with conn.cursor(name="backtest_presence") as cur:
            cur.itersize = self.chunk_rows
            cur.execute(_PRESENCE_SQL, self._bounds())
            for at, domain, district, device_id, state, session in cur:
                counts.messages += 1
                checked = _domain(domain)
                if checked is None or state not in ("online", "offline"):
                    counts.note_malformed(device_id, f"presence {domain!r} {state!r}")
                    continue
                counts.presences += 1
                ref = DeviceRef(checked, district, device_id)
                yield at, Presence(ref, "online" if state == "online" else "offline", session, at)

    def observations(self, counts: InputCounts) -> Iterator[Observation]:
        """Readings (grouped by instant) and presence changes, merged in time order.

        At the same instant readings come first, as in an ingest batch.

        Raises:
            BacktestError: a query failed.
        """
        conn = self._conn
        if conn is None:
            msg = "StoredRange.observations() needs an open connection (use `with`)"
            raise RuntimeError(msg)
        self._counts = counts
        try:
            # Two server-side cursors in one transaction, merged: neither stream is
            # ever held in memory. heapq.merge keeps readings first on equal times.
            yield from heapq.merge(
                self._readings(conn, self._bounds(), counts),
                self._presences(conn),
                key=itemgetter(0),
            )
        except psycopg.Error as exc:
            msg = f"reading {_safe_url(self.database_url)} failed: {str(exc).strip()}"
            raise BacktestError(msg) from exc


# -- the run -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BacktestOptions:
    """How a backtest runs.

    Attributes:
        tick_s: Simulated seconds between two calls of ``Evaluator.tick``.
        evaluator: The evaluator's tuning (default: the live defaults).
        progress_every: Inputs between two progress callbacks.
    """

    tick_s: float = 1.0
    evaluator: EvaluatorOptions | None = None
    progress_every: int = 2_000

    def __post_init__(self) -> None:
        if not self.tick_s > 0:
            msg = f"BacktestOptions.tick_s must be > 0, got {self.tick_s}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class BacktestRun:
    """The signals of each rule set over one input.

    Attributes:
        signals: One tuple per rule set, in the order given.
        start: Clock time at the start.
        end: Clock time at the end.
        ticks: Calls of ``tick`` per evaluator.
        elapsed_s: Wall time the run took.
    """

    signals: tuple[tuple[AlertSignal, ...], ...]
    start: float
    end: float
    ticks: int
    elapsed_s: float


def run_backtest(
    rule_sets: Sequence[RuleSet | Iterable[Rule]],
    observations: Iterable[Observation],
    *,
    counts: InputCounts,
    start: float | None = None,
    end: float | None = None,
    options: BacktestOptions | None = None,
    kind_of: KindResolver | None = None,
    progress: ProgressCallback | None = None,
    warm_up: Sequence[Reading] = (),
) -> BacktestRun:
    """Evaluate each rule set over the observations, with a clock that follows them.

    Args:
        rule_sets: The rule sets to evaluate side by side.
        observations: ``(clock time, readings | presence)`` in time order.
        counts: The source's counters, handed to ``progress``.
        start: Clock time at the start (default: the first observation's).
        end: Clock time to tick up to at the end (default: the last observation's).
        options: Tick interval and evaluator tuning.
        kind_of: Device kind resolver (default: by device id prefix).
        progress: Called every ``options.progress_every`` inputs.
        warm_up: Readings from before ``start`` that prime the evaluators
            silently (``StoredRange.warm_up_readings``).

    Returns:
        The signals of each rule set, in the order the evaluator produced them.
    """
    opts = options or BacktestOptions()
    began = time.perf_counter()
    feed = iter(observations)
    first = next(feed, None)
    if start is None:
        start = first[0] if first is not None else (end if end is not None else 0.0)
    clock = ReplayClock(start)
    evaluators = [Evaluator(rs, clock, options=opts.evaluator, kind_of=kind_of) for rs in rule_sets]
    if warm_up:
        for evaluator in evaluators:
            evaluator.warm_up(warm_up)
    outs: list[list[AlertSignal]] = [[] for _ in evaluators]
    pairs = list(zip(evaluators, outs, strict=True))
    tick_s = opts.tick_s
    next_tick = start + tick_s
    ticks = 0

    def advance(t: float) -> None:
        nonlocal next_tick, ticks
        while next_tick <= t:
            clock.t = next_tick
            for ev, out in pairs:
                out.extend(ev.tick())
            ticks += 1
            next_tick = start + (ticks + 1) * tick_s  # no drift from repeated addition
        clock.t = max(clock.t, t)

    if first is not None:
        every = opts.progress_every
        for n, (at, item) in enumerate(_chain(first, feed), start=1):
            advance(at)
            if isinstance(item, Presence):
                for ev, out in pairs:
                    out.extend(ev.on_presence((item,)))
            else:
                for ev, out in pairs:
                    out.extend(ev.on_readings(item))
            if progress is not None and n % every == 0:
                progress(clock.t - start, counts)
    advance(end if end is not None else clock.t)
    if progress is not None:
        progress(clock.t - start, counts)
    return BacktestRun(
        signals=tuple(tuple(out) for out in outs),
        start=start,
        end=max(clock.t, start),
        ticks=ticks,
        elapsed_s=time.perf_counter() - began,
    )


def _chain(first: Observation, rest: Iterator[Observation]) -> Iterator[Observation]:
    yield first
    yield from rest


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
