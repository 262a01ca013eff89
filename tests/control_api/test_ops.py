"""Engineer routes against the real broker and database: recordings, replays, simulations, rules.

The API here runs with :func:`control_api.jobs.jobs_lifespan` (a recordings
folder of this test, at most two jobs) and the engineering router, whether or
not the application wires them yet. Replays go into the sandbox; an ingester
stores them in the ``replay`` schema, and MQTT collectors see what is
published. Nothing waits by sleeping: every wait polls a condition with a
deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import uvicorn

from cityops.settings import MqttEndpoint
from control_api import backtests
from control_api.app import create_app
from control_api.context import ApiConfig
from control_api.errors import BacktestBusy, BacktestUnavailable, InvalidJobRequest
from control_api.jobs import JobManager, jobs_lifespan
from control_api.recordings import read_recording_info
from control_api.routes import ops
from simulators import RecordedMessage, RecordingWriter
from tests.control_api.conftest import STARTUP_TIMEOUT_S, ApiClient, RunningApi
from tests.ingest.conftest import ServiceFactory, ingest_config, ingest_service
from tests.polling import rows, until, until_sync
from tests.simulators.conftest import Collector

__all__ = ["ingest_config", "ingest_service"]  # fixtures used here

MAX_JOBS = 2
START = 1_780_434_000.0  # 2026-06-03T05:00:00Z, as in the rules backtest tests


# -- the API under test -----------------------------------------------------------------


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    folder = tmp_path / "recordings"
    folder.mkdir()
    return folder


@dataclass(frozen=True, slots=True)
class Served:
    """The API under test and the thread that serves it."""

    api: RunningApi
    thread: threading.Thread


@pytest.fixture
def served(api_config: ApiConfig, recordings: Path) -> Iterator[Served]:
    """The conftest's API plus the job manager and the engineering routes."""
    app = create_app(
        api_config,
        extra_lifespan=partial(jobs_lifespan, recordings_dir=recordings, max_jobs=MAX_JOBS),
    )
    if not any(getattr(r, "path", None) == "/api/v1/replays" for r in app.routes):
        app.include_router(ops.router)  # until app.py includes it
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="ops-api-under-test", daemon=True)
    thread.start()
    until_sync(lambda: server.started or not thread.is_alive(), STARTUP_TIMEOUT_S, "API start")
    if not server.started:
        pytest.fail("the API did not start (see the log above)")
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    yield Served(RunningApi(base_url, api_config.database_url, api_config, server, app), thread)
    server.should_exit = True
    thread.join(timeout=60)


@pytest.fixture
def api(served: Served) -> RunningApi:
    """Overrides the conftest's ``api``, so ``clients`` and ``anonymous`` sign in here."""
    return served.api


@pytest.fixture
def collectors(api_config: ApiConfig) -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for collector in made:
        collector.close()


def _collect(api_config: ApiConfig, made: list[Collector], *topics: str) -> Collector:
    collector = Collector(api_config.mqtt, topics)
    made.append(collector)
    return collector


def _write_recording(
    path: Path, device: str, *, count: int, interval_s: float, district: str = "chuo"
) -> list[RecordedMessage]:
    """``count`` flat-JSON traffic readings of one device, ``interval_s`` apart, two blocks."""
    base = time.time() - count * interval_s - 60
    messages = [
        RecordedMessage(
            base + i * interval_s,
            f"city/traffic/{district}/{device}",
            orjson.dumps({"ts": base + i * interval_s, "intensity": i}),
        )
        for i in range(count)
    ]
    with RecordingWriter(path, fsync=False) as writer:
        half = count // 2
        for m in messages[:half]:
            writer.append(m)
        writer.flush()
        for m in messages[half:]:
            writer.append(m)
    return messages


