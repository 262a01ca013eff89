"""RFC 8428 SenML resolution and validation, rule by rule.

The first group decodes the RFC's own examples (section 5.1) as test vectors.
Times: readings without an absolute time resolve against ``NOW``, the receive
time; the RFC's examples carry absolute times from 2010/2011, so these tests
run without time bounds unless a test is about them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from ingest.errors import DecodeError
from ingest.model import DeviceRef, Reading
from ingest.senml import (
    RELATIVE_TIME_LIMIT,
    decode_pack,
    invalid_name_reason,
    new_reading,
    time_bounds_reason,
)

NOW = 1_700_000_000.0
DEVICE = DeviceRef("facility", "north-3", "sensor-7")


def decode(pack: Any, **kwargs: Any) -> list[Reading]:
    kwargs.setdefault("received_at", NOW)
    return decode_pack(pack, DEVICE, **kwargs)


def decode_text(text: str, **kwargs: Any) -> list[Reading]:
    """Parse with the standard json module (it keeps NaN, Infinity and huge ints)."""
    return decode(json.loads(text), **kwargs)


def reading(
    channel: str,
    ts: float,
    value: float | None = None,
    *,
    state: str | None = None,
    unit: str | None = None,
    update_period_s: float | None = None,
) -> Reading:
    return Reading(DEVICE, channel, ts, value, state, unit, update_period_s)


def rejects(pack: Any, match: str, **kwargs: Any) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(pack, **kwargs)


# --- RFC 8428 section 5.1 examples -------------------------------------------

OW = "urn:dev:ow:10e2073a01080063"
OW6 = "urn:dev:ow:10e2073a0108006"


def test_rfc_single_datapoint() -> None:
    pack = [{"n": OW, "u": "Cel", "v": 23.1}]
    assert decode(pack) == [reading(OW, NOW, 23.1, unit="Cel")]


def test_rfc_multiple_datapoints() -> None:
    pack = [
        {"bn": OW + ":", "n": "voltage", "u": "V", "v": 120.1},
        {"n": "current", "u": "A", "v": 1.2},
    ]
    assert decode(pack) == [
        reading(OW + ":voltage", NOW, 120.1, unit="V"),
        reading(OW + ":current", NOW, 1.2, unit="A"),
    ]


def test_rfc_multiple_datapoints_with_times() -> None:
    bt = 1.276020076001e09
    pack: list[dict[str, Any]] = [
        {"bn": OW6 + ":", "bt": bt, "bu": "A", "bver": 5, "n": "voltage", "u": "V", "v": 120.1},
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
        {"n": "current", "t": -3, "v": 1.4},
        {"n": "current", "t": -2, "v": 1.5},
        {"n": "current", "t": -1, "v": 1.6},
        {"n": "current", "v": 1.7},
    ]
    readings = decode(pack)
    assert readings[0] == reading(OW6 + ":voltage", bt, 120.1, unit="V")
    assert readings[1:] == [
        reading(OW6 + ":current", bt + dt, value, unit="A")
        for dt, value in [(-5, 1.2), (-4, 1.3), (-3, 1.4), (-2, 1.5), (-1, 1.6), (0, 1.7)]
    ]


MULTIPLE_MEASUREMENTS: list[dict[str, Any]] = [
    {"bn": OW, "bt": 1.320067464e09, "bu": "%RH", "v": 20},
    {"u": "lon", "v": 24.30621},
    {"u": "lat", "v": 60.07965},
    {"t": 60, "v": 20.3},
    {"u": "lon", "t": 60, "v": 24.30622},
    {"u": "lat", "t": 60, "v": 60.07965},
    {"t": 120, "v": 20.7},
    {"u": "lon", "t": 120, "v": 24.30623},
    {"u": "lat", "t": 120, "v": 60.07966},
    {"u": "%EL", "t": 150, "v": 98},
    {"t": 180, "v": 21.2},
    {"u": "lon", "t": 180, "v": 24.30628},
    {"u": "lat", "t": 180, "v": 60.07967},
]

RESOLVED_DATA: list[dict[str, Any]] = [
    {"n": OW, "u": "%RH", "t": 1.320067464e09, "v": 20},
    {"n": OW, "u": "lon", "t": 1.320067464e09, "v": 24.30621},
    {"n": OW, "u": "lat", "t": 1.320067464e09, "v": 60.07965},
    {"n": OW, "u": "%RH", "t": 1.320067524e09, "v": 20.3},
    {"n": OW, "u": "lon", "t": 1.320067524e09, "v": 24.30622},
    {"n": OW, "u": "lat", "t": 1.320067524e09, "v": 60.07965},
    {"n": OW, "u": "%RH", "t": 1.320067584e09, "v": 20.7},
    {"n": OW, "u": "lon", "t": 1.320067584e09, "v": 24.30623},
    {"n": OW, "u": "lat", "t": 1.320067584e09, "v": 60.07966},
    {"n": OW, "u": "%EL", "t": 1.320067614e09, "v": 98},
    {"n": OW, "u": "%RH", "t": 1.320067644e09, "v": 21.2},
    {"n": OW, "u": "lon", "t": 1.320067644e09, "v": 24.30628},
    {"n": OW, "u": "lat", "t": 1.320067644e09, "v": 60.07967},
]


def test_rfc_multiple_measurements() -> None:
    readings = decode(MULTIPLE_MEASUREMENTS)
    assert len(readings) == 13
    assert {r.channel for r in readings} == {OW}
    assert [r.unit for r in readings[:4]] == ["%RH", "lon", "lat", "%RH"]
    assert readings[9] == reading(OW, 1.320067464e09 + 150, 98.0, unit="%EL")
    assert readings[12] == reading(OW, 1.320067464e09 + 180, 60.07967, unit="lat")


def test_rfc_resolved_data_equals_the_unresolved_pack() -> None:
    assert decode(RESOLVED_DATA) == decode(MULTIPLE_MEASUREMENTS)


def test_rfc_multiple_data_types() -> None:
    pack = [
        {"bn": OW + ":", "n": "temp", "u": "Cel", "v": 23.1},
        {"n": "label", "vs": "Machine Room"},
        {"n": "open", "vb": False},
        {"n": "nfc-reader", "vd": "aGkgCg"},
    ]
    assert decode(pack) == [
        reading(OW + ":temp", NOW, 23.1, unit="Cel"),
        reading(OW + ":label", NOW, state="Machine Room"),
        reading(OW + ":open", NOW, 0.0),
        reading(OW + ":nfc-reader", NOW, state="aGkgCg"),
    ]


def test_rfc_collection_of_resources() -> None:
    # The last record uses the base name of the 3rd record and the base time of the 1st.
    bt = 1.320078429e09
    pack = [
        {"bn": "2001:db8::2/", "bt": bt, "n": "temperature", "u": "Cel", "v": 25.2},
        {"n": "humidity", "u": "%RH", "v": 30},
        {"bn": "2001:db8::1/", "n": "temperature", "u": "Cel", "v": 12.3},
        {"n": "humidity", "u": "%RH", "v": 67},
    ]
    assert decode(pack) == [
        reading("2001:db8::2/temperature", bt, 25.2, unit="Cel"),
        reading("2001:db8::2/humidity", bt, 30.0, unit="%RH"),
        reading("2001:db8::1/temperature", bt, 12.3, unit="Cel"),
        reading("2001:db8::1/humidity", bt, 67.0, unit="%RH"),
    ]


# --- base fields: carried forward, then reset --------------------------------


def test_base_fields_carry_forward_until_reset() -> None:
    pack: list[dict[str, Any]] = [
        {"bn": "a:", "bt": NOW - 100, "bu": "m", "bv": 10, "n": "x", "v": 1},
        {"n": "y", "t": 1, "v": 2},
        {"bn": "b:", "bt": NOW - 50, "bu": "s", "bv": 20, "n": "x", "v": 3},
        {"n": "y", "t": 1, "v": 4},
    ]
    assert decode(pack) == [
        reading("a:x", NOW - 100, 11.0, unit="m"),
        reading("a:y", NOW - 99, 12.0, unit="m"),
        reading("b:x", NOW - 50, 23.0, unit="s"),
        reading("b:y", NOW - 49, 24.0, unit="s"),
    ]


def test_each_base_field_resets_independently() -> None:
    pack: list[dict[str, Any]] = [
        {"bn": "a:", "bt": NOW - 10, "bu": "m", "n": "x", "v": 1},
        {"bu": "s", "n": "x", "v": 2},  # only the unit changes
        {"bt": NOW - 5, "n": "x", "v": 3},  # only the time changes
    ]
    assert decode(pack) == [
        reading("a:x", NOW - 10, 1.0, unit="m"),
        reading("a:x", NOW - 10, 2.0, unit="s"),
        reading("a:x", NOW - 5, 3.0, unit="s"),
    ]


def test_empty_base_name_resets_the_prefix() -> None:
    pack = [{"bn": "dev:", "n": "a", "v": 1}, {"bn": "", "n": "b", "v": 2}]
    assert [r.channel for r in decode(pack)] == ["dev:a", "b"]


def test_base_name_alone_is_the_name() -> None:
    assert decode([{"bn": "temp", "v": 1}, {"v": 2}]) == [
        reading("temp", NOW, 1.0),
        reading("temp", NOW, 2.0),
    ]


def test_unit_overrides_base_unit_for_its_record_only() -> None:
    pack = [{"bu": "Cel", "n": "a", "v": 1}, {"n": "b", "u": "K", "v": 2}, {"n": "c", "v": 3}]
    assert [r.unit for r in decode(pack)] == ["Cel", "K", "Cel"]


def test_no_unit_at_all_is_allowed() -> None:
    assert decode([{"n": "a", "v": 1}])[0].unit is None


def test_empty_unit_means_no_unit() -> None:
    assert decode([{"bu": "Cel", "n": "a", "u": "", "v": 1}])[0].unit is None
    assert decode([{"bu": "", "n": "a", "v": 1}])[0].unit is None


def test_base_value_is_added_to_v_only() -> None:
    pack: list[dict[str, Any]] = [
        {"bv": 100, "n": "a", "v": 1.5},
        {"n": "b", "vb": True},
        {"n": "c", "vs": "on"},
        {"bv": 0, "n": "d", "v": 1.5},
    ]
    assert [(r.value, r.state) for r in decode(pack)] == [
        (101.5, None),
        (1.0, None),
        (None, "on"),
        (1.5, None),
    ]


def test_a_record_with_only_base_fields_and_a_value() -> None:
    assert decode([{"bn": "x", "bt": NOW, "bu": "m", "bv": 1, "v": 0}]) == [
        reading("x", NOW, 1.0, unit="m")
    ]


# --- time resolution ------------------------------------------------------------


def test_no_time_means_now() -> None:
    assert decode([{"n": "a", "v": 1}])[0].ts == NOW


def test_relative_time_is_from_the_receive_time() -> None:
    assert decode([{"n": "a", "t": -5, "v": 1}])[0].ts == NOW - 5


def test_relative_base_time_plus_time() -> None:
    assert decode([{"bt": -10, "n": "a", "t": 4.5, "v": 1}])[0].ts == NOW - 5.5


def test_absolute_time() -> None:
    assert decode([{"n": "a", "t": NOW - 3, "v": 1}])[0].ts == NOW - 3


def test_absolute_base_time_plus_time() -> None:
    assert decode([{"bt": NOW - 60, "n": "a", "t": 30, "v": 1}])[0].ts == NOW - 30


def test_time_exactly_2_pow_28_is_absolute() -> None:
    assert RELATIVE_TIME_LIMIT == 2**28
    assert decode([{"n": "a", "t": 2**28, "v": 1}])[0].ts == 2**28


def test_time_just_below_2_pow_28_is_relative() -> None:
    assert decode([{"n": "a", "t": 2**28 - 1, "v": 1}])[0].ts == NOW + 2**28 - 1


def test_the_resolved_time_decides_relative_or_absolute() -> None:
    # bt alone is absolute, but bt + t falls below 2**28: relative.
    assert decode([{"bt": 2**28, "n": "a", "t": -1, "v": 1}])[0].ts == NOW + 2**28 - 1


# --- values ---------------------------------------------------------------------


def test_every_value_type() -> None:
    pack: list[dict[str, Any]] = [
        {"n": "num", "v": -3.25},
        {"n": "int", "v": 7},
        {"n": "yes", "vb": True},
        {"n": "no", "vb": False},
        {"n": "str", "vs": "alarm"},
        {"n": "data", "vd": "aGkgCg"},
    ]
    assert [(r.channel, r.value, r.state) for r in decode(pack)] == [
        ("num", -3.25, None),
        ("int", 7.0, None),
        ("yes", 1.0, None),
        ("no", 0.0, None),
        ("str", None, "alarm"),
        ("data", None, "aGkgCg"),
    ]
    assert type(decode([{"n": "int", "v": 7}])[0].value) is float


def test_empty_string_value_is_a_state() -> None:
    assert decode([{"n": "a", "vs": ""}])[0].state == ""


def test_state_of_exactly_max_state_len() -> None:
    assert decode([{"n": "a", "vs": "x" * 8}], max_state_len=8)[0].state == "x" * 8


def test_update_time() -> None:
    pack = [{"n": "a", "v": 1, "ut": 300}, {"n": "b", "v": 2}]
    assert [r.update_period_s for r in decode(pack)] == [300.0, None]


def test_update_time_zero_is_allowed() -> None:
    assert decode([{"n": "a", "v": 1, "ut": 0}])[0].update_period_s == 0.0


# --- sums ------------------------------------------------------------------------


def test_sum_alone() -> None:
    assert decode([{"n": "energy", "u": "J", "s": 1234.5}]) == [
        reading("energy:sum", NOW, 1234.5, unit="J")
    ]


def test_sum_with_a_value() -> None:
    assert decode([{"n": "flow", "u": "l/s", "v": 2.5, "s": 800, "ut": 60}]) == [
        reading("flow", NOW, 2.5, unit="l/s", update_period_s=60.0),
        reading("flow:sum", NOW, 800.0, unit="l/s", update_period_s=60.0),
    ]


def test_base_sum_is_added_to_the_sum() -> None:
    assert decode([{"bs": 1000, "n": "e", "s": 5}]) == [reading("e:sum", NOW, 1005.0)]


def test_base_sum_carries_forward_as_a_sum_of_later_records() -> None:
    # RFC 8428 4.5.2: if only the base sum is present, the sum is considered 0.
    pack: list[dict[str, Any]] = [{"bs": 1000, "n": "e", "s": 5}, {"n": "e", "v": 1}]
    assert decode(pack) == [
        reading("e:sum", NOW, 1005.0),
        reading("e", NOW, 1.0),
        reading("e:sum", NOW, 1000.0),
    ]


def test_base_sum_alone_gives_a_sum_reading() -> None:
    assert decode([{"bs": 3, "n": "e"}]) == [reading("e:sum", NOW, 3.0)]


def test_sum_with_a_state_value() -> None:
    assert decode([{"n": "door", "vs": "open", "s": 12}]) == [
        reading("door", NOW, state="open"),
        reading("door:sum", NOW, 12.0),
    ]


# --- version and labels ------------------------------------------------------------


def test_versions_up_to_10_are_accepted() -> None:
    for version in (1, 5, 10):
        assert len(decode([{"bver": version, "n": "a", "v": 1}])) == 1


def test_the_same_version_may_repeat() -> None:
    assert len(decode([{"bver": 7, "n": "a", "v": 1}, {"bver": 7, "n": "b", "v": 2}])) == 2


def test_default_version_may_be_stated_later() -> None:
    assert len(decode([{"n": "a", "v": 1}, {"bver": 10, "n": "b", "v": 2}])) == 2


def test_unknown_labels_are_ignored() -> None:
    pack = [{"n": "a", "v": 1, "l": "link", "foo": {"x": [1]}, "_x": 1, "x_y": None}]
    assert decode(pack) == [reading("a", NOW, 1.0)]


def test_unknown_labels_are_ignored_on_base_records_too() -> None:
    assert decode([{"bn": "d:", "custom": 1, "n": "a", "v": 1}]) == [reading("d:a", NOW, 1.0)]


# --- invalid packs: each rejected with its reason ------------------------------------


def test_empty_pack() -> None:
    rejects([], "SenML pack is empty")


@pytest.mark.parametrize(
    ("pack", "match"),
    [
        ({"n": "a", "v": 1}, "must be a JSON array, got object"),
        ("text", "must be a JSON array, got string"),
        (None, "must be a JSON array, got null"),
    ],
)
def test_pack_is_not_an_array(pack: Any, match: str) -> None:
    rejects(pack, match)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ("a", "must be a JSON object, got string 'a'"),
        ([1], "must be a JSON object, got array"),
        (None, "must be a JSON object, got null"),
        (3, "must be a JSON object, got number 3"),
    ],
)
def test_record_is_not_an_object(record: Any, match: str) -> None:
    rejects([{"n": "a", "v": 1}, record], f"^record 1: {match}")


def test_too_many_records() -> None:
    pack = [{"n": "a", "v": i} for i in range(3)]
    rejects(pack, r"has 3 records, more than max_records=2", max_records=2)
    assert len(decode(pack, max_records=3)) == 3


def test_must_understand_label() -> None:
    rejects([{"n": "a", "v": 1}, {"n": "a", "v": 2, "crit_": 1}], r"^record 1: label 'crit_'")
    rejects([{"bn": "x", "v": 1, "bz_": True}], r"must be understood")


def test_version_above_10() -> None:
    rejects([{"bver": 11, "n": "a", "v": 1}], r"^record 0: 'bver' 11 is above 10")


def test_version_differs_within_the_pack() -> None:
    rejects(
        [{"bver": 5, "n": "a", "v": 1}, {"bver": 6, "n": "b", "v": 2}],
        r"^record 1: 'bver' 6 differs from 5",
    )


def test_later_version_differs_from_the_default_of_earlier_records() -> None:
    rejects(
        [{"n": "a", "v": 1}, {"bver": 5, "n": "b", "v": 2}],
        r"^record 1: 'bver' 5 differs from the default version 10",
    )


@pytest.mark.parametrize(
    ("version", "match"),
    [
        (0, "not a positive integer"),
        (-3, "not a positive integer"),
        (10.0, "must be an integer, got number 10.0"),
        ("10", "must be an integer, got string"),
        (True, "must be an integer, got true"),
        (None, "must be an integer, got null"),
    ],
)
def test_version_of_the_wrong_type_or_range(version: Any, match: str) -> None:
    rejects([{"bver": version, "n": "a", "v": 1}], match)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"v": 1}, "name is empty"),
        ({"bn": "", "n": "", "v": 1}, "name is empty"),
        ({"n": "has space", "v": 1}, r"contains ' '"),
        ({"n": "a#b", "v": 1}, r"contains '#'"),
        ({"n": "température", "v": 1}, r"contains 'é'"),
        ({"bn": "dev ", "n": "a", "v": 1}, r"contains ' '"),
        ({"n": "-a", "v": 1}, "must start with a letter or a digit"),
        ({"n": ".a", "v": 1}, "must start with a letter or a digit"),
        ({"n": "_a", "v": 1}, "must start with a letter or a digit"),
        ({"n": "/a", "v": 1}, "must start with a letter or a digit"),
        ({"n": "a" * 129, "v": 1}, "129 characters long, more than 128"),
        ({"bn": "a" * 100, "n": "b" * 29, "v": 1}, "129 characters long"),
        ({"n": 5, "v": 1}, "'n' must be a string, got number 5"),
        ({"n": None, "v": 1}, "'n' must be a string, got null"),
        ({"bn": 5, "v": 1}, "'bn' must be a string, got number 5"),
        ({"bn": ["a"], "v": 1}, "'bn' must be a string, got array"),
    ],
)
def test_invalid_names(record: dict[str, Any], match: str) -> None:
    rejects([{"n": "ok", "v": 1}, record], f"^record 1: .*{match}")


def test_name_of_exactly_128_characters_and_every_allowed_character() -> None:
    assert decode([{"n": "a" * 128, "v": 1}])[0].channel == "a" * 128
    name = "Az09-:./_"
    assert decode([{"n": name, "v": 1}])[0].channel == name


def test_sum_channel_name_must_fit_too() -> None:
    # 126 + len(":sum") = 130
    rejects([{"n": "a" * 126, "s": 1}], r"^record 0: name 'a+'… is 130 characters long, more than")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[{"n":"a","v":NaN}]', r"^record 0: 'v' is NaN$"),
        ('[{"n":"a","v":Infinity}]', r"^record 0: 'v' is Infinity$"),
        ('[{"n":"a","v":-Infinity}]', r"^record 0: 'v' is -Infinity$"),
        ('[{"n":"a","v":1e999}]', r"^record 0: 'v' is Infinity$"),
        ('[{"n":"a","v":1},{"n":"b","t":NaN,"v":1}]', r"^record 1: 't' is NaN$"),
        ('[{"n":"a","t":Infinity,"v":1}]', r"^record 0: 't' is Infinity$"),
        ('[{"bt":NaN,"n":"a","v":1}]', r"^record 0: 'bt' is NaN$"),
        ('[{"bv":NaN,"n":"a","v":1}]', r"^record 0: 'bv' is NaN$"),
        ('[{"bs":-Infinity,"n":"a","v":1}]', r"^record 0: 'bs' is -Infinity$"),
        ('[{"n":"a","s":NaN}]', r"^record 0: 's' is NaN$"),
        ('[{"n":"a","v":1,"ut":NaN}]', r"^record 0: 'ut' is NaN$"),
    ],
)
def test_nan_and_infinity_from_the_json_module(text: str, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_text(text)


@pytest.mark.parametrize("label", ["v", "t", "s", "ut", "bt", "bv", "bs"])
def test_integers_beyond_the_double_range(label: str) -> None:
    record: dict[str, Any] = {"n": "a", "v": 1, label: 10**400}
    with pytest.raises(DecodeError, match=f"^record 0: '{label}' is too large for a double$"):
        decode([record])


def test_value_overflowing_with_the_base_value() -> None:
    rejects([{"bv": 1e308, "n": "a", "v": 1e308}], r"^record 0: 'bv' \+ 'v' = .* is not finite")


def test_sum_overflowing_with_the_base_sum() -> None:
    rejects([{"bs": -1e308, "n": "a", "s": -1e308}], r"^record 0: 'bs' \+ 's' = .* is not finite")


def test_time_overflowing_with_the_base_time() -> None:
    rejects([{"bt": 1e308, "n": "a", "t": 1e308, "v": 1}], r"^record 0: time resolves to inf")


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("v", "12", "'v' must be a number, got string '12'"),
        ("v", True, "'v' must be a number, got true"),
        ("v", False, "'v' must be a number, got false"),
        ("v", None, "'v' must be a number, got null"),
        ("v", [1], "'v' must be a number, got array"),
        ("v", {"x": 1}, "'v' must be a number, got object"),
        ("t", "now", "'t' must be a number, got string 'now'"),
        ("t", True, "'t' must be a number, got true"),
        ("t", None, "'t' must be a number, got null"),
        ("bt", "0", "'bt' must be a number, got string"),
        ("bt", False, "'bt' must be a number, got false"),
        ("bv", "1", "'bv' must be a number, got string"),
        ("bv", True, "'bv' must be a number, got true"),
        ("bs", "1", "'bs' must be a number, got string"),
        ("s", "1", "'s' must be a number, got string"),
        ("s", True, "'s' must be a number, got true"),
        ("ut", "60", "'ut' must be a number, got string"),
        ("ut", True, "'ut' must be a number, got true"),
        ("ut", -1, "'ut' -1.0 is negative"),
        ("u", 1, "'u' must be a string, got number 1"),
        ("u", None, "'u' must be a string, got null"),
        ("u", "x" * 33, "'u' is 33 characters long, more than 32"),
        ("bu", 1, "'bu' must be a string, got number 1"),
        ("bu", "y" * 40, "'bu' is 40 characters long"),
    ],
)
def test_wrong_types(field: str, bad: Any, match: str) -> None:
    record: dict[str, Any] = {"n": "a", "v": 1, field: bad}
    valid = [{"n": "ok", "v": i} for i in range(3)]
    rejects([*valid, record], f"^record 3: {match}")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"n": "a", "vs": 1}, "'vs' must be a string, got number 1"),
        ({"n": "a", "vs": None}, "'vs' must be a string, got null"),
        ({"n": "a", "vd": 1}, "'vd' must be a string, got number 1"),
        ({"n": "a", "vb": 1}, "'vb' must be true or false, got number 1"),
        ({"n": "a", "vb": "true"}, "'vb' must be true or false, got string 'true'"),
        ({"n": "a", "vb": None}, "'vb' must be true or false, got null"),
        ({"n": "a", "vs": "x" * 9}, "'vs' is 9 characters long, more than max_state_len=8"),
        ({"n": "a", "vd": "x" * 9}, "'vd' is 9 characters long, more than max_state_len=8"),
    ],
)
def test_wrong_value_fields(record: dict[str, Any], match: str) -> None:
    rejects([record], f"^record 0: {match}", max_state_len=8)


@pytest.mark.parametrize(
    ("record", "fields"),
    [
        ({"n": "a", "v": 1, "vs": "x"}, "v, vs"),
        ({"n": "a", "v": 1, "vb": True}, "v, vb"),
        ({"n": "a", "v": 1, "vd": "aGk"}, "v, vd"),
        ({"n": "a", "vs": "x", "vb": True}, "vs, vb"),
        ({"n": "a", "vs": "x", "vd": "aGk"}, "vs, vd"),
        ({"n": "a", "v": 1, "vs": "x", "vb": False, "vd": "y"}, "v, vs, vb, vd"),
        ({"n": "a", "v": 1, "vs": "x", "s": 3}, "v, vs"),
    ],
)
def test_more_than_one_value_field(record: dict[str, Any], fields: str) -> None:
    rejects([record], rf"^record 0: more than one value field \({fields}\)")


@pytest.mark.parametrize(
    "record", [{"n": "a"}, {"n": "a", "t": 1, "u": "m"}, {"bn": "x"}, {"n": "a", "ut": 5}]
)
def test_no_value_field(record: dict[str, Any]) -> None:
    rejects([{"n": "a", "v": 1}, record], r"^record 1: no value field")


def test_the_first_invalid_record_is_named() -> None:
    pack: list[dict[str, Any]] = [{"n": f"c{i}", "v": i} for i in range(5)]
    pack[3]["v"] = "x"
    pack[4]["v"] = "y"
    rejects(pack, r"^record 3: 'v'")


# --- time bounds ----------------------------------------------------------------


def test_readings_too_far_in_the_past() -> None:
    pack = [{"n": "a", "v": 1}, {"n": "a", "t": -3601, "v": 1}]
    rejects(
        pack,
        r"^record 1: time .* is 3601 s before the receive time \(max_past_s=3600\)",
        max_past_s=3600,
    )


def test_readings_too_far_in_the_future() -> None:
    rejects(
        [{"n": "a", "t": NOW + 601, "v": 1}],
        r"^record 0: time .* is 601 s after the receive time \(max_future_s=600\)",
        max_future_s=600,
    )


def test_milliseconds_are_hinted_at() -> None:
    rejects([{"n": "a", "t": NOW * 1000, "v": 1}], r"milliseconds", max_future_s=600)


def test_readings_exactly_at_the_bounds_are_accepted() -> None:
    pack = [{"n": "a", "t": -3600, "v": 1}, {"n": "a", "t": 600, "v": 1}]
    readings = decode(pack, max_past_s=3600, max_future_s=600)
    assert [r.ts for r in readings] == [NOW - 3600, NOW + 600]


def test_time_bounds_reason() -> None:
    assert time_bounds_reason(NOW, received_at=NOW, max_past_s=1, max_future_s=1) is None
    assert time_bounds_reason(NOW, received_at=NOW, max_past_s=None, max_future_s=None) is None
    reason = time_bounds_reason(float("nan"), received_at=NOW, max_past_s=None, max_future_s=None)
    assert reason == "time resolves to nan"


# --- helpers ---------------------------------------------------------------------


def test_invalid_name_reason() -> None:
    assert invalid_name_reason("urn:dev:ow:10e2073a01080063") is None
    assert invalid_name_reason("urn:dev:ow:10e2073a01080063") is None  # cached
    assert invalid_name_reason("") == "name is empty"
    assert invalid_name_reason("a b") is not None


def test_fast_reading_constructor_builds_ordinary_readings() -> None:
    built = new_reading(DEVICE, "a", NOW, 1.0, None, "m", 60.0)
    expected = Reading(DEVICE, "a", NOW, 1.0, None, "m", 60.0)
    assert type(built) is Reading
    assert built == expected
    assert hash(built) == hash(expected)
    assert repr(built) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.value = 2.0  # type: ignore[misc]


def test_decoded_readings_are_ordinary_frozen_readings() -> None:
    (decoded,) = decode([{"n": "a", "v": 1, "u": "m"}])
    assert type(decoded) is Reading
    assert dataclasses.asdict(decoded)["unit"] == "m"
    assert decoded.device is DEVICE
