"""decode_message: topics, flat objects, presence, limits and content-type dispatch."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

import ingest.decode
from ingest.decode import DEFAULT_LIMITS, SENML_CONTENT_TYPE, DecodeLimits, decode_message
from ingest.errors import DecodeError
from ingest.model import DeviceRef, Presence, Reading
from ingest.topics import parse_topic

NOW = 1_700_000_000.0
TOPIC = "city/traffic/centre/loop-17"
STATUS = TOPIC + "/status"
DEVICE = DeviceRef("traffic", "centre", "loop-17")


def decode(payload: Any, topic: str = TOPIC, **kwargs: Any) -> list[Reading] | Presence:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    kwargs.setdefault("received_at", NOW)
    return decode_message(topic, raw, **kwargs)


def readings(payload: Any, **kwargs: Any) -> list[Reading]:
    result = decode(payload, **kwargs)
    assert isinstance(result, list)
    return result


def rejects(payload: Any, match: str, **kwargs: Any) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(payload, **kwargs)


# --- topics --------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["traffic", "facility", "emergency"])
def test_valid_readings_topic(domain: str) -> None:
    device, is_status = parse_topic(f"city/{domain}/d-1/dev-0")
    assert device == DeviceRef(domain, "d-1", "dev-0")  # type: ignore[arg-type]
    assert is_status is False


def test_valid_status_topic() -> None:
    assert parse_topic(STATUS) == (DEVICE, True)


def test_segments_of_64_characters() -> None:
    long = "a" * 64
    assert parse_topic(f"city/facility/{long}/{long}")[0].device_id == long


@pytest.mark.parametrize(
    ("topic", "match"),
    [
        ("town/traffic/centre/x", "not of the form city/"),
        ("city/traffic/centre", "not of the form city/"),
        ("city/traffic", "not of the form city/"),
        ("city", "not of the form city/"),
        ("", "not of the form city/"),
        ("city/traffic/centre/x/status/extra", "not of the form city/"),
        ("/city/traffic/centre/x", "not of the form city/"),
        ("City/traffic/centre/x", "not of the form city/"),
        ("city/traffic/centre/x/config", "unknown sub-topic 'config'"),
        ("city/traffic/centre/x/", "unknown sub-topic ''"),
        ("city/weather/centre/x", "unknown domain 'weather'"),
        ("city/Traffic/centre/x", "unknown domain 'Traffic'"),
        ("city/traffic//x", "district is empty"),
        ("city/traffic/centre/", "device_id is empty"),
        ("city/traffic/Centre/x", "district 'Centre' has characters outside"),
        ("city/traffic/centre/x_1", "device_id 'x_1' has characters outside"),
        ("city/traffic/centre/x.1", "device_id 'x.1' has characters outside"),
        ("city/traffic/cent re/x", "district 'cent re' has characters outside"),
        ("city/traffic/+/x", r"district '\+' has characters outside"),
        ("city/traffic/centre/#", "device_id '#' has characters outside"),
        ("city/traffic/centre/é", "device_id 'é' has characters outside"),
        ("city/traffic/centre/" + "a" * 65, "device_id 'a+' is longer than 64"),
        ("city/traffic/" + "b" * 65 + "/x", "district 'b+' is longer than 64"),
        ("cityops/alerts/a1/x", "not of the form city/"),
    ],
)
def test_invalid_topics(topic: str, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as caught:
        parse_topic(topic)
    assert str(caught.value).startswith("topic ")
    with pytest.raises(DecodeError, match=match):
        decode({"a": 1}, topic=topic)


def test_huge_topic_is_cut_short_in_the_reason() -> None:
    topic = "city/traffic/centre/" + "x" * 10_000
    with pytest.raises(DecodeError, match="longer than the") as caught:
        parse_topic(topic)
    assert len(str(caught.value)) < 300
    assert "10020 chars" in str(caught.value)


def test_parsed_topics_are_cached() -> None:
    topic = "city/emergency/harbour/siren-42"
    first = parse_topic(topic)
    hits = parse_topic.cache_info().hits
    assert parse_topic(topic) is first
    assert parse_topic.cache_info().hits == hits + 1
    assert parse_topic.cache_info().maxsize == 200_000


def test_rejected_topics_are_not_cached() -> None:
    size = parse_topic.cache_info().currsize
    for _ in range(2):
        with pytest.raises(DecodeError):
            parse_topic("city/traffic/centre/BAD")
    assert parse_topic.cache_info().currsize == size


def test_topic_is_checked_before_the_payload() -> None:
    with pytest.raises(DecodeError, match=r"^topic "):
        decode_message("bad/topic", b"x" * 100_000, received_at=NOW)


# --- flat JSON objects ------------------------------------------------------------


def test_flat_object_with_every_value_type() -> None:
    payload = {
        "ts": NOW - 2,
        "intensity": 12,
        "occupancy": 0.31,
        "open": True,
        "closed": False,
        "mode": "alarm",
    }
    assert readings(payload) == [
        Reading(DEVICE, "intensity", NOW - 2, 12.0, None, None),
        Reading(DEVICE, "occupancy", NOW - 2, 0.31, None, None),
        Reading(DEVICE, "open", NOW - 2, 1.0, None, None),
        Reading(DEVICE, "closed", NOW - 2, 0.0, None, None),
        Reading(DEVICE, "mode", NOW - 2, None, "alarm", None),
    ]


def test_flat_integer_values_become_floats() -> None:
    (reading,) = readings({"count": 3})
    assert type(reading.value) is float


def test_flat_without_ts_uses_the_receive_time() -> None:
    assert readings({"speed": 42.5}) == [Reading(DEVICE, "speed", NOW, 42.5, None, None)]


def test_flat_ts_may_come_anywhere() -> None:
    assert [r.ts for r in readings({"a": 1, "ts": NOW - 1, "b": 2})] == [NOW - 1, NOW - 1]


def test_flat_integer_ts() -> None:
    assert readings({"ts": int(NOW) - 5, "a": 1})[0].ts == NOW - 5


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T22:13:20z", NOW),
        ("2023-11-14t22:13:20Z", NOW),
        ("2023-11-14 22:13:20Z", NOW),
        ("2023-11-14T22:13:20+00:00", NOW),
        ("2023-11-14T23:13:20+01:00", NOW),
        ("2023-11-14T17:13:20-05:00", NOW),
        ("2023-11-14T22:13:19.5Z", NOW - 0.5),
        ("2023-11-14T22:13:19.250000Z", NOW - 0.75),
        ("2023-11-14T22:13:19.123456789Z", NOW - 1 + 0.123456),
    ],
)
def test_flat_rfc3339_ts(text: str, expected: float) -> None:
    assert readings({"ts": text, "a": 1})[0].ts == pytest.approx(expected, abs=1e-6)


def test_flat_rfc3339_round_trip() -> None:
    assert readings({"ts": rfc3339(NOW - 10.25), "a": 1})[0].ts == NOW - 10.25


@pytest.mark.parametrize(
    ("ts", "match"),
    [
        ("2023-11-14T22:13:20", "has no UTC offset"),
        ("2023-11-14 22:13:20.5", "has no UTC offset"),
        ("2023-11-14", "is not an RFC 3339 date-time"),
        ("20231114T221320Z", "is not an RFC 3339 date-time"),
        ("2023-W46-2T22:13:20Z", "is not an RFC 3339 date-time"),
        ("2023-11-14T22:13Z", "is not an RFC 3339 date-time"),
        ("2023-11-14T22:13:20+0100", "is not an RFC 3339 date-time"),
        ("2023-11-14T22:13:20 +01:00", "is not an RFC 3339 date-time"),
        ("yesterday", "is not an RFC 3339 date-time"),
        ("", "is not an RFC 3339 date-time"),
        ("2023-13-14T22:13:20Z", "is not a valid date-time: month must be in 1..12"),
        ("2023-11-14T24:00:00Z", "is not a valid date-time"),
        ("2023-11-14T22:13:60Z", "is not a valid date-time"),
        ("2023-11-14T22:13:20+24:00", "is not a valid date-time"),
        (True, "'ts' must be epoch seconds or an RFC 3339 string, got true"),
        (None, "'ts' must be epoch seconds or an RFC 3339 string, got null"),
        ([NOW], "'ts' must be epoch seconds or an RFC 3339 string, got array"),
        ({"s": NOW}, "'ts' must be epoch seconds or an RFC 3339 string, got object"),
    ],
)
def test_flat_invalid_ts(ts: Any, match: str) -> None:
    rejects({"ts": ts, "a": 1}, match)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"ts": NOW, "a": {"b": 1}}, "channel 'a': value must be a number, boolean or string"),
        ({"a": [1, 2]}, "channel 'a': value must be .* got array"),
        ({"a": None}, "channel 'a': value must be .* got null"),
        ({"ok": 1, "bad name": 1}, "channel 'bad name': name 'bad name' contains ' '"),
        ({"_x": 1}, "channel '_x': name '_x' must start with a letter or a digit"),
        ({"": 1}, "channel '': name is empty"),
        ({"a" * 129: 1}, "channel 'a+': name .* 129 characters long"),
        ({"ts": NOW}, "flat JSON object has no channel besides 'ts'"),
        ({}, "flat JSON object has no channel besides 'ts'"),
        ({"mode": "x" * 65}, "'mode': string value is 65 characters long, .* max_state_len=64"),
    ],
)
def test_flat_invalid(payload: dict[str, Any], match: str) -> None:
    rejects(payload, match)


def test_flat_string_of_exactly_max_state_len() -> None:
    assert readings({"mode": "x" * 64})[0].state == "x" * 64


def test_flat_large_integers() -> None:
    # orjson keeps integers up to 2**64 - 1 and turns larger ones into floats.
    assert readings(b'{"a": 18446744073709551615}')[0].value == 2.0**64
    assert readings(b'{"a": 123456789012345678901234567890}')[0].value == 1.2345678901234568e29


def test_flat_names_follow_the_senml_rules() -> None:
    assert [r.channel for r in readings({"urn:dev:x/temp_1.max-min": 1})] == [
        "urn:dev:x/temp_1.max-min"
    ]


# --- NaN and infinity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"ts": NaN, "a": 1}',
        b'[{"n": "a", "v": NaN}]',
        b'[{"n": "a", "v": 1e999}]',
        b'[{"n": "a", "t": -Infinity, "v": 1}]',
    ],
)
def test_nan_and_infinity_are_rejected(payload: bytes) -> None:
    rejects(payload, "payload is not valid JSON")


def test_nan_made_by_the_json_module_is_rejected() -> None:
    rejects(json.dumps({"a": float("nan")}).encode(), "payload is not valid JSON")


# --- presence ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["online", "offline"])
def test_presence(state: str) -> None:
    result = decode({"state": state, "session": 7}, topic=STATUS)
    assert result == Presence(DEVICE, state, 7, NOW)  # type: ignore[arg-type]


def test_presence_session_zero_and_large() -> None:
    assert decode({"state": "online", "session": 0}, topic=STATUS) == Presence(
        DEVICE, "online", 0, NOW
    )
    big = 2**63
    assert decode({"state": "online", "session": big}, topic=STATUS) == Presence(
        DEVICE, "online", big, NOW
    )


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"state": "away", "session": 1}, "'state' must be 'online' or 'offline', got string"),
        ({"state": "ONLINE", "session": 1}, "'state' must be 'online' or 'offline'"),
        ({"state": 1, "session": 1}, "'state' must be 'online' or 'offline', got number 1"),
        ({"state": None, "session": 1}, "'state' must be 'online' or 'offline', got null"),
        ({"state": "online", "session": -1}, "'session' must be an integer >= 0, got number -1"),
        ({"state": "online", "session": 1.0}, "'session' must be an integer >= 0, got number 1.0"),
        ({"state": "online", "session": True}, "'session' must be an integer >= 0, got true"),
        ({"state": "online", "session": "1"}, "'session' must be an integer >= 0, got string"),
        ({"state": "online"}, r"missing session"),
        ({"session": 1}, r"missing state"),
        ({}, r"missing session, state"),
        ({"state": "online", "session": 1, "ts": 5}, r"unexpected 'ts'"),
        ({"state": "online", "ts": 5}, r"missing session; unexpected 'ts'"),
        ([{"state": "online", "session": 1}], "presence payload must be a JSON object, got array"),
        ("online", "presence payload must be a JSON object, got string"),
        (None, "presence payload must be a JSON object, got null"),
    ],
)
def test_invalid_presence(payload: Any, match: str) -> None:
    rejects(payload, match, topic=STATUS)


def test_invalid_presence_json() -> None:
    rejects(b"online", "payload is not valid JSON", topic=STATUS)


# --- size, UTF-8, JSON ---------------------------------------------------------------------


def test_payload_of_exactly_the_limit_is_accepted() -> None:
    body = b'{"a": 1}'
    payload = body[:-1] + b" " * (100 - len(body)) + b"}"
    assert len(payload) == 100
    assert len(readings(payload, limits=DecodeLimits(max_payload_bytes=100))) == 1


def test_payload_over_the_limit() -> None:
    payload = b'{"a": 1' + b" " * 94 + b"}"
    assert len(payload) == 102
    rejects(
        payload,
        r"^payload of 102 bytes exceeds max_payload_bytes=101$",
        limits=DecodeLimits(max_payload_bytes=101),
    )


def test_default_size_limit() -> None:
    rejects(b" " * 65_537, "payload of 65537 bytes exceeds max_payload_bytes=65536")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"a": "\xff"}', "payload is not valid JSON: str is not valid UTF-8"),
        (b"\xfe\xff", "payload is not valid JSON"),
        (b'{"\xc3\x28": 1}', "payload is not valid JSON: str is not valid UTF-8"),
        (b'{"a": "\xed\xa0\x80"}', "payload is not valid JSON"),
        (b"", "payload is not valid JSON"),
        (b'{"a": 1', "payload is not valid JSON"),
        (b'{"a": 1,}', "payload is not valid JSON"),
        (b"[1, 2", "payload is not valid JSON"),
        (b"{'a': 1}", "payload is not valid JSON"),
        (b'{"a": 1} {"b": 2}', "payload is not valid JSON"),
    ],
)
def test_invalid_utf8_and_json(payload: bytes, match: str) -> None:
    rejects(payload, match)


def test_non_ascii_strings() -> None:
    assert readings('{"mode": "gestört"}'.encode())[0].state == "gestört"


def test_utf8_byte_order_mark_is_rejected() -> None:
    rejects(b'\xef\xbb\xbf{"a": 1}', "payload is not valid JSON: UTF-8 byte order mark")


# --- time bounds ----------------------------------------------------------------------------


def test_flat_too_old() -> None:
    ts = NOW - DEFAULT_LIMITS.max_past_s - 1
    rejects({"ts": ts, "a": 1}, r"'ts': time .* before the receive time \(max_past_s=2592000\)")


def test_flat_too_new() -> None:
    rejects({"ts": NOW + 601, "a": 1}, r"'ts': time .* after the receive time \(max_future_s=600\)")


def test_flat_in_milliseconds() -> None:
    rejects({"ts": NOW * 1000, "a": 1}, r"milliseconds instead of seconds")


def test_flat_at_the_bounds() -> None:
    assert readings({"ts": NOW - DEFAULT_LIMITS.max_past_s, "a": 1})[0].ts == NOW - 2_592_000
    assert readings({"ts": NOW + 600, "a": 1})[0].ts == NOW + 600


def test_senml_too_old_and_too_new() -> None:
    old = {"n": "a", "t": -31 * 86_400, "v": 1}
    rejects([{"n": "a", "v": 1}, old], r"^record 1: time .*max_past_s=2592000")
    rejects([{"n": "a", "t": 601, "v": 1}], r"^record 0: time .*max_future_s=600")


def test_custom_time_bounds() -> None:
    limits = DecodeLimits(max_past_s=10, max_future_s=0)
    assert readings({"ts": NOW - 10, "a": 1}, limits=limits)[0].ts == NOW - 10
    rejects({"ts": NOW - 11, "a": 1}, r"max_past_s=10\)", limits=limits)
    rejects({"ts": NOW + 0.5, "a": 1}, r"max_future_s=0\)", limits=limits)
    assert readings([{"n": "a", "t": -10, "v": 1}], limits=limits)[0].ts == NOW - 10


def test_rfc_example_times_are_too_old_for_the_default_bounds() -> None:
    pack = [{"bn": "urn:dev:ow:10e2073a01080063", "bt": 1.320067464e09, "bu": "%RH", "v": 20}]
    rejects(pack, r"^record 0: time 1320067464\.000 is .*max_past_s=2592000")


def test_senml_record_and_state_limits() -> None:
    limits = DecodeLimits(max_records=2, max_state_len=3)
    rejects([{"n": "a", "v": 1}] * 3, "more than max_records=2", limits=limits)
    rejects([{"n": "a", "vs": "long"}], "more than max_state_len=3", limits=limits)
    rejects({"a": "long"}, "more than max_state_len=3", limits=limits)


# --- content type and encoding dispatch -----------------------------------------------------

PACK = [{"bn": "loop:", "n": "intensity", "v": 12}]
PACK_READINGS = [Reading(DEVICE, "loop:intensity", NOW, 12.0, None, None)]
FLAT = {"intensity": 12}
FLAT_READINGS = [Reading(DEVICE, "intensity", NOW, 12.0, None, None)]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        SENML_CONTENT_TYPE,
        "application/senml+json; charset=utf-8",
        "Application/SenML+JSON",
        "application/json",
        "application/json; charset=utf-8",
        "application/sensml+json",
        "application/vnd.city+json",
    ],
)
def test_array_is_senml(content_type: str | None) -> None:
    assert readings(PACK, content_type=content_type) == PACK_READINGS


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/json", " application/json ;charset=UTF-8", "application/ld+json"],
)
def test_object_is_flat(content_type: str | None) -> None:
    assert readings(FLAT, content_type=content_type) == FLAT_READINGS


@pytest.mark.parametrize(
    "content_type", [SENML_CONTENT_TYPE, "application/senml+json;charset=utf-8"]
)
def test_senml_content_type_requires_an_array(content_type: str) -> None:
    match = r"content type application/senml\+json requires a JSON array"
    rejects(FLAT, match, content_type=content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/senml+cbor",
        "application/cbor",
        "text/plain",
        "application/octet-stream",
        "application/senml-exi",
        "json",
    ],
)
def test_unsupported_content_types(content_type: str) -> None:
    match = re.escape(f"unsupported content type '{content_type}'")
    rejects(PACK, match, content_type=content_type)


def test_unsupported_content_type_is_reported_before_parsing() -> None:
    rejects(b"\xa1\x00\x01", "unsupported content type", content_type="application/senml+cbor")


@pytest.mark.parametrize(
    ("payload", "got"),
    [(b"12", "number 12"), (b'"text"', "string 'text'"), (b"null", "null"), (b"true", "true")],
)
def test_unknown_encoding(payload: bytes, got: str) -> None:
    rejects(payload, f"^unknown encoding: .* got {got}$")


def test_status_topic_never_decodes_readings() -> None:
    rejects(PACK, "presence payload must be a JSON object", topic=STATUS)
    rejects(FLAT, "presence payload must be", topic=STATUS)


def test_senml_pack_through_decode_message() -> None:
    pack = [
        {"bn": "loop:", "bt": NOW - 60, "bu": "km/h", "n": "speed", "v": 40, "ut": 60},
        {"n": "speed", "t": 30, "v": 42},
        {"n": "jam", "vb": True},
        {"n": "state", "vs": "normal"},
    ]
    assert readings(pack) == [
        Reading(DEVICE, "loop:speed", NOW - 60, 40.0, None, "km/h", 60.0),
        Reading(DEVICE, "loop:speed", NOW - 30, 42.0, None, "km/h", None),
        Reading(DEVICE, "loop:jam", NOW - 60, 1.0, None, "km/h", None),
        Reading(DEVICE, "loop:state", NOW - 60, None, "normal", "km/h", None),
    ]


def test_empty_pack_through_decode_message() -> None:
    rejects([], "SenML pack is empty")


# --- the never-raise contract and the limits object ------------------------------------------


def test_unexpected_exceptions_become_decode_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> list[Reading]:
        msg = "boom"
        raise RuntimeError(msg)

    monkeypatch.setattr(ingest.decode, "decode_pack", broken)
    match = r"internal decoder error \(bug\).*RuntimeError\('boom'\)"
    with pytest.raises(DecodeError, match=match) as caught:
        decode(PACK)
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_payload_bytes": 0}, ValueError, "max_payload_bytes must be at least 1"),
        ({"max_records": -1}, ValueError, "max_records must be at least 1"),
        ({"max_state_len": 0}, ValueError, "max_state_len must be at least 1"),
        ({"max_past_s": -1.0}, ValueError, "max_past_s must be >= 0"),
        ({"max_future_s": float("nan")}, ValueError, "max_future_s must be >= 0"),
        ({"max_records": 2.5}, TypeError, "max_records must be an int"),
        ({"max_past_s": "1"}, TypeError, "max_past_s must be a number"),
        ({"max_payload_bytes": True}, TypeError, "max_payload_bytes must be an int"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DecodeLimits(**kwargs)


def test_class_level_field_is_not_a_default() -> None:
    # On a slotted dataclass, DecodeLimits.max_records is the slot, not 1000.
    slot = vars(DecodeLimits)["max_records"]
    with pytest.raises(TypeError, match=r"for the default use DEFAULT_LIMITS\.max_records"):
        DecodeLimits(max_records=slot)
    assert DEFAULT_LIMITS.max_records == 1_000
