from __future__ import annotations

import orjson
import pytest

from simulators import SimulatorError
from simulators.replay import (
    PauseControl,
    TimeMapping,
    message_timestamp,
    new_run_id,
    parse_bound,
    rewrite_topic,
    shift_payload_time,
    validate_run_id,
)

T0 = 1_780_000_000.0


def test_topics_go_to_the_sandbox_unless_live() -> None:
    topic = "city/traffic/chuo/loop-1"
    assert (
        rewrite_topic(topic, run_id="r1", live=False)
        == "cityops/replay/r1/city/traffic/chuo/loop-1"
    )
    assert rewrite_topic(topic + "/status", run_id="r1", live=False).startswith(
        "cityops/replay/r1/city/"
    )
    assert rewrite_topic(topic, run_id="r1", live=True) == topic


def test_run_ids() -> None:
    assert validate_run_id("drill-7") == "drill-7"
    validate_run_id(new_run_id(T0))
    for bad in ("", "R1", "a/b", "a+b", "x" * 64):
        with pytest.raises(SimulatorError, match="run id"):
            validate_run_id(bad)


def test_shift_flat_json() -> None:
    mapping = TimeMapping("shift", ref_ts=T0, ref_wall=T0 + 1000)
    out = shift_payload_time(b'{"ts":1780000010.5,"occupancy":0.3}', "application/json", mapping)
    assert out is not None
    assert orjson.loads(out) == {"ts": T0 + 1010.5, "occupancy": 0.3}
    rfc = shift_payload_time(b'{"ts":"2026-05-28T20:26:40+00:00","x":1}', None, mapping)
    assert rfc is not None
    assert orjson.loads(rfc)["ts"] == "2026-05-28T20:43:20.000+00:00"


def test_shift_senml_base_time_and_scale_relative_times() -> None:
    pack = orjson.dumps(
        [
            {"bt": T0 + 10, "n": "a", "v": 1, "t": 0},
            {"n": "b", "v": 2, "t": 4},
            {"n": "c", "v": 3, "t": -60},
        ]
    )
    shifted = shift_payload_time(pack, "application/senml+json", TimeMapping("shift", T0, T0 + 100))
    assert shifted is not None
    records = orjson.loads(shifted)
    assert records[0]["bt"] == T0 + 110
    assert [r["t"] for r in records] == [0, 4, -60]
    scaled = shift_payload_time(pack, None, TimeMapping("scale", T0, T0 + 100, speed=2.0))
    assert scaled is not None
    records = orjson.loads(scaled)
    assert records[0]["bt"] == T0 + 105
    assert [r["t"] for r in records] == [0, 2, -30]


def test_relative_senml_and_junk_are_left_alone() -> None:
    mapping = TimeMapping("shift", T0, T0 + 100)
    assert shift_payload_time(b'[{"n":"a","v":1,"t":-5}]', None, mapping) is None
    assert shift_payload_time(b'[{"bt":-5,"n":"a","v":1}]', None, mapping) is None
    assert shift_payload_time(b'{"ts":', None, mapping) is None
    assert shift_payload_time(b"\xff\xfe", None, mapping) is None
    assert shift_payload_time(b'{"occupancy":1}', None, mapping) is None
    keep = TimeMapping("keep")
    assert shift_payload_time(b'{"ts":1}', None, keep) == b'{"ts":1}'


def test_absolute_senml_t_without_base() -> None:
    out = shift_payload_time(
        b'[{"n":"a","v":1,"t":1780000000}]', None, TimeMapping("shift", T0, T0 + 5)
    )
    assert out is not None
    assert orjson.loads(out)[0]["t"] == T0 + 5


def test_message_timestamp() -> None:
    assert message_timestamp(b'{"ts":1780000000.25,"x":1}', None) == T0 + 0.25
    assert message_timestamp(b'[{"bt":1780000000,"n":"a","v":1,"t":3}]', None) == T0 + 3
    assert message_timestamp(b'[{"n":"a","v":1}]', None) is None
    assert message_timestamp(b"nope", None) is None


def test_window_bounds() -> None:
    assert parse_bound("90s", first_t=T0) == T0 + 90
    assert parse_bound("+15m", first_t=T0) == T0 + 900
    assert parse_bound("1h30m", first_t=T0) == T0 + 5400
    assert parse_bound("120", first_t=T0) == T0 + 120
    assert parse_bound(str(T0 + 7), first_t=T0) == T0 + 7
    assert parse_bound("2026-05-28T20:26:40Z", first_t=0) == T0
    with pytest.raises(SimulatorError, match="UTC offset"):
        parse_bound("2026-05-28T20:26:40", first_t=T0)
    with pytest.raises(SimulatorError, match="window bound"):
        parse_bound("tomorrow", first_t=T0)


def test_pause_control() -> None:
    control = PauseControl()
    assert not control.paused
    control.toggle()
    assert control.paused
    control.resume()
    assert not control.paused
    control.pause()
    control.stop()
    assert not control.paused
    assert control.stopped.is_set()
