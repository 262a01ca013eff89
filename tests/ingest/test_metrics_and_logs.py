"""The /metrics endpoint and the structured log lines."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
import urllib.request

import orjson

from cityops.logs import JsonFormatter
from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import publish_all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_endpoint_serves_the_ingest_counters(
    ingest_service: ServiceFactory, mqtt_url: str
) -> None:
    port = _free_port()
    async with ingest_service(metrics_port=port) as svc:
        await asyncio.to_thread(
            publish_all,
            mqtt_url,
            [("city/traffic/chuo/metrics-1", b'{"v": 1}'), ("city/traffic/chuo/metrics-1", b"{")],
        )
        deadline = time.monotonic() + 20
        while svc.metrics.received._value.get() < 2:
            assert time.monotonic() < deadline, "messages not received"
            await asyncio.sleep(0.02)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        )
    text = body.decode()
    for name in (
        "cityops_ingest_messages_received_total 2.0",
        "cityops_ingest_readings_stored_total 1.0",
        "cityops_ingest_dead_letters_total{kind=",
        "cityops_ingest_duplicates_skipped_total",
        "cityops_ingest_batch_commit_seconds_bucket",
        "cityops_ingest_queue_depth",
        "cityops_ingest_ack_lag_seconds",
        "cityops_ingest_mqtt_connected 1.0",
        "cityops_replay_messages_received_total",
    ):
        assert name in text, name


def test_json_log_lines_carry_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cityops.test.jsonlog")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("holding %d messages", 12, extra={"batch": 3})
        try:
            msg = "boom"
            raise ValueError(msg)
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (
        orjson.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{"
    )
    assert first["level"] == "warning"
    assert first["msg"] == "holding 12 messages"
    assert first["batch"] == 3
    assert first["logger"] == "cityops.test.jsonlog"
    assert first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]
