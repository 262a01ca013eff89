"""``cityops replay``: republish a recording, paced, shifted in time, isolated.

Pure parts, testable without a broker: :func:`rewrite_topic` (the sandbox
namespace ``cityops/replay/{run_id}/…``), :class:`TimeMapping` and
:func:`shift_payload_time` (SenML ``bt``/``t`` and flat ``ts``),
:func:`parse_bound` (``--from``/``--to``) and :class:`PauseControl`.
:class:`Replayer` is the thin shell that paces messages onto a publisher.

Isolation: by default every topic is rewritten under
``cityops/replay/{run_id}/`` and carries the MQTT 5 user property
``cityops-replay: <run_id>``, so nothing reaches ``city/``. With ``live``
the original topics are used and every message carries
``cityops-drill: <run_id>`` so consumers can tell a drill from reality.
Retained presence is replayed without the retain flag unless asked, so a
replay leaves no state behind on the broker.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import orjson

from simulators.errors import SimulatorError
from simulators.mqtt import MqttPublisher, publish_properties
from simulators.recording import RecordedMessage
from simulators.scenario import parse_duration

__all__ = [
    "DRILL_PROPERTY",
    "REPLAY_PREFIX",
    "REPLAY_PROPERTY",
    "PauseControl",
    "ReplayOptions",
    "ReplayResult",
    "Replayer",
    "TimeMapping",
    "message_timestamp",
    "new_run_id",
    "parse_bound",
    "rewrite_topic",
    "shift_payload_time",
    "validate_run_id",
]

log = logging.getLogger(__name__)

_WAIT_SLICE_S = 0.2
"""Longest pacing wait between checks for a pause or a stop."""

REPLAY_PREFIX: Final = "cityops/replay"
REPLAY_PROPERTY: Final = "cityops-replay"
DRILL_PROPERTY: Final = "cityops-drill"
RELATIVE_LIMIT: Final = float(2**28)
"""SenML: times below this are relative to "now" and are left alone."""
_RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def validate_run_id(run_id: str) -> str:
    """Check a run id is a topic segment ``[a-z0-9-]+`` (at most 63 chars).

    Raises:
        SimulatorError: it is not.
    """
    if _RUN_ID.fullmatch(run_id) is None:
        msg = f"run id {run_id!r} must match [a-z0-9][a-z0-9-]* (at most 63 characters)"
        raise SimulatorError(msg)
    return run_id


def new_run_id(now: float) -> str:
    """A fresh run id like ``r20250602t074000-3f2a``."""
    stamp = time.strftime("%Y%m%dt%H%M%S", time.gmtime(now))
    return f"r{stamp}-{int(now * 1e6) % 0xFFFF:04x}"


def rewrite_topic(topic: str, *, run_id: str, live: bool) -> str:
    """The topic a recorded message is replayed on.

    ``city/traffic/chuo/loop-1`` becomes ``cityops/replay/{run_id}/city/traffic/chuo/loop-1``,
    or stays as it is for a ``live`` drill.
    """
    return topic if live else f"{REPLAY_PREFIX}/{run_id}/{topic}"


@dataclass(frozen=True, slots=True)
class TimeMapping:
    """How payload timestamps move: ``keep``, ``shift`` (constant offset) or ``scale``.

    ``shift`` maps ``ref_ts`` to ``ref_wall`` and keeps intervals; ``scale``
    also divides intervals by ``speed`` so payload time tracks publish time.
    """

    mode: Literal["keep", "shift", "scale"]
    ref_ts: float = 0.0
    ref_wall: float = 0.0
    speed: float = 1.0

    def __call__(self, ts: float) -> float:
        """The new timestamp of ``ts``."""
        if self.mode == "keep":
            return ts
        if self.mode == "shift" or self.speed <= 0:
            return self.ref_wall + (ts - self.ref_ts)
        return self.ref_wall + (ts - self.ref_ts) / self.speed

    @property
    def factor(self) -> float:
        """How intervals scale (relative SenML ``t`` under an absolute ``bt``)."""
        return 1.0 / self.speed if self.mode == "scale" and self.speed > 0 else 1.0


def _is_senml(payload: bytes, content_type: str | None) -> bool:
    return content_type == "application/senml+json" or payload.lstrip()[:1] == b"["


def message_timestamp(payload: bytes, content_type: str | None) -> float | None:
    """The first absolute timestamp of a payload (SenML ``bt``+``t`` or flat ``ts``), if any."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list):
        base = 0.0
        for record in data:
            if not isinstance(record, dict):
                return None
            bt = record.get("bt", base)
            if isinstance(bt, int | float) and not isinstance(bt, bool):
                base = float(bt)
            t = record.get("t", 0.0)
            if (
                isinstance(t, int | float)
                and not isinstance(t, bool)
                and base + t >= RELATIVE_LIMIT
            ):
                return base + float(t)
        return None
    if isinstance(data, dict):
        ts = data.get("ts")
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            return float(ts)
        if isinstance(ts, str):
            try:
                return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
    return None


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def shift_payload_time(
    payload: bytes, content_type: str | None, mapping: TimeMapping
) -> bytes | None:
    """``payload`` with its absolute timestamps mapped, or ``None`` if it has none to map.

    SenML: an absolute ``bt`` is mapped and the relative ``t`` of records
    under it scaled with the mapping's factor; an absolute ``t`` with no
    base is mapped; relative times (below 2**28) are left alone. Flat JSON:
    ``ts`` as epoch seconds or RFC 3339. Anything that does not parse is
    returned as ``None`` and replayed unchanged (a malformed payload stays
    malformed).
    """
    if mapping.mode == "keep":
        return payload
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and _is_senml(payload, content_type):
        changed = False
        base_absolute = False
        for record in data:
            if not isinstance(record, dict):
                return None
            if "bt" in record and _num(record["bt"]):
                base_absolute = record["bt"] >= RELATIVE_LIMIT
                if base_absolute:
                    record["bt"] = round(mapping(record["bt"]), 3)
                    changed = True
            if "t" in record and _num(record["t"]):
                if base_absolute:
                    if mapping.factor != 1.0:
                        record["t"] = round(record["t"] * mapping.factor, 3)
                elif record["t"] >= RELATIVE_LIMIT:
                    record["t"] = round(mapping(record["t"]), 3)
                    changed = True
        return orjson.dumps(data) if changed else None
    if isinstance(data, dict) and "ts" in data:
        ts = data["ts"]
        if _num(ts):
            data["ts"] = round(mapping(float(ts)), 3)
            return orjson.dumps(data)
        if isinstance(ts, str):
            try:
                moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
            except ValueError:
                return None
            if moment.tzinfo is None:
                return None
            shifted = datetime.fromtimestamp(mapping(moment.timestamp()), moment.tzinfo)
            data["ts"] = shifted.isoformat(timespec="milliseconds")
            return orjson.dumps(data)
    return None


