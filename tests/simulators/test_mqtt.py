"""Against the real broker: simulate, record → replay round trip, isolation, drills."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from cityops.settings import MqttEndpoint
from simulators import RecordedMessage, RecordingReader, RecordingWriter, load_city, scale_city
from simulators.cli import main
from simulators.mqtt import MqttPublisher
from simulators.recorder import Recorder

from .conftest import Collector, json_line


def _simulate(mqtt_url: str, city: Path, *extra: str) -> list[str]:
    return [
        "simulate",
        "--mqtt-url", mqtt_url,
        "--city", str(city),
        "--seed", "5",
        "--start", "2026-06-03T08:00:00+09:00",
        "--as-fast-as-possible",
        *extra,
    ]  # fmt: skip


def test_simulate_publishes_and_counts(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    collect: Callable[..., Collector],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, (kita, minami) = city
    collector = collect(f"city/+/{kita}/#", f"city/+/{minami}/#")
    code = main(_simulate(mqtt_url, path, "--duration", "3m"))
    summary = json_line(capsys.readouterr().out)
    assert code == 0
    assert summary["ok"] is True
    assert summary["published"]["1"] == summary["acked"]["1"] > 0
    assert summary["published"]["0"] > 0  # streetlights publish QoS 0
    assert summary["statuses"] == 2 * 50  # online, then offline at the clean stop
    assert summary["wills"] == 0
    assert summary["presence"] == "device-connections"
    total = summary["published"]["0"] + summary["published"]["1"]
    collector.wait_for(lambda ms: len(ms) >= total)

    def last_states(messages: list[Any]) -> dict[str, str]:
        # Statuses come over 50 device connections: order is per device only.
        last: dict[str, str] = {}
        for m in messages:
            if m.topic.endswith("/status") and m.payload:
                last[m.topic] = orjson.loads(m.payload)["state"]
        return last

    collector.wait_for(
        lambda ms: (
            (states := last_states(ms)) != {}
            and len(states) == 50
            and set(states.values()) == {"offline"}
        )
    )
    senml = [m for m in collector.messages if m.content_type == "application/senml+json"]
    assert senml
    assert all(m.payload.startswith(b"[") for m in senml)


def test_no_broker_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CITYOPS_MQTT_URL", raising=False)
    for command in (["simulate"], ["record", "--out", "x.rec"], ["replay", "x.rec"]):
        assert main(command) == 2
        assert "--mqtt-url" in capsys.readouterr().err


def _record_a_run(
    mqtt_url: str, city: tuple[Path, tuple[str, str]], out: Path, capsys: pytest.CaptureFixture[str]
) -> int:
    path, (kita, minami) = city
    endpoint = MqttEndpoint.parse(mqtt_url)
    writer = RecordingWriter(out, fsync=False, max_block_bytes=8192)
    with (
        writer,
        Recorder(endpoint, writer, topics=(f"city/+/{kita}/#", f"city/+/{minami}/#")) as rec,
    ):
        assert main(_simulate(mqtt_url, path, "--duration", "2m", "--scenario", "faults")) == 0
        total = int(sum(json_line(capsys.readouterr().out)["published"].values()))
        assert rec.wait_received(total, timeout_s=20.0)
        assert rec.received == total
    return total


def test_record_then_replay_round_trip_and_isolation(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    collect: Callable[..., Collector],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run.rec"
    total = _record_a_run(mqtt_url, city, out, capsys)
    recorded = list(RecordingReader(out))
    assert len(recorded) == total
    _path, (kita, minami) = city
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox = collect(f"cityops/replay/{run_id}/#")
    live = collect(f"city/+/{kita}/#", f"city/+/{minami}/#")
    code = main(
        [
            "replay",
            str(out),
            "--mqtt-url",
            mqtt_url,
            "--speed",
            "0",
            "--keep-time",
            "--run-id",
            run_id,
        ]
    )
    summary = json_line(capsys.readouterr().out)
    assert code == 0
    assert summary["published"] == total
    sandbox.wait_for(lambda ms: len(ms) >= total)
    by_topic_recorded: dict[str, list[bytes]] = defaultdict(list)
    for m in recorded:
        by_topic_recorded[f"cityops/replay/{run_id}/{m.topic}"].append(m.payload)
    by_topic_replayed: dict[str, list[bytes]] = defaultdict(list)
    for r in sandbox.messages:
        by_topic_replayed[r.topic].append(r.payload)
        assert ("cityops-replay", run_id) in r.user_properties
        assert not r.retain
    assert by_topic_replayed == by_topic_recorded  # byte for byte, per topic in order
    # Isolation: a marker published after the replay reaches the live collector;
    # anything the replay leaked into city/ would have arrived before it.
    marker = f"city/traffic/{kita}/marker-{run_id}"
    with MqttPublisher(MqttEndpoint.parse(mqtt_url), client_id=f"marker-{run_id}") as publisher:
        publisher.publish(marker, b"{}", qos=1)
    live.wait_for(lambda ms: any(m.topic == marker for m in ms))
    leaked = [m for m in live.messages if not m.retain and m.topic != marker]
    assert leaked == []


def test_live_drill_window_and_time_shift(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    collect: Callable[..., Collector],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _path, (kita, _minami) = city
    out = tmp_path / "synthetic.rec"
    t0 = 1_780_441_200.0  # 2026-06-03 08:00 JST
    with RecordingWriter(out, fsync=False) as writer:
        for i in range(10):
            payload = orjson.dumps({"ts": t0 + i, "occupancy": i / 10})
            writer.append(
                RecordedMessage(t0 + i, f"city/traffic/{kita}/park-{i}", payload, 1, False, None)
            )
    run_id = f"d-{uuid.uuid4().hex[:8]}"
    live = collect(f"city/traffic/{kita}/#")
    args = [
        "replay",
        str(out),
        "--mqtt-url",
        mqtt_url,
        "--speed",
        "0",
        "--live",
        "--run-id",
        run_id,
    ]
    code = main([*args, "--from", "2s", "--to", "5s"])
    summary = json_line(capsys.readouterr().out)
    assert code == 0
    assert summary["live"] is True
    assert summary["published"] == 3
    live.wait_for(lambda ms: len(ms) >= 3)
    assert [m.topic.rsplit("/", 1)[1] for m in live.messages] == ["park-2", "park-3", "park-4"]
    assert all(("cityops-drill", run_id) in m.user_properties for m in live.messages)
    stamps = [orjson.loads(m.payload)["ts"] for m in live.messages]
    assert all(abs(ts - time.time()) < 60 for ts in stamps)  # shifted to now
    assert stamps[1] - stamps[0] == pytest.approx(1.0)  # intervals kept


def test_replay_of_a_truncated_recording(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run.rec"
    _record_a_run(mqtt_url, city, out, capsys)
    full = len(list(RecordingReader(out)))
    with out.open("r+b") as handle:
        handle.truncate(out.stat().st_size - 7)
    code = main(["replay", str(out), "--mqtt-url", mqtt_url, "--speed", "0", "--keep-time"])
    summary = json_line(capsys.readouterr().out)
    assert code == 0
    assert summary["truncated_tail"] is True
    assert 0 < summary["published"] < full


def test_load_generator_with_workers(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    clear_retained: Callable[[Iterable[str]], None],
) -> None:
    path, _ = city
    # Scaled districts are not unique to this test: delete their retained statuses.
    clear_retained(d.status_topic for d in scale_city(load_city(str(path)), 2000).devices)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators",
            "simulate",
            "--mqtt-url",
            mqtt_url,
            "--city",
            str(path),
            "--devices",
            "2000",
            "--rate",
            "3000",
            "--duration",
            "2",
            "--workers",
            "2",
            "--seed",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json_line(proc.stdout)
    assert summary["workers"] == 2
    assert summary["devices"] == 2000
    assert summary["presence"] == "device-connections"
    assert summary["device_connections"] == 2000
    assert summary["published"]["1"] == summary["acked"]["1"]
    assert summary["readings"] + summary["statuses"] == sum(summary["published"].values())
    # 3,000 msg/s for 2 s, plus the offline statuses of a clean stop
    assert sum(summary["published"].values()) == 6000 + summary["statuses"] - 2000
