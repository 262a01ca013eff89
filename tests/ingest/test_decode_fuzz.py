"""Property tests: whatever arrives, decoding yields readings, a presence or a DecodeError.

The "internal decoder error" reason marks the safety net of ``decode_message``
(an unexpected exception turned into a DecodeError); reaching it is a bug, so
every property also asserts it never appears.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.decode import SENML_CONTENT_TYPE, DecodeLimits, decode_message
from ingest.errors import DecodeError
from ingest.model import DeviceRef, Presence, Reading
from ingest.senml import decode_pack

NOW = 1_700_000_000.0
TOPIC = "city/traffic/centre/loop-17"
STATUS = TOPIC + "/status"
DEVICE = DeviceRef("traffic", "centre", "loop-17")
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9:./_-]{0,40}"

FAST = settings(max_examples=800, deadline=None)
STRUCTURED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decoded(
    result: list[Reading] | Presence, topic: str, limits: DecodeLimits, received_at: float
) -> None:
    """The invariants of a successful decode."""
    if isinstance(result, Presence):
        assert topic.endswith("/status")
        assert result.state in ("online", "offline")
        assert result.session >= 0
        return
    assert result
    for reading in result:
        assert type(reading) is Reading
        assert math.isfinite(reading.ts)
        assert (reading.value is None) != (reading.state is None)
        if reading.value is not None:
            assert math.isfinite(reading.value)
        if reading.state is not None:
            assert len(reading.state) <= limits.max_state_len
        assert received_at - limits.max_past_s <= reading.ts <= received_at + limits.max_future_s


def decode_or_reject(
    topic: str,
    payload: bytes,
    *,
    content_type: str | None = None,
    limits: DecodeLimits | None = None,
    received_at: float = NOW,
) -> list[Reading] | Presence | DecodeError:
    limits = limits or DecodeLimits()
    try:
        result = decode_message(
            topic, payload, received_at=received_at, content_type=content_type, limits=limits
        )
    except DecodeError as exc:
        error = exc
    else:
        check_decoded(result, topic, limits, received_at)
        return result
    reason = str(error)
    assert reason
    assert "internal decoder error" not in reason
    return error


# --- raw input -----------------------------------------------------------------------

content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [SENML_CONTENT_TYPE, "application/json", "text/plain", "application/senml+cbor", ""]
    ),
    st.text(max_size=40),
)


@FAST
@given(payload=st.binary(max_size=2_000), topic=st.sampled_from([TOPIC, STATUS]))
def test_any_bytes(payload: bytes, topic: str) -> None:
    decode_or_reject(topic, payload)


@FAST
@given(topic=st.text(max_size=200), payload=st.sampled_from([b'{"a": 1}', b"[]", b"{}"]))
def test_any_topic(topic: str, payload: bytes) -> None:
    decode_or_reject(topic, payload)


topic_parts = st.one_of(
    st.sampled_from(
        ["city", "traffic", "facility", "emergency", "status", "d-1", "x7", "", "A", "+", "#"]
    ),
    st.text(max_size=4),
)


@FAST
@given(parts=st.lists(topic_parts, max_size=7), content_type=content_types)
def test_near_valid_topics_and_content_types(parts: list[str], content_type: str | None) -> None:
    decode_or_reject("/".join(parts), b'{"a": 1}', content_type=content_type)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)


@FAST
@given(value=json_values, topic=st.sampled_from([TOPIC, STATUS]), content_type=content_types)
def test_any_json(value: Any, topic: str, content_type: str | None) -> None:
    # json.dumps writes NaN / Infinity literals and huge integers: orjson must reject or cope.
    payload = json.dumps(value).encode()
    decode_or_reject(topic, payload, content_type=content_type)


# --- near-valid SenML packs ---------------------------------------------------------------

numbers = st.one_of(
    st.floats(),
    st.floats(min_value=-1e6, max_value=1e6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([NOW, NOW - 10, -5, 0, 2**28, 2**28 - 1, 1e308, -1e308, 10**400]),
)
wrong = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
names = st.one_of(st.from_regex(NAME_PATTERN, fullmatch=True), st.text(max_size=12))
short_text = st.text(max_size=80)
record_fields: dict[str, st.SearchStrategy[Any]] = {
    "bn": st.one_of(names, st.just(""), wrong),
    "bt": st.one_of(numbers, wrong),
    "bu": st.one_of(st.sampled_from(["Cel", "m/s", "%RH", ""]), short_text, wrong),
    "bv": st.one_of(numbers, wrong),
    "bs": st.one_of(numbers, wrong),
    "bver": st.one_of(st.integers(min_value=-2, max_value=12), wrong, numbers),
    "n": st.one_of(names, wrong),
    "u": st.one_of(st.sampled_from(["V", "A", "/"]), short_text, wrong),
    "v": st.one_of(numbers, wrong),
    "vs": st.one_of(short_text, wrong),
    "vb": st.one_of(st.booleans(), wrong),
    "vd": st.one_of(short_text, wrong),
    "s": st.one_of(numbers, wrong),
    "t": st.one_of(numbers, wrong),
    "ut": st.one_of(numbers, wrong),
}
units = st.sampled_from(["Cel", "m/s", "%RH", "/", "km/h", ""])
small_numbers = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6), st.integers(min_value=-(10**6), max_value=10**6)
)
valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "bn": st.one_of(st.just(""), st.from_regex(NAME_PATTERN, fullmatch=True)),
    "bt": st.one_of(st.floats(min_value=NOW - 3600, max_value=NOW + 60), st.floats(-3600, 0)),
    "bu": units,
    "bv": small_numbers,
    "bs": small_numbers,
    "bver": st.just(10),
    "t": st.floats(min_value=-600, max_value=60),
    "ut": st.floats(min_value=0, max_value=3600),
    "u": units,
}
value_fields: dict[str, st.SearchStrategy[Any]] = {
    "v": small_numbers,
    "vs": st.text(max_size=20),
    "vb": st.booleans(),
    "vd": st.from_regex(r"[A-Za-z0-9_-]{0,20}", fullmatch=True),
    "s": small_numbers,
}
mutants = st.one_of(
    wrong,
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 2**70, 2**28, -(10**400)]),
    numbers,
)


@st.composite
def senml_records(draw: st.DrawFn) -> Any:
    """A valid record, then in half the cases one or two mutations of it."""
    if draw(st.integers(0, 29)) == 0:
        return draw(json_values)  # not a record at all
    record: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {"n": st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)}, optional=valid_fields
        )
    )
    value_label = draw(st.sampled_from(sorted(value_fields)))
    record[value_label] = draw(value_fields[value_label])
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            label = draw(st.sampled_from([*record_fields, "l", "x_", "custom"]))
            if label in record and draw(st.booleans()):
                del record[label]
            else:
                record[label] = draw(st.one_of(mutants, record_fields.get(label, json_scalars)))
    return record


senml_packs = st.lists(senml_records(), max_size=8)
limits_strategy = st.builds(
    DecodeLimits,
    max_records=st.integers(1, 10),
    max_state_len=st.integers(1, 80),
    max_past_s=st.sampled_from([0.0, 60.0, 30 * 86_400.0, 1e12]),
    max_future_s=st.sampled_from([0.0, 600.0, 1e12]),
)


@STRUCTURED
@given(pack=senml_packs, received_at=st.sampled_from([NOW, 0.0, 1e12]))
@example(pack=[{"n": "a", "v": 10**400}], received_at=NOW)
@example(pack=[{"n": "a", "t": -(10**400), "v": 1}], received_at=NOW)
@example(pack=[{"n": "a", "v": math.nan}], received_at=NOW)
@example(pack=[{"n": "a", "v": 1, "bver": -(10**5000)}], received_at=NOW)
@example(pack=[{"n": "a", "vs": 10**5000}], received_at=NOW)
def test_near_valid_senml_objects(pack: list[Any], received_at: float) -> None:
    # Python objects straight in: real NaN floats and integers beyond the double range.
    try:
        result = decode_pack(pack, DEVICE, received_at=received_at)
    except DecodeError as exc:
        error = exc
    else:
        no_bounds = DecodeLimits(max_past_s=math.inf, max_future_s=math.inf)
        check_decoded(result, TOPIC, no_bounds, received_at)
        return
    assert str(error).startswith(("record ", "SenML pack"))


@STRUCTURED
@given(
    pack=senml_packs,
    limits=st.one_of(st.just(DecodeLimits()), limits_strategy),
    content_type=content_types,
)
def test_near_valid_senml_messages(
    pack: list[Any], limits: DecodeLimits, content_type: str | None
) -> None:
    decode_or_reject(TOPIC, json.dumps(pack).encode(), content_type=content_type, limits=limits)


# --- near-valid flat objects and presences --------------------------------------------------

timestamps = st.one_of(
    numbers,
    st.sampled_from(
        [
            "2023-11-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.123+01:00",
            "2023-13-01T00:00:00Z",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59-23:59",
            "",
        ]
    ),
    st.from_regex(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?",
        fullmatch=True,
    ),
    wrong,
)
valid_flat_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
    st.text(max_size=64),
)
channel_names = st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda name: name != "ts")


@st.composite
def rfc3339_near_now(draw: st.DrawFn) -> str:
    ts = draw(st.floats(min_value=NOW - 40 * 86_400, max_value=NOW + 1_200))
    hours = draw(st.integers(min_value=-12, max_value=14))
    stamp = datetime.fromtimestamp(ts, timezone(timedelta(hours=hours))).isoformat()
    if hours == 0 and draw(st.booleans()):
        stamp = stamp.replace("+00:00", draw(st.sampled_from(["Z", "z"])))
    return stamp


@st.composite
def flat_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid flat object, then in half the cases one or two mutations of it."""
    doc: dict[str, Any] = draw(st.dictionaries(channel_names, valid_flat_values, max_size=5))
    if draw(st.booleans()):
        doc["ts"] = draw(
            st.one_of(
                st.floats(min_value=NOW - 40 * 86_400, max_value=NOW + 1_200), rfc3339_near_now()
            )
        )
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            key = draw(st.one_of(st.just("ts"), names, st.sampled_from(sorted(doc) or ["x"])))
            if key in doc and draw(st.booleans()):
                del doc[key]
            else:
                doc[key] = draw(st.one_of(mutants, timestamps, json_values))
    return doc


