"""Fixtures for running the ingest service in-process against the test broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace

import pytest

from cityops.settings import MqttEndpoint
from ingest.mqtt import MqttOptions
from ingest.pipeline import PipelineOptions
from ingest.service import IngestConfig, IngestService

ServiceFactory = Callable[..., AbstractAsyncContextManager[IngestService]]


@pytest.fixture
def ingest_config(mqtt_url: str, database_url: str) -> IngestConfig:
    client_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
    return IngestConfig(
        mqtt=MqttEndpoint.parse(mqtt_url),
        database_url=database_url,
        client_id=client_id,
        pipeline=PipelineOptions(batch_max_delay_s=0.02),
        # Short session expiry: ended tests must not leave queues on the broker.
        mqtt_options=MqttOptions(client_id=client_id, session_expiry_s=60),
    )


@pytest.fixture
def ingest_service(ingest_config: IngestConfig) -> ServiceFactory:
    """``async with ingest_service(**overrides) as svc`` runs a connected ingester."""

    @asynccontextmanager
    async def run(**overrides: object) -> AsyncIterator[IngestService]:
        config = replace(ingest_config, **overrides)  # type: ignore[arg-type]
        async with IngestService(config) as svc:
            await svc.wait_connected(10.0)
            yield svc

    return run
