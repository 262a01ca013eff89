"""paho's Properties behave the same with the speed-up installed."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest import paho_speedups

paho_speedups.install()


def _props(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def test_publish_properties_round_trip() -> None:
    props = _props(PacketTypes.PUBLISH)
    assert props.isEmpty()
    props.ContentType = "application/senml+json"
    props.UserProperty = ("cityops-drill", "r1")
    props.UserProperty = ("k", "v")
    assert not props.isEmpty()
    packed = props.pack()
    # Same bytes paho's own encoding defines: length, then (id, value) pairs.
    assert packed == (
        b"\x34"
        b"\x03\x00\x16application/senml+json"
        b"\x26\x00\x0dcityops-drill\x00\x02r1"
        b"\x26\x00\x01k\x00\x01v"
    )
    decoded, length = _props(PacketTypes.PUBLISH).unpack(packed)
    assert length == len(packed)
    assert decoded.ContentType == "application/senml+json"
    assert decoded.UserProperty == [("cityops-drill", "r1"), ("k", "v")]


def test_clear_and_is_empty() -> None:
    props = _props(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 60
    props.ReceiveMaximum = 100
    props.clear()
    assert props.isEmpty()
    assert props.pack() == b"\x00"


def test_validation_is_unchanged() -> None:
    props = _props(PacketTypes.PUBLISH)
    with pytest.raises(MQTTException, match="does not apply"):
        props.ReceiveMaximum = 10
    connect = _props(PacketTypes.CONNECT)
    with pytest.raises(MQTTException, match="range 1-65535"):
        connect.ReceiveMaximum = 0
    with pytest.raises(MQTTException, match="must be one of"):
        connect.NoSuchProperty = 1


def test_instances_do_not_share_values() -> None:
    a = _props(PacketTypes.PUBLISH)
    b = _props(PacketTypes.PUBLISH)
    a.ContentType = "x"
    assert b.isEmpty()