@STRUCTURED
@given(doc=flat_objects(), limits=st.one_of(st.just(DecodeLimits()), limits_strategy))
def test_near_valid_flat_objects(doc: dict[str, Any], limits: DecodeLimits) -> None:
    decode_or_reject(TOPIC, json.dumps(doc).encode(), limits=limits)


@STRUCTURED
@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "state": st.one_of(st.sampled_from(["online", "offline", "Online"]), wrong),
            "session": st.one_of(st.integers(min_value=-5, max_value=2**64), numbers, wrong),
            "ts": numbers,
        },
    )
)
def test_near_valid_presence(doc: dict[str, Any]) -> None:
    result = decode_or_reject(STATUS, json.dumps(doc).encode())
    if isinstance(result, Presence):
        assert result == Presence(DEVICE, doc["state"], doc["session"], NOW)


# --- round trips ---------------------------------------------------------------------------


def expected_value(raw: float | bool | str) -> tuple[float | None, str | None]:
    if isinstance(raw, str):
        return None, raw
    if isinstance(raw, bool):
        return (1.0 if raw else 0.0), None
    return float(raw), None


@STRUCTURED
@given(
    channels=st.dictionaries(channel_names, valid_flat_values, min_size=1, max_size=8),
    ts=st.one_of(st.none(), st.floats(min_value=NOW - 30 * 86_400, max_value=NOW + 600)),
)
def test_flat_round_trip(channels: dict[str, float | bool | str], ts: float | None) -> None:
    doc: dict[str, Any] = dict(channels) if ts is None else {"ts": ts, **channels}
    result = decode_message(TOPIC, orjson.dumps(doc), received_at=NOW)
    expected_ts = NOW if ts is None else ts
    assert result == [
        Reading(DEVICE, channel, expected_ts, *expected_value(raw), None)
        for channel, raw in channels.items()
    ]


@STRUCTURED
@given(
    records=st.lists(
        st.tuples(
            channel_names,
            st.floats(min_value=NOW - 86_400, max_value=NOW + 600),
            st.floats(allow_nan=False, allow_infinity=False),
            st.one_of(st.none(), st.sampled_from(["Cel", "m/s", "%RH", "/"])),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_resolved_senml_round_trip(records: list[tuple[str, float, float, str | None]]) -> None:
    pack = [
        {"n": name, "t": t, "v": v, **({"u": unit} if unit else {})} for name, t, v, unit in records
    ]
    result = decode_message(
        TOPIC, orjson.dumps(pack), received_at=NOW, content_type=SENML_CONTENT_TYPE
    )
    assert result == [Reading(DEVICE, name, t, v, None, unit) for name, t, v, unit in records]