async def _job(client: ApiClient, kind: str, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/{kind}s/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def _poll_job(
    client: ApiClient, kind: str, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Read the job every 50 ms until ``done(job)``; AssertionError after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        job = await _job(client, kind, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"{kind} {job_id} is still {job}"
        await asyncio.sleep(0.05)  # the poll interval, as tests.polling.until


async def _until_state(client: ApiClient, kind: str, job_id: str, *states: str) -> dict[str, Any]:
    return await _poll_job(client, kind, job_id, lambda job: job["state"] in states)


async def _until_published(client: ApiClient, kind: str, job_id: str, n: int) -> dict[str, Any]:
    return await _poll_job(client, kind, job_id, lambda job: job["progress"]["published"] >= n)


def _error(response: Any) -> str:
    message: str = response.json()["error"]["message"]
    return message


# -- recordings -------------------------------------------------------------------------


async def test_recordings_are_listed_from_their_block_heads(
    clients: dict[str, ApiClient], recordings: Path
) -> None:
    messages = _write_recording(recordings / "morning.rec", "rec-1", count=40, interval_s=0.5)
    (recordings / "notes.txt").write_text("not a recording")
    (recordings / "torn.rec").write_bytes((recordings / "morning.rec").read_bytes()[:-5])
    response = await clients["engineer"].get("/api/v1/recordings")
    assert response.status_code == 200, response.text
    listed = {r["name"]: r for r in response.json()}
    assert set(listed) == {"morning.rec", "torn.rec"}
    morning = listed["morning.rec"]
    assert morning["messages"] == 40
    assert morning["complete"] is True
    assert morning["duration_s"] == pytest.approx(messages[-1].t - messages[0].t)
    assert morning["size_bytes"] == (recordings / "morning.rec").stat().st_size
    torn = listed["torn.rec"]
    assert torn["complete"] is False
    assert torn["messages"] == 20  # the first block only: the second is cut short
    info = read_recording_info(recordings / "morning.rec")
    assert (info.first_t, info.last_t) == (messages[0].t, messages[-1].t)


# -- replays ------------------------------------------------------------------------------


async def test_a_replay_lands_in_the_sandbox_and_the_replay_schema(
    clients: dict[str, ApiClient],
    recordings: Path,
    ingest_service: ServiceFactory,
    api: RunningApi,
) -> None:
    device = f"rp{uuid.uuid4().hex[:8]}"
    _write_recording(recordings / "short.rec", device, count=30, interval_s=1.0)
    engineer = clients["engineer"]
    async with ingest_service():
        started = await engineer.post(
            "/api/v1/replays", json={"recording": "short.rec", "speed": 0}
        )
        assert started.status_code == 201, started.text
        job = started.json()
        run_id = job["id"]
        assert job["mode"] == "sandbox"
        assert job["topic_prefix"] == f"cityops/replay/{run_id}/"
        assert job["started_by"] == "engineer"
        assert job["progress"]["total_messages"] == 30
        done = await _until_state(engineer, "replay", run_id, "finished", "failed")
        assert done["state"] == "finished", done
        assert done["progress"]["published"] == done["progress"]["acked"] == 30
        assert done["progress"]["fraction"] == 1.0
        query = (
            "SELECT count(*) FROM replay.readings r JOIN replay.series s ON s.id = r.series_id"
            " WHERE s.device_id = %s AND r.run_id = %s"
        )
        await until(lambda: rows(api.database_url, query, device, run_id)[0][0] == 30)
    assert rows(api.database_url, "SELECT count(*) FROM devices WHERE id = %s", device) == [(0,)]
    listed = await engineer.get("/api/v1/replays")
    assert [j["id"] for j in listed.json()] == [run_id]
    audit = rows(
        api.database_url,
        "SELECT actor, target, detail->>'mode' FROM audit_log WHERE action = 'replay.start'",
    )
    assert audit == [("engineer", run_id, "sandbox")]


async def test_pause_holds_a_replay_and_resume_finishes_it(
    clients: dict[str, ApiClient],
    recordings: Path,
    api_config: ApiConfig,
    collectors: list[Collector],
    api: RunningApi,
) -> None:
    device = f"rp{uuid.uuid4().hex[:8]}"
    _write_recording(recordings / "paced.rec", device, count=300, interval_s=0.1)
    seen = _collect(api_config, collectors, f"cityops/replay/+/city/traffic/chuo/{device}")
    engineer = clients["engineer"]
    started = await engineer.post("/api/v1/replays", json={"recording": "paced.rec", "speed": 5})
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    await _until_published(engineer, "replay", run_id, 5)

    paused = await engineer.post(f"/api/v1/replays/{run_id}/pause")
    assert paused.status_code == 200, paused.text
    held = paused.json()
    assert held["state"] == "paused"
    count = held["progress"]["published"]
    assert 5 <= count < 300
    # Everything published before the pause arrives, and nothing after it.
    seen.wait_for(lambda ms: len(ms) >= count)
    again = await _job(engineer, "replay", run_id)
    assert again["state"] == "paused"
    assert again["progress"]["published"] == count
    assert again["progress"]["position_s"] == held["progress"]["position_s"]
    assert len(seen.messages) == count
    assert all(m.topic.startswith(f"cityops/replay/{run_id}/") for m in seen.messages)
    assert ("cityops-replay", run_id) in seen.messages[0].user_properties

    resumed = await engineer.post(f"/api/v1/replays/{run_id}/resume")
    assert resumed.status_code == 200
    assert resumed.json()["state"] == "running"
    done = await _until_state(engineer, "replay", run_id, "finished", "failed")
    assert done["state"] == "finished", done
    assert done["progress"]["published"] == 300
    seen.wait_for(lambda ms: len(ms) >= 300)
    actions = rows(
        api.database_url,
        "SELECT action FROM audit_log WHERE target = %s ORDER BY id",
        run_id,
    )
    assert [a[0] for a in actions] == ["replay.start", "replay.pause", "replay.resume"]


async def test_a_stopped_or_finished_replay_cannot_be_steered(
    clients: dict[str, ApiClient], recordings: Path
) -> None:
    _write_recording(recordings / "long.rec", "rp-long", count=100, interval_s=10.0)
    _write_recording(recordings / "tiny.rec", "rp-tiny", count=3, interval_s=0.1)
    engineer = clients["engineer"]
    long_run = (await engineer.post("/api/v1/replays", json={"recording": "long.rec"})).json()
    stopped = await engineer.post(f"/api/v1/replays/{long_run['id']}/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    for action in ("pause", "resume", "stop"):
        refused = await engineer.post(f"/api/v1/replays/{long_run['id']}/{action}")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "conflict"
        assert long_run["id"] in _error(refused)
        assert "is stopped" in _error(refused)

    tiny = (
        await engineer.post("/api/v1/replays", json={"recording": "tiny.rec", "speed": 0})
    ).json()
    await _until_state(engineer, "replay", tiny["id"], "finished")
    refused = await engineer.post(f"/api/v1/replays/{tiny['id']}/pause")
    assert refused.status_code == 409
    assert _error(refused) == (
        f"replay {tiny['id']!r} is finished: only a running or paused replay can be paused"
    )
    missing = await engineer.post("/api/v1/replays/rp-nope/pause")
    assert missing.status_code == 404
    assert _error(missing) == "no replay 'rp-nope'"
    # a replay is not a simulation
    assert (await engineer.get(f"/api/v1/simulations/{tiny['id']}")).status_code == 404


async def test_replay_requests_that_cannot_be_served(
    clients: dict[str, ApiClient], recordings: Path
) -> None:
    _write_recording(recordings / "ten.rec", "rp-ten", count=11, interval_s=1.0)
    (recordings / "empty.rec").write_bytes(b"CYOPSREC" + bytes([1]) + bytes(7))
    engineer = clients["engineer"]

    async def start(**body: Any) -> tuple[int, str]:
        response = await engineer.post("/api/v1/replays", json=body)
        return response.status_code, _error(response)

    status, message = await start(recording="nope.rec")
    assert status == 404
    assert "'nope.rec'" in message
    for name in ("../etc/passwd", "/etc/passwd", "..", "a/b.rec", ".hidden"):
        status, message = await start(recording=name)
        assert (status, name in message) == (422, True), message
    status, message = await start(recording="empty.rec")
    assert (status, message) == (422, "recording 'empty.rec' holds no messages")
    status, message = await start(recording="ten.rec", speed=-1)
    assert status == 422
    assert "speed" in message
    status, _ = await start(recording="ten.rec", speed="fast")
    assert status == 422
    status, _ = await start(recording="ten.rec", speed=1e9)
    assert status == 422
    status, message = await start(recording="ten.rec", from_s=5, to_s=5)
    assert (status, message) == (422, "window end to_s 5 must be after from_s 5")
    status, message = await start(recording="ten.rec", from_s=60)
    assert status == 422
    assert "from_s 60 s is after the end of recording 'ten.rec', which lasts 10.000 s" in message
    status, message = await start(recording="ten.rec", mode="live")
    assert status == 422
    status, message = await start(recording="ten.rec", spead=2)
    assert status == 422
    assert "spead" in message
    assert (await engineer.get("/api/v1/replays")).json() == []


async def test_the_number_of_jobs_is_bounded(
    clients: dict[str, ApiClient], recordings: Path
) -> None:
    _write_recording(recordings / "slow.rec", "rp-slow", count=50, interval_s=30.0)
    engineer, admin = clients["engineer"], clients["admin"]
    first = await engineer.post("/api/v1/replays", json={"recording": "slow.rec"})
    second = await admin.post("/api/v1/simulations", json={"devices": 3})
    assert (first.status_code, second.status_code) == (201, 201)
    refused = await engineer.post("/api/v1/replays", json={"recording": "slow.rec"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert _error(refused) == (
        "cannot start a replay: 2 replays and simulations are running or paused, "
        "the limit is 2; stop one first"
    )
    paused = await engineer.post(f"/api/v1/replays/{first.json()['id']}/pause")
    assert paused.json()["state"] == "paused"
    assert (await engineer.post("/api/v1/simulations", json={})).status_code == 429  # paused counts
    await engineer.post(f"/api/v1/replays/{first.json()['id']}/stop")
    third = await engineer.post("/api/v1/replays", json={"recording": "slow.rec", "from_s": 30})
    assert third.status_code == 201, third.text
    assert third.json()["progress"]["total_s"] == pytest.approx(49 * 30.0 - 30)
    assert third.json()["progress"]["total_messages"] is None  # a window: unknown
    for kind, job in (("simulation", second.json()), ("replay", third.json())):
        assert (await engineer.post(f"/api/v1/{kind}s/{job['id']}/stop")).status_code == 200


async def test_a_drill_replays_on_the_live_topics_marked_as_a_drill(
    clients: dict[str, ApiClient],
    recordings: Path,
    api_config: ApiConfig,
    collectors: list[Collector],
    api: RunningApi,
) -> None:
    district = f"drill{uuid.uuid4().hex[:6]}"
    _write_recording(
        recordings / "drill.rec", "rp-drill", count=5, interval_s=1.0, district=district
    )
    seen = _collect(api_config, collectors, f"city/traffic/{district}/#")
    engineer = clients["engineer"]
    started = await engineer.post(
        "/api/v1/replays", json={"recording": "drill.rec", "speed": 0, "mode": "drill"}
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    assert started.json()["topic_prefix"] == "city/"
    seen.wait_for(lambda ms: len(ms) == 5)
    assert all(("cityops-drill", run_id) in m.user_properties for m in seen.messages)
    assert not any(m.retain for m in seen.messages)
    audit = rows(
        api.database_url,
        "SELECT detail->>'mode' FROM audit_log WHERE action = 'replay.start' AND target = %s",
        run_id,
    )
    assert audit == [("drill",)]


# -- simulations --------------------------------------------------------------------------


async def test_a_simulation_starts_pauses_and_stops(
    clients: dict[str, ApiClient], api_config: ApiConfig, collectors: list[Collector]
) -> None:
    seen = _collect(api_config, collectors, "cityops/replay/+/city/#")
    engineer = clients["engineer"]
    started = await engineer.post(
        "/api/v1/simulations",
        json={"devices": 5, "speed": 1, "seed": 7, "duration_s": 3600, "scenario": "rush-hour"},
    )
    assert started.status_code == 201, started.text
    sim = started.json()
    assert sim["kind"] == "simulation"
    assert sim["parameters"]["scenario"] == "rush-hour"
    assert sim["progress"]["total_s"] == 3600
    prefix = f"cityops/replay/{sim['id']}/city/"
    seen.wait_for(lambda ms: sum(m.topic.startswith(prefix) for m in ms) >= 5)  # 5 online statuses
    paused = await engineer.post(f"/api/v1/simulations/{sim['id']}/pause")
    assert paused.json()["state"] == "paused"
    assert (await engineer.post(f"/api/v1/simulations/{sim['id']}/resume")).json()["state"] == (
        "running"
    )
    stopped = await engineer.post(f"/api/v1/simulations/{sim['id']}/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert stopped.json()["progress"]["published"] >= 5
    listed = await engineer.get("/api/v1/simulations")
    assert [s["id"] for s in listed.json()] == [sim["id"]]
    assert (await engineer.get("/api/v1/replays")).json() == []


async def test_a_simulation_as_fast_as_possible_finishes(clients: dict[str, ApiClient]) -> None:
    engineer = clients["engineer"]
    started = await engineer.post(
        "/api/v1/simulations", json={"devices": 10, "speed": 0, "duration_s": 120}
    )
    assert started.status_code == 201, started.text
    done = await _until_state(engineer, "simulation", started.json()["id"], "finished", "failed")
    assert done["state"] == "finished", done
    assert done["progress"]["published"] > 10
    assert done["progress"]["published"] == done["progress"]["acked"]


async def test_simulation_requests_that_cannot_be_served(clients: dict[str, ApiClient]) -> None:
    engineer = clients["engineer"]
    scenarios = await engineer.get("/api/v1/scenarios")
    assert "fire" in {s["name"] for s in scenarios.json()}
    unknown = await engineer.post("/api/v1/simulations", json={"scenario": "zombies"})
    assert unknown.status_code == 422
    assert _error(unknown).startswith("unknown scenario 'zombies': the scenarios are ")
    path = await engineer.post("/api/v1/simulations", json={"scenario": "/etc/passwd"})
    assert path.status_code == 422
    # the fire needs a building with a fire panel and a smoke detector: 3 devices have none
    small = await engineer.post("/api/v1/simulations", json={"scenario": "fire", "devices": 3})
    assert small.status_code == 422
    assert "no building in this city has both a fire panel and a smoke detector" in _error(small)
    for body in ({"speed": -2}, {"duration_s": 0}, {"devices": 0}, {"seed": -1}):
        assert (await engineer.post("/api/v1/simulations", json=body)).status_code == 422, body
    assert (await engineer.get("/api/v1/simulations")).json() == []


async def test_shutting_the_api_down_stops_its_jobs(
    served: Served,
    clients: dict[str, ApiClient],
    recordings: Path,
    api_config: ApiConfig,
    collectors: list[Collector],
) -> None:
    device = f"rp{uuid.uuid4().hex[:8]}"
    _write_recording(recordings / "endless.rec", device, count=100, interval_s=60.0)
    seen = _collect(api_config, collectors, f"cityops/replay/+/city/traffic/chuo/{device}")
    engineer = clients["engineer"]
    replay = await engineer.post("/api/v1/replays", json={"recording": "endless.rec"})
    simulation = await engineer.post("/api/v1/simulations", json={"devices": 3})
    assert (replay.status_code, simulation.status_code) == (201, 201)
    seen.wait_for(lambda ms: len(ms) == 1)  # then the replay waits a minute for the next one
    served.api.server.should_exit = True
    await asyncio.to_thread(served.thread.join, 60)
    assert not served.thread.is_alive(), "the API did not shut down"

    def job_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("cityops-job")]

    until_sync(lambda: not job_threads(), 10, "job threads ended")


# -- rules ----------------------------------------------------------------------------------


async def test_the_loaded_rules_are_listed_with_their_source(clients: dict[str, ApiClient]) -> None:
    response = await clients["engineer"].get("/api/v1/rules")
    assert response.status_code == 200
    rules = {r["id"]: r for r in response.json()}
    fire = rules["fire-panel-alarm"]
    assert fire["severity"] == "critical"
    assert fire["ack_role"] == "responder"
    assert fire["subject"]["kinds"] == ["fire-panel"]
    assert fire["file"] == "emergency.yaml"
    assert fire["line"] == 5
    assert fire["when"] == 'state == "alarm"'


_GOOD = """\
rules:
  - id: hot-room
    name: Hot room
    subject: {domain: facility, channel: temperature}
    when: value > 30
    severity: major
    message: "{device} is at {value}"
"""


async def test_a_candidate_rule_file_is_validated(clients: dict[str, ApiClient]) -> None:
    engineer = clients["engineer"]
    good = await engineer.post("/api/v1/rules/validate", json={"text": _GOOD})
    assert good.status_code == 200
    assert good.json() == {"valid": True, "errors": [], "rules": 1, "rule_ids": ["hot-room"]}
    broken = await engineer.post(
        "/api/v1/rules/validate",
        json={"text": _GOOD.replace("{domain: facility", "[domain: facility"), "name": "new.yaml"},
    )
    assert broken.status_code == 200
    body = broken.json()
    assert body["valid"] is False
    assert body["rules"] == 0
    (error,) = body["errors"]
    assert error["file"] == "new.yaml"
    assert error["line"] == 4
    assert "invalid YAML" in error["reason"]
    missing = await engineer.post(
        "/api/v1/rules/validate", json={"text": _GOOD.replace("    severity: major\n", "")}
    )
    (error,) = missing.json()["errors"]
    assert (error["line"], error["reason"]) == (2, "rule: missing required key 'severity'")
    too_big = await engineer.post("/api/v1/rules/validate", json={"text": "#" * 1_000_001})
    assert too_big.status_code == 422


def _seed_readings(url: str) -> None:
    """Ten minutes in district kita: a fire panel in alarm from +300 s, a room heating up."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO devices (id, domain, district, kind) VALUES"
            " ('fire-kita-001', 'emergency', 'kita', 'fire-panel'),"
            " ('clim-kita-001', 'facility', 'kita', 'climate'),"
            " ('clim-naka-001', 'facility', 'naka', 'climate')"
        )
        series = {}
        for device, channel in (
            ("fire-kita-001", "state"),
            ("clim-kita-001", "temperature"),
            ("clim-naka-001", "temperature"),
        ):
            row = conn.execute(
                "INSERT INTO series (device_id, channel) VALUES (%s, %s) RETURNING id",
                (device, channel),
            ).fetchone()
            assert row is not None
            series[device] = row[0]
        values: list[tuple[float, int, float | None, str | None]] = []
        for t in range(0, 600, 30):
            values += [
                (START + t, series["fire-kita-001"], None, "alarm" if t >= 300 else "normal"),
                (START + t, series["clim-kita-001"], 35.0 if t >= 200 else 22.0, None),
                (START + t, series["clim-naka-001"], 31.0 if t >= 400 else 20.0, None),
            ]
        conn.cursor().executemany(
            "INSERT INTO readings (ts, series_id, value, state, received_at)"
            " VALUES (to_timestamp(%s), %s, %s, %s, to_timestamp(%s))",
            [(ts, sid, value, state, ts) for ts, sid, value, state in values],
        )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


async def test_backtests_of_the_loaded_and_a_candidate_rule_file(
    clients: dict[str, ApiClient], api: RunningApi
) -> None:
    _seed_readings(api.database_url)
    engineer = clients["engineer"]
    window = {"start": _iso(START), "end": _iso(START + 600)}
    loaded = await engineer.post("/api/v1/rules/backtest", json=window)
    assert loaded.status_code == 200, loaded.text
    report = loaded.json()
    assert report["rules"] == "loaded"
    assert report["input"]["readings"] == 60
    fired = {(a["rule_id"], a["subject"].split("|")[1]) for a in report["alerts"]}
    assert ("fire-panel-alarm", "fire-kita-001") in fired
    assert report["counts"]["by_rule"]["fire-panel-alarm"] == 1
    assert report["counts"]["by_severity"]["critical"] >= 1
    assert report["counts"]["by_district"]["kita"] >= 1
    fire = next(a for a in report["alerts"] if a["rule_id"] == "fire-panel-alarm")
    assert fire["district"] == "kita"
    assert fire["raised_at"] == _iso(START + 300)

    candidate = await engineer.post("/api/v1/rules/backtest", json={**window, "rules": _GOOD})
    assert candidate.status_code == 200, candidate.text
    report = candidate.json()
    assert report["rules"] == "candidate"
    raised = {a["subject"].split("|")[1]: a["raised_at"] for a in report["alerts"]}
    assert raised == {
        "clim-kita-001": _iso(START + 210),
        "clim-naka-001": _iso(START + 420),
    }
    assert report["counts"] == {
        "by_rule": {"hot-room": 2},
        "by_severity": {"major": 2},
        "by_district": {"kita": 1, "naka": 1},
    }
    assert report["quality"]["alerts"] == 2
    capped = await engineer.post(
        "/api/v1/rules/backtest", json={**window, "rules": _GOOD, "max_alerts": 1}
    )
    assert len(capped.json()["alerts"]) == 1
    assert capped.json()["alerts_truncated"] is True


async def test_backtest_requests_that_cannot_be_served(clients: dict[str, ApiClient]) -> None:
    engineer = clients["engineer"]

    async def backtest(**body: Any) -> tuple[int, str]:
        response = await engineer.post("/api/v1/rules/backtest", json=body)
        return response.status_code, _error(response)

    status, message = await backtest(start=_iso(START), end=_iso(START + 8 * 86_400))
    assert (status, message) == (
        422,
        "the backtest range of 8.00 days is longer than the maximum of 7 days",
    )
    status, message = await backtest(start=_iso(START), end=_iso(START))
    assert status == 422
    assert "must end after it starts" in message
    status, message = await backtest(start=_iso(START + 60), end=_iso(START))
    assert status == 422
    status, message = await backtest(start="2026-06-03T05:00:00", end=_iso(START + 60))
    assert (status, message) == (
        422,
        "start 2026-06-03T05:00:00 needs a time zone offset, e.g. +09:00 or Z",
    )
    status, message = await backtest(
        start=_iso(START), end=_iso(START + 60), rules="rules:\n  - id: x\n    name: [a\n"
    )
    assert status == 422
    assert message.startswith("the candidate rules do not load: candidate.yaml:4:1: invalid YAML")
    status, _ = await backtest(start=_iso(START), end=_iso(START + 60), tick_s=0)
    assert status == 422


class _HeldBacktest:
    """Stands in for the stored-range backtest: holds its thread until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.outcome = object()

    def __call__(self, *_args: object, give_up: Callable[[], str | None], **_kw: object) -> Any:
        self.started.set()
        while not self.release.wait(0.01):
            reason = give_up()  # what the real run's progress callback asks
            if reason is not None:
                raise BacktestUnavailable(reason)
        return self.outcome


def _manager(**options: Any) -> JobManager:
    return JobManager(
        endpoint=MqttEndpoint.parse("mqtt://127.0.0.1:1"),
        city="minamikawa",
        recordings_dir=None,
        **options,
    )


async def test_backtests_run_one_at_a_time_on_their_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = _HeldBacktest()
    monkeypatch.setattr(backtests, "_stored_backtest", held)
    async with _manager() as manager, asyncio.TaskGroup() as tg:
        first = tg.create_task(
            manager.backtest((), label="x", database_url="postgresql://", start=0, end=60)
        )
        assert await asyncio.to_thread(held.started.wait, 10)
        with pytest.raises(BacktestBusy, match="1 backtests are running, the limit is 1"):
            await manager.backtest((), label="y", database_url="postgresql://", start=0, end=60)
        held.release.set()
    assert first.result() is held.outcome


async def test_a_backtest_past_its_time_limit_is_abandoned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backtests, "_stored_backtest", _HeldBacktest())
    async with _manager(backtest_timeout_s=0.2) as manager:
        with pytest.raises(BacktestUnavailable, match=r"ran past its limit of 0\.2 s"):
            await manager.backtest((), label="x", database_url="postgresql://", start=0, end=60)
        with pytest.raises(InvalidJobRequest, match=r"tick_s 0\.001 is too fine"):
            await manager.backtest(
                (), label="x", database_url="postgresql://", start=0, end=86_400, tick_s=0.001
            )


# -- roles ------------------------------------------------------------------------------------

_ENGINEERING_ROUTES = [
    ("GET", "/api/v1/recordings", None),
    ("GET", "/api/v1/scenarios", None),
    ("GET", "/api/v1/replays", None),
    ("POST", "/api/v1/replays", {"recording": "x.rec"}),
    ("GET", "/api/v1/replays/rp-x", None),
    ("POST", "/api/v1/replays/rp-x/pause", None),
    ("POST", "/api/v1/replays/rp-x/resume", None),
    ("POST", "/api/v1/replays/rp-x/stop", None),
    ("GET", "/api/v1/simulations", None),
    ("POST", "/api/v1/simulations", {}),
    ("GET", "/api/v1/simulations/sim-x", None),
    ("POST", "/api/v1/simulations/sim-x/stop", None),
    ("POST", "/api/v1/rules/validate", {"text": _GOOD}),
    ("POST", "/api/v1/rules/backtest", {"start": _iso(START), "end": _iso(START + 60)}),
]


async def test_only_engineers_and_admins_may_use_the_engineering_routes(
    clients: dict[str, ApiClient], anonymous: ApiClient, api: RunningApi
) -> None:
    for method, url, body in _ENGINEERING_ROUTES:
        for role in ("operator", "responder"):
            response = await clients[role].request(method, url, json=body)
            assert response.status_code == 403, (role, method, url, response.text)
            assert "'engineering' permission" in _error(response)
        assert (await anonymous.request(method, url, json=body)).status_code == 401
    for method, url, body in _ENGINEERING_ROUTES[:3] + _ENGINEERING_ROUTES[12:13]:
        for role in ("engineer", "admin"):
            response = await clients[role].request(method, url, json=body)
            assert response.status_code == 200, (role, method, url, response.text)
    # every role reads the rules: the console draws their thresholds for everyone
    for role in ("operator", "responder", "engineer", "admin"):
        assert (await clients[role].get("/api/v1/rules")).status_code == 200
    denied = rows(
        api.database_url,
        "SELECT count(*) FROM audit_log WHERE outcome = 'denied' AND action LIKE 'POST %%'",
    )
    assert denied[0][0] == 2 * sum(1 for m, _, _ in _ENGINEERING_ROUTES if m == "POST")
