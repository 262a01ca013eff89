"""The ingester against the real broker and the real TimescaleDB."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import psycopg
import pytest

from ingest.decode import DecodeLimits
from ingest.service import IngestService
from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import Publisher, publish_all
from tests.polling import until as _until


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:6]}"


def _scalar(url: str, query: str, *params: object) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query.encode(), params).fetchone()
        return None if row is None else row[0]


def _count_readings(url: str, prefix: str) -> int:
    return int(
        str(
            _scalar(
                url,
                "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id"
                " WHERE s.device_id LIKE %s",
                prefix + "%",
            )
        )
    )


async def test_json_and_senml_are_stored_with_devices_and_series(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    now = time.time()
    senml = [
        {"bn": f"{p}-ws:", "bt": now, "bu": "Cel", "n": "temp", "v": 21.5},
        {"n": "hum", "u": "%RH", "v": 40, "t": 1},
        {"n": "door", "vs": "closed"},
    ]
    msgs = [
        (
            f"city/traffic/chuo/{p}-loop1",
            orjson.dumps({"ts": now, "intensity": 12, "occupancy": 0.4}),
        ),
        (f"city/facility/kita/{p}-ws", orjson.dumps(senml)),
    ]
    async with ingest_service() as svc:
        await asyncio.to_thread(publish_all, mqtt_url, msgs)
        await _until(lambda: _count_readings(database_url, p) == 5)
    assert svc.metrics.stored._value.get() >= 5  # counted once the service has flushed
    with psycopg.connect(database_url) as conn:
        devices = conn.execute(
            "SELECT id, domain, district FROM devices WHERE id LIKE %s ORDER BY id", (p + "%",)
        ).fetchall()
        assert devices == [(f"{p}-loop1", "traffic", "chuo"), (f"{p}-ws", "facility", "kita")]
        series: dict[str, str] = dict(
            conn.execute(
                "SELECT channel, unit FROM series WHERE device_id = %s", (f"{p}-ws",)
            ).fetchall()
        )
        assert series == {f"{p}-ws:temp": "Cel", f"{p}-ws:hum": "%RH", f"{p}-ws:door": "Cel"}
        state = conn.execute(
            "SELECT state, value FROM readings r JOIN series s ON s.id = r.series_id"
            " WHERE s.channel = %s",
            (f"{p}-ws:door",),
        ).fetchone()
        assert state == ("closed", None)
        hum_ts = conn.execute(
            "SELECT extract(epoch FROM ts) FROM readings r JOIN series s ON s.id = r.series_id"
            " WHERE s.channel = %s",
            (f"{p}-ws:hum",),
        ).fetchone()
        assert hum_ts is not None
        assert float(hum_ts[0]) == pytest.approx(now + 1, abs=1e-5)


async def test_redelivered_message_is_stored_once(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    msg = (
        f"city/traffic/chuo/{p}-d",
        orjson.dumps({"ts": 1_700_000_000 + time.time() % 1e6, "v": 1}),
    )
    # The same payload published three times stands for broker redelivery.
    async with ingest_service(limits=_wide_limits()) as svc:
        await asyncio.to_thread(publish_all, mqtt_url, [msg, msg, msg])
        await _until(lambda: svc.metrics.received._value.get() >= 3)
        assert svc.metrics.duplicates._value.get() == 2
    assert _count_readings(database_url, p) == 1


def _wide_limits() -> DecodeLimits:
    return DecodeLimits(max_past_s=10 * 365 * 86_400)


@pytest.mark.parametrize(
    ("suffix", "payload", "reason"),
    [
        ("", b"{not json", "JSON"),
        ("", b'{"ts": "yesterday", "v": 1}', "ts"),
        ("", b'{"v": NaN}', ""),
        ("", b'[{"n": "x", "v": "1"}]', "v"),
        ("", b'{"ts": 4102444800, "v": 1}', "future"),
        ("", b'{"ts": 1000, "v": 1}', "past"),
        ("", b"\xff\xfe\x00", ""),
        ("", b"x" * 70_000, "bytes"),
        ("/extra/level", b'{"v": 1}', "topic"),
    ],
)
async def test_bad_input_is_dead_lettered_and_ingest_goes_on(  # noqa: PLR0917
    ingest_service: ServiceFactory,
    mqtt_url: str,
    database_url: str,
    suffix: str,
    payload: bytes,
    reason: str,
) -> None:
    p = _prefix()
    topic = f"city/traffic/chuo/{p}-bad{suffix}"
    good = (f"city/traffic/chuo/{p}-good", orjson.dumps({"v": 7}))
    async with ingest_service() as svc:
        await asyncio.to_thread(publish_all, mqtt_url, [(topic, payload), good])
        await _until(lambda: _count_readings(database_url, p) == 1)
        await _until(
            lambda: (
                sum(
                    s.value
                    for s in next(iter(svc.metrics.dead_lettered.collect())).samples
                    if s.name.endswith("_total")
                )
                >= 1
            )
        )
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT topic, payload, reason FROM dead_letters WHERE topic = %s", (topic,)
        ).fetchone()
    assert row is not None
    assert bytes(row[1]) == payload
    assert reason.lower() in str(row[2]).lower()


async def test_device_cannot_move_between_districts(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    async with ingest_service():
        await asyncio.to_thread(
            publish_all, mqtt_url, [(f"city/traffic/chuo/{p}-x", orjson.dumps({"v": 1}))]
        )
        await _until(lambda: _count_readings(database_url, p) == 1)
        await asyncio.to_thread(
            publish_all, mqtt_url, [(f"city/traffic/kita/{p}-x", orjson.dumps({"v": 2}))]
        )
        await _until(
            lambda: (
                _scalar(
                    database_url,
                    "SELECT count(*) FROM dead_letters WHERE reason LIKE %s",
                    f"%{p}-x%",
                )
                == 1
            )
        )
    assert _count_readings(database_url, p) == 1


async def test_presence_sessions_and_stale_statuses(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    base = f"city/emergency/minato/{p}-panel/status"

    def status(state: str, session: int) -> tuple[str, bytes]:
        return base, orjson.dumps({"state": state, "session": session})

    def presence() -> tuple[object, ...] | None:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT presence, presence_session FROM devices WHERE id = %s", (f"{p}-panel",)
            ).fetchone()

    async with ingest_service():
        await asyncio.to_thread(publish_all, mqtt_url, [status("online", 3)])
        await _until(lambda: presence() == ("online", 3))
        # An offline from an older session arrives late: ignored.
        await asyncio.to_thread(publish_all, mqtt_url, [status("offline", 2)])
        await asyncio.to_thread(publish_all, mqtt_url, [status("offline", 3)])
        await _until(lambda: presence() == ("offline", 3))
        await asyncio.to_thread(publish_all, mqtt_url, [status("online", 4)])
        await _until(lambda: presence() == ("online", 4))
    events = _scalar(
        database_url, "SELECT count(*) FROM presence_events WHERE device_id = %s", f"{p}-panel"
    )
    assert events == 4
    publish_all(mqtt_url, [(base, b"")])  # clear the retained status


async def test_messages_published_while_ingester_is_away_are_delivered(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    async with ingest_service():
        pass  # creates the persistent session
    now = time.time()
    msgs = [
        (f"city/traffic/chuo/{p}-d{i % 5}", orjson.dumps({"ts": now + i * 1e-3, "v": i}))
        for i in range(2_000)
    ]
    publish_all(mqtt_url, msgs)
    async with ingest_service():
        await _until(lambda: _count_readings(database_url, p) == 2_000)


async def test_two_ingesters_on_one_shared_group_store_everything_once(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    p = _prefix()
    group = f"g{uuid.uuid4().hex[:6]}"
    now = time.time()
    n = 4_000
    msgs = [
        (f"city/traffic/chuo/{p}-d{i % 20}", orjson.dumps({"ts": now + i * 1e-3, "v": i}))
        for i in range(n)
    ]
    a_id = f"{group}-a"
    b_id = f"{group}-b"
    from ingest.mqtt import MqttOptions  # noqa: PLC0415

    async with (
        ingest_service(
            shared_group=group,
            client_id=a_id,
            mqtt_options=MqttOptions(client_id=a_id, session_expiry_s=60),
        ) as a,
        ingest_service(
            shared_group=group,
            client_id=b_id,
            mqtt_options=MqttOptions(client_id=b_id, session_expiry_s=60),
        ) as b,
    ):
        with Publisher(mqtt_url) as pub:
            await asyncio.to_thread(pub.publish, msgs)
            await asyncio.to_thread(pub.wait_acked)
        await _until(lambda: _count_readings(database_url, p) == n)
    # Read the counters after shutdown: a commit is visible in the database a
    # moment before the pipeline counts it.
    got_a = a.metrics.received._value.get()
    got_b = b.metrics.received._value.get()
    assert got_a > 0
    assert got_b > 0
    assert got_a + got_b == n
    assert (
        _scalar(
            database_url,
            "SELECT count(DISTINCT (r.series_id, r.ts)) FROM readings r JOIN series s"
            " ON s.id = r.series_id WHERE s.device_id LIKE %s",
            p + "%",
        )
        == n
    )


async def test_sigterm_style_shutdown_flushes_and_acks(
    ingest_config: object, mqtt_url: str, database_url: str
) -> None:
    from ingest.service import IngestConfig  # noqa: PLC0415

    assert isinstance(ingest_config, IngestConfig)
    p = _prefix()
    now = time.time()
    msgs = [
        (f"city/facility/kita/{p}-d", orjson.dumps({"ts": now + i * 1e-3, "v": i}))
        for i in range(500)
    ]
    svc = IngestService(ingest_config)
    await svc.__aenter__()
    await svc.wait_connected()
    await asyncio.to_thread(publish_all, mqtt_url, msgs)
    await _until(lambda: svc.metrics.received._value.get() + svc.pipeline.buffered >= 500)
    await svc.shutdown()
    assert _count_readings(database_url, p) == 500
    # Everything was acknowledged: a new ingester on the same session gets nothing again.
    async with IngestService(ingest_config) as again:
        await again.wait_connected()
        await asyncio.sleep(0.5)
        assert again.metrics.received._value.get() == 0
