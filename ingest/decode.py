"""One MQTT message in, typed readings or a presence out: the pure decoding core.

:func:`decode_message` is the single entry point of the ingest pipeline. It
parses the payload once (orjson) and never raises anything but
:class:`~ingest.errors.DecodeError`, whose text is the dead-letter reason.

Order of the checks: the topic scheme; the payload size; the content type; the
JSON parse; then, on a ``…/status`` topic, the presence payload; on a readings
topic, SenML (content type ``application/senml+json`` or a JSON array) or the
flat object ``{"ts": …, "<channel>": <number|bool|string>, …}``; last, the time
bounds of every reading.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import orjson

from ingest.errors import DecodeError
from ingest.model import DeviceRef, Presence, Reading
from ingest.senml import (
    decode_pack,
    invalid_name_reason,
    json_type,
    new_reading,
    time_bounds_reason,
)
from ingest.topics import parse_topic

__all__ = ["DEFAULT_LIMITS", "SENML_CONTENT_TYPE", "DecodeLimits", "decode_message"]

SENML_CONTENT_TYPE: Final = "application/senml+json"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds on what one message may contain; breaking one dead-letters the message."""

    max_payload_bytes: int = 65_536
    max_records: int = 1_000
    max_state_len: int = 64
    max_past_s: float = 30 * 86_400
    """Readings older than ``received_at - max_past_s`` are rejected."""
    max_future_s: float = 600.0
    """Readings newer than ``received_at + max_future_s`` are rejected."""

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_records", "max_state_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                # Typically ``DecodeLimits.max_records`` used as a default: on a
                # slotted dataclass that is the slot descriptor, not the number.
                msg = (
                    f"DecodeLimits.{name} must be an int, got {value!r}"
                    f" (for the default use DEFAULT_LIMITS.{name})"
                )
                raise TypeError(msg)
            if value < 1:
                msg = f"DecodeLimits.{name} must be at least 1, got {value}"
                raise ValueError(msg)
        for name in ("max_past_s", "max_future_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                msg = (
                    f"DecodeLimits.{name} must be a number, got {value!r}"
                    f" (for the default use DEFAULT_LIMITS.{name})"
                )
                raise TypeError(msg)
            if not value >= 0:  # also rejects NaN
                msg = f"DecodeLimits.{name} must be >= 0, got {value}"
                raise ValueError(msg)


DEFAULT_LIMITS: Final = DecodeLimits()

_MISSING: Final = object()
_PRESENCE_STATES: Final[dict[str, Literal["online", "offline"]]] = {
    "online": "online",
    "offline": "offline",
}
_PRESENCE_KEYS: Final = frozenset(("state", "session"))
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,30})?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)
_content_types: dict[str, bool] = {}  # media type as sent -> is it SenML; small and bounded
_CONTENT_TYPE_CACHE_MAX: Final = 64


def _is_senml_content_type(content_type: str) -> bool:
    """Whether a (non-empty) content type selects SenML; DecodeError if not JSON."""
    known = _content_types.get(content_type)
    if known is not None:
        return known
    media = content_type.split(";", 1)[0].strip().lower()
    if media == SENML_CONTENT_TYPE:
        is_senml = True
    elif media == "application/json" or media.endswith("+json"):
        is_senml = False
    else:
        msg = (
            f"unsupported content type {content_type[:80]!r}"
            f" (expected {SENML_CONTENT_TYPE} or another JSON type)"
        )
        raise DecodeError(msg)
    if len(_content_types) < _CONTENT_TYPE_CACHE_MAX:
        _content_types[content_type] = is_senml
    return is_senml


def _decode_presence(doc: Any, device: DeviceRef, received_at: float) -> Presence:
    if type(doc) is not dict:
        msg = f"presence payload must be a JSON object, got {json_type(doc)}"
        raise DecodeError(msg)
    if doc.keys() != _PRESENCE_KEYS:
        missing = sorted(_PRESENCE_KEYS - doc.keys())
        extra = sorted(repr(key[:40]) for key in doc.keys() - _PRESENCE_KEYS)
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        msg = f"presence payload must be {{'state', 'session'}}: {'; '.join(problems)}"
        raise DecodeError(msg)
    raw_state = doc["state"]
    state = _PRESENCE_STATES.get(raw_state) if type(raw_state) is str else None
    if state is None:
        msg = f"presence 'state' must be 'online' or 'offline', got {json_type(raw_state)}"
        raise DecodeError(msg)
    session = doc["session"]
    if type(session) is not int or session < 0:
        msg = f"presence 'session' must be an integer >= 0, got {json_type(session)}"
        raise DecodeError(msg)
    return Presence(device, state, session, received_at)


