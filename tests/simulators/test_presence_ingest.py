"""End to end: the outage scenario's wills reach the ingester and the ``devices`` table."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cityops.settings import MqttEndpoint
from ingest.mqtt import MqttOptions
from ingest.pipeline import PipelineOptions
from ingest.service import IngestConfig, IngestService
from simulators.cli import main
from simulators.runner import SimulateOptions, build_simulation

from .conftest import json_line

START = "1780441200"  # 2026-06-03 08:00 JST
SPEED = "600"  # the outage: offline 1 s after the start, back 2 s later


def _presence(url: str, ids: list[str]) -> dict[str, tuple[str, int | None]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, presence, presence_session FROM devices WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {str(i): (str(p), None if s is None else int(s)) for i, p, s in rows}


def _seen(url: str, ids: list[str], state: str, session: int) -> bool:
    """Every device has this presence event in its history.

    The history, not the current state: a transient state (online between
    the outage and the clean stop) can be over before a poll looks.
    """
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT device_id) FROM presence_events"
            " WHERE device_id = ANY(%s) AND state = %s AND session = %s",
            (ids, state, session),
        ).fetchone()
    return row is not None and int(row[0]) == len(ids)


async def _until(
    what: str,
    cond: Callable[[], bool],
    *,
    timeout_s: float,
    done: asyncio.Future[int] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            msg = f"{what}: not seen within {timeout_s:.0f} s"
            raise AssertionError(msg)
        if done is not None and done.done() and not cond():
            msg = f"{what}: the simulation ended first (exit code {done.result()})"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)


async def test_outage_takes_devices_offline_by_will_and_back_with_the_next_session(
    mqtt_url: str,
    database_url: str,
    city: tuple[Path, tuple[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = city
    options = SimulateOptions(
        city=str(path), devices=None, scenarios=("outage",), seed=4, start=float(START),
        duration_s=None,
    )  # fmt: skip
    sim = build_simulation(options)
    dark = sorted(sim.plan.offline)
    lit = sorted(d.id for d in sim.devices if d.id not in sim.plan.offline)
    assert dark
    assert lit
    session = int(options.start)
    client_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
    config = IngestConfig(
        mqtt=MqttEndpoint.parse(mqtt_url),
        database_url=database_url,
        client_id=client_id,
        pipeline=PipelineOptions(batch_max_delay_s=0.02),
        mqtt_options=MqttOptions(client_id=client_id, session_expiry_s=60),
    )
    args = [
        "simulate", "--mqtt-url", mqtt_url, "--city", str(path), "--seed", "4",
        "--start", START, "--speed", SPEED, "--scenario", "outage", "--duration", "35m",
    ]  # fmt: skip
    async with IngestService(config) as svc:
        await svc.wait_connected(10.0)
        run = asyncio.ensure_future(asyncio.to_thread(main, args))
        try:
            code = await run
        finally:
            await asyncio.wait_for(asyncio.shield(run), 60.0)
        summary = json_line(capsys.readouterr().out)
        assert code == 0
        assert summary["wills"] == len(dark)
        # Published by the devices: online, online again (dark ones), offline at the end.
        assert summary["statuses"] == 2 * (len(dark) + len(lit)) + len(dark)
        for what, ids, state, sess in (
            ("every device online", dark + lit, "online", session),
            ("the dark district offline by its wills", dark, "offline", session),
            ("power back: online with the next session", dark, "online", session + 1),
        ):
            await _until(
                what, functools.partial(_seen, database_url, ids, state, sess), timeout_s=20.0
            )
        # The clean stop: everyone offline, each in its last session.
        await _until(
            "clean stop",
            lambda: (
                _presence(database_url, dark + lit)
                == {
                    **{d: ("offline", session + 1) for d in dark},
                    **{d: ("offline", session) for d in lit},
                }
            ),
            timeout_s=20.0,
        )
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT state, session FROM presence_events WHERE device_id = %s"
            " ORDER BY session, state = 'offline', received_at",
            (dark[0],),
        ).fetchall()
    assert [(str(s), int(n)) for s, n in events] == [
        ("online", session),
        ("offline", session),
        ("online", session + 1),
        ("offline", session + 1),
    ]