def parse_bound(text: str, *, first_t: float) -> float:
    """``--from``/``--to``: an offset into the recording or an absolute time.

    ``90s``, ``+15m``, ``1h30m`` count from the first message; an epoch
    number above 2**28 or an ISO 8601 time with an offset is absolute.

    Raises:
        SimulatorError: the text is neither.
    """
    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        pass
    else:
        return number if number >= RELATIVE_LIMIT else first_t + number
    try:
        return first_t + parse_duration(stripped.lstrip("+"), "window bound")
    except SimulatorError:
        pass
    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"window bound {text!r}: expected an offset like 90s / 15m or an ISO 8601 time"
        raise SimulatorError(msg) from exc
    if moment.tzinfo is None:
        msg = f"window bound {text!r}: give a UTC offset, e.g. {text}+09:00"
        raise SimulatorError(msg)
    return moment.timestamp()


class PauseControl:
    """Pause and resume from other threads (signal handlers, a key listener)."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._running.set()
        self.stopped = threading.Event()

    @property
    def paused(self) -> bool:
        """Whether the replay is paused."""
        return not self._running.is_set()

    def pause(self) -> None:
        """Pause publishing."""
        self._running.clear()

    def resume(self) -> None:
        """Resume publishing."""
        self._running.set()

    def toggle(self) -> None:
        """Pause if running, resume if paused."""
        if self.paused:
            self.resume()
        else:
            self.pause()

    def stop(self) -> None:
        """Stop the replay (and release a pause)."""
        self.stopped.set()
        self._running.set()


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay.

    Attributes:
        run_id: Names the sandbox namespace or the drill.
        speed: Pacing factor; 0 publishes as fast as possible.
        time_mode: ``shift`` (to now), ``scale`` (to now, intervals / speed) or ``keep``.
        live: Publish on the original topics as a drill.
        keep_retain: Keep the recorded retain flag.
        start: Window start (receive time), inclusive.
        end: Window end (receive time), exclusive.
    """

    run_id: str
    speed: float = 1.0
    time_mode: Literal["keep", "shift", "scale"] = "shift"
    live: bool = False
    keep_retain: bool = False
    start: float = -math.inf
    end: float = math.inf


