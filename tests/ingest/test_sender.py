"""The broker-stamped sender check (``--sender-property``): pure pipeline, no services."""

from __future__ import annotations

import asyncio
import time

import orjson

from ingest import CommittedBatch, PipelineOptions
from ingest.mqtt import InboundMessage
from ingest.pipeline import DiscardingStore, IngestPipeline

OPTIONS = PipelineOptions(
    batch_max_delay_s=0.01,
    sender_property="sender",
    trusted_senders=frozenset({"cityops-simulator"}),
)


def _message(topic: str, payload: object, sender: str | None) -> InboundMessage:
    props = () if sender is None else (("sender", sender),)
    return InboundMessage(
        topic=topic,
        payload=orjson.dumps(payload),
        qos=0,
        retain=False,
        content_type=None,
        user_properties=props,
        mid=0,
        generation=0,
        received_at=time.time(),
    )


async def _run(options: PipelineOptions, *messages: InboundMessage) -> list[CommittedBatch]:
    committed: list[CommittedBatch] = []

    class Sink:
        def on_batch(self, batch: CommittedBatch) -> None:
            committed.append(batch)

    pipeline = IngestPipeline(store=DiscardingStore(), options=options, sinks=(Sink(),))
    task = asyncio.create_task(pipeline.run())
    for message in messages:
        pipeline.on_message(message)
    pipeline.stop()
    await task
    return committed


async def test_a_reading_published_by_another_device_is_dead_lettered() -> None:
    now = time.time()
    reading = {"ts": now, "level": 1.0}
    batches = await _run(
        OPTIONS,
        _message("city/facility/kita/tank-1", reading, "tank-1"),  # itself
        _message("city/facility/kita/tank-1", reading, "tank-2"),  # another device
        _message("city/facility/kita/tank-1", reading, "cityops-simulator"),  # a gateway
        _message("city/facility/kita/tank-1", reading, None),  # the broker did not tell
        _message("city/facility/kita/tank-1/status", {"state": "online", "session": 1}, "x"),
    )
    readings = [r for b in batches for r in b.readings]
    letters = [d for b in batches for d in b.dead_letters]
    presences = [p for b in batches for p in b.presences]
    assert len(readings) == 3
    assert [d.reason for d in letters] == [
        "sender mismatch: published by 'tank-2', topic names 'tank-1'",
        "sender mismatch: published by 'x', topic names 'tank-1'",
    ]
    assert presences == []


async def test_without_the_option_the_topic_is_trusted() -> None:
    reading = {"ts": time.time(), "level": 1.0}
    batches = await _run(
        PipelineOptions(batch_max_delay_s=0.01),
        _message("city/facility/kita/tank-1", reading, "tank-2"),
    )
    assert [len(b.readings) for b in batches] == [1]
    assert all(not b.dead_letters for b in batches)