def _flat_time(raw: object) -> float:
    """The flat form's ``ts``: epoch seconds or an RFC 3339 date-time with offset."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        ts = float(raw)
        if not math.isfinite(ts):
            msg = f"'ts' is {ts}"
            raise DecodeError(msg)
        return ts
    if not isinstance(raw, str):
        msg = f"'ts' must be epoch seconds or an RFC 3339 string, got {json_type(raw)}"
        raise DecodeError(msg)
    text = raw
    match = _RFC3339.fullmatch(text)
    if match is None:
        msg = f"'ts' {text[:40]!r} is not an RFC 3339 date-time"
        raise DecodeError(msg)
    offset = match.group(1)
    if offset is None:
        msg = f"'ts' {text!r} has no UTC offset (add 'Z' or '+hh:mm')"
        raise DecodeError(msg)
    if offset in "Zz":
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text[:10] + "T" + text[11:]).timestamp()
    except (ValueError, OverflowError) as exc:
        msg = f"'ts' {raw!r} is not a valid date-time: {exc}"
        raise DecodeError(msg) from exc


def _decode_flat(
    doc: dict[str, Any], device: DeviceRef, received_at: float, limits: DecodeLimits
) -> list[Reading]:
    raw_ts = doc.get("ts", _MISSING)
    if raw_ts is _MISSING:
        ts = received_at
    else:
        ts = _flat_time(raw_ts)
        if not received_at - limits.max_past_s <= ts <= received_at + limits.max_future_s:
            reason = time_bounds_reason(
                ts,
                received_at=received_at,
                max_past_s=limits.max_past_s,
                max_future_s=limits.max_future_s,
            )
            msg = f"'ts': {reason or f'time {ts} is out of bounds'}"
            raise DecodeError(msg)
    make = new_reading
    isfinite = math.isfinite
    readings: list[Reading] = []
    for channel, raw in doc.items():
        if channel == "ts":
            continue
        reason = invalid_name_reason(channel)
        if reason is not None:
            msg = f"channel {channel[:40]!r}: {reason}"
            raise DecodeError(msg)
        kind = type(raw)
        if kind is float:
            if not isfinite(raw):
                msg = f"channel {channel!r}: value is {raw}"
                raise DecodeError(msg)
            readings.append(make(device, channel, ts, raw, None, None, None))
        elif kind is int:
            readings.append(make(device, channel, ts, float(raw), None, None, None))
        elif kind is bool:
            readings.append(make(device, channel, ts, 1.0 if raw else 0.0, None, None, None))
        elif kind is str:
            if len(raw) > limits.max_state_len:
                msg = (
                    f"channel {channel!r}: string value is {len(raw)} characters long, more"
                    f" than max_state_len={limits.max_state_len}"
                )
                raise DecodeError(msg)
            readings.append(make(device, channel, ts, None, raw, None, None))
        else:
            msg = (
                f"channel {channel!r}: value must be a number, boolean or string,"
                f" got {json_type(raw)}"
            )
            raise DecodeError(msg)
    if not readings:
        msg = "flat JSON object has no channel besides 'ts'"
        raise DecodeError(msg)
    return readings


def decode_message(
    topic: str,
    payload: bytes,
    *,
    received_at: float,
    content_type: str | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> list[Reading] | Presence:
    """Decode one MQTT message of a device topic.

    Args:
        topic: ``city/{domain}/{district}/{device_id}`` (readings) or the
            same followed by ``/status`` (presence).
        payload: The raw message body.
        received_at: Receive time, epoch seconds: the time of readings
            without a device time, the base of relative SenML times, the
            reference of the time bounds and the time of a presence.
        content_type: The MQTT 5 content type, if the publisher set one.
            ``application/senml+json`` requires SenML; other JSON types (and
            none) select the encoding by the payload's shape.
        limits: Size, count, length and time bounds.

    Returns:
        The readings of a readings topic (never empty), or the presence of a
        status topic.

    Raises:
        DecodeError: The message cannot be stored; the text is the reason.
            No other exception escapes, whatever the input.
    """
    try:
        device, is_status = parse_topic(topic)
        size = len(payload)
        if size > limits.max_payload_bytes:
            msg = f"payload of {size} bytes exceeds max_payload_bytes={limits.max_payload_bytes}"
            raise DecodeError(msg)
        wants_senml = False
        if content_type:
            wants_senml = content_type == SENML_CONTENT_TYPE or _is_senml_content_type(content_type)
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            msg = f"payload is not valid JSON: {exc}"
            raise DecodeError(msg) from exc
        if is_status:
            return _decode_presence(doc, device, received_at)
        kind = type(doc)
        if kind is list:
            return decode_pack(
                doc,
                device,
                received_at=received_at,
                max_records=limits.max_records,
                max_state_len=limits.max_state_len,
                max_past_s=limits.max_past_s,
                max_future_s=limits.max_future_s,
            )
        if kind is dict:
            if wants_senml:
                msg = f"content type {SENML_CONTENT_TYPE} requires a JSON array, got object"
                raise DecodeError(msg)
            return _decode_flat(doc, device, received_at, limits)
        msg = (
            "unknown encoding: a readings payload is a JSON array (SenML) or object (flat),"
            f" got {json_type(doc)}"
        )
        raise DecodeError(msg)
    except DecodeError:
        raise
    except Exception as exc:
        # The contract is "DecodeError or a result" for any input, so that one
        # bad message is dead-lettered instead of stopping ingest. Reaching
        # this is a decoder bug: the reason says so and the cause is chained.
        msg = f"internal decoder error (bug) on this message: {repr(exc)[:300]}"
        raise DecodeError(msg) from exc