@dataclass(slots=True)
class ReplayResult:
    """What a replay did."""

    published: int = 0
    shifted: int = 0
    unshifted: int = 0
    skipped: int = 0
    paused_s: float = 0.0
    elapsed_s: float = 0.0
    stopped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Replayer:
    """Paces recorded messages onto a publisher.

    Args:
        options: How to replay.
        publisher: A connected publisher.
        control: Pause/resume/stop from outside.
        clock: Wall clock, epoch seconds.
        progress: Called with (seconds of recording done, messages published).
    """

    def __init__(
        self,
        options: ReplayOptions,
        publisher: MqttPublisher,
        *,
        control: PauseControl | None = None,
        clock: Callable[[], float] = time.time,
        progress: Callable[[float, int], None] | None = None,
    ) -> None:
        self.options = options
        self._publisher = publisher
        self.control = control or PauseControl()
        self._clock = clock
        self._progress = progress
        marker = DRILL_PROPERTY if options.live else REPLAY_PROPERTY
        self._user = ((marker, options.run_id),)
        self._props: dict[str | None, Any] = {}

    def _properties(self, content_type: str | None) -> Any:
        props = self._props.get(content_type)
        if props is None:
            props = self._props[content_type] = publish_properties(content_type, self._user)
        return props

    def run(self, messages: Iterable[RecordedMessage]) -> ReplayResult:
        """Replay ``messages`` (in recording order) inside the window."""
        opts = self.options
        result = ReplayResult()
        control = self.control
        first_t: float | None = None
        wall0 = 0.0
        mapping: TimeMapping | None = None if opts.time_mode != "keep" else TimeMapping("keep")
        started = self._clock()
        last_progress = 0.0
        for message in messages:
            if message.t < opts.start or message.t >= opts.end:
                result.skipped += 1
                if message.t >= opts.end:
                    break
                continue
            if control.stopped.is_set():
                result.stopped = True
                break
            if first_t is None:
                first_t, wall0 = message.t, self._clock()
            due = wall0 + (message.t - first_t) / opts.speed if opts.speed > 0 else self._clock()
            # Wait for the message's time in slices, so a pause or a stop that
            # arrives during a long gap takes effect at once, not after it.
            while not control.stopped.is_set():
                if control.paused:
                    paused_at = self._clock()
                    while control.paused and not control.stopped.is_set():
                        self._publisher.wait(0.2)  # keep the connection alive while paused
                    pause = self._clock() - paused_at
                    result.paused_s += pause
                    wall0 += pause
                    due += pause
                    continue
                delay = due - self._clock()
                if delay <= 0.002:
                    break
                self._publisher.wait(min(delay, _WAIT_SLICE_S))
            if control.stopped.is_set():
                result.stopped = True
                break
            payload = message.payload
            if mapping is None:
                ts = message_timestamp(payload, message.content_type)
                if ts is not None:
                    mapping = TimeMapping(opts.time_mode, ts, due, opts.speed)
            if mapping is not None and mapping.mode != "keep":
                new = shift_payload_time(payload, message.content_type, mapping)
                if new is None:
                    result.unshifted += 1
                else:
                    payload = new
                    result.shifted += 1
            self._publisher.publish(
                rewrite_topic(message.topic, run_id=opts.run_id, live=opts.live),
                payload,
                qos=message.qos,
                retain=message.retain and opts.keep_retain,
                properties=self._properties(message.content_type),
            )
            result.published += 1
            if self._progress is not None and (result.published & 63 == 0):
                now = self._clock()
                if now - last_progress >= 0.25:
                    last_progress = now
                    self._progress(message.t - first_t, result.published)
        self._publisher.drain()
        if self._progress is not None and first_t is not None:
            self._progress(math.inf, result.published)
        result.elapsed_s = self._clock() - started
        return result
