"""Payload encodings (DESIGN.md, fixed): SenML JSON, flat JSON and presence.

* SenML (RFC 8428): one record per channel; the first carries ``bt`` (the
  device time), every record its name ``n`` (the channel, no base name, so
  the resolved name is the channel), unit ``u``, one of ``v``/``vb``/``vs``
  and ``ut`` (the reporting period, so staleness can be judged). Published
  with the MQTT 5 content type ``application/senml+json``.
* Flat JSON: ``{"ts": <epoch seconds>, "<channel>": value, …}``.
* Presence: ``{"state": "online"|"offline", "session": N}``, retained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from simulators.generators import Value
from simulators.model import ChannelSpec, Encoding

__all__ = [
    "JSON_CONTENT_TYPE",
    "SENML_CONTENT_TYPE",
    "content_type_for",
    "encode_reading",
    "presence_payload",
]

SENML_CONTENT_TYPE: Final = "application/senml+json"
JSON_CONTENT_TYPE: Final = "application/json"


def content_type_for(encoding: Encoding) -> str:
    """The MQTT 5 content type that goes with an encoding."""
    return SENML_CONTENT_TYPE if encoding == "senml" else JSON_CONTENT_TYPE


def encode_reading(
    channels: Sequence[ChannelSpec],
    values: Sequence[Value],
    ts: float,
    *,
    encoding: Encoding,
    period_s: float,
) -> bytes:
    """Encode one report of a device.

    Args:
        channels: The kind's channels, in the order of ``values``.
        values: One value per channel: a number, a bool or a state string.
        ts: Device time, epoch seconds (rounded to milliseconds).
        encoding: ``senml`` or ``json``.
        period_s: The reporting period, sent as SenML ``ut``.

    Returns:
        The payload bytes (compact JSON, deterministic for equal inputs).
    """
    ts = round(ts, 3)
    if encoding == "json":
        flat: dict[str, Any] = {"ts": ts}
        for channel, value in zip(channels, values, strict=True):
            flat[channel.name] = value
        return orjson.dumps(flat)
    records: list[dict[str, Any]] = []
    ut = round(period_s, 3)
    for channel, value in zip(channels, values, strict=True):
        record: dict[str, Any] = {"bt": ts} if not records else {}
        record["n"] = channel.name
        if channel.unit is not None:
            record["u"] = channel.unit
        if isinstance(value, bool):
            record["vb"] = value
        elif isinstance(value, str):
            record["vs"] = value
        else:
            record["v"] = value
        record["ut"] = ut
        records.append(record)
    return orjson.dumps(records)


def presence_payload(state: str, session: int) -> bytes:
    """The retained presence payload ``{"state": …, "session": N}``."""
    return orjson.dumps({"state": state, "session": session})
