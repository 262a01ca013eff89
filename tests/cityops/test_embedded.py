"""The embedded Mosquitto and PostgreSQL, against the real programs (no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import signal
import socket
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.embedded import (
    BrokerTuning,
    EmbeddedMosquitto,
    EmbeddedPostgres,
    render_mosquitto_conf,
)
from cityops.errors import EmbeddedServiceError

WAIT_S = 10.0


# ----------------------------------------------------------------------- MQTT client


class MqttProbe:
    """A paho MQTT 5 client on its network thread; what it receives goes to a queue."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.connected = threading.Event()
        self.session_present = False
        self.connack_properties: Properties | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        self.session_present = flags.session_present
        self.connack_properties = properties
        self.connected.set()

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: Any,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._subacks.setdefault(mid, threading.Event()).set()

    def subscribe(self, topic: str) -> None:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        with self._lock:
            done = self._subacks.setdefault(mid, threading.Event())
        assert done.wait(WAIT_S), f"no SUBACK for {topic} within {WAIT_S} s"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"no PUBACK for {topic} within {WAIT_S} s"

    def next_message(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"no message within {WAIT_S} s")


@contextlib.contextmanager
def mqtt_client(
    port: int,
    client_id: str,
    *,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> Iterator[MqttProbe]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    probe = MqttProbe(client)
    client.on_connect = probe.on_connect
    client.on_message = probe.on_message
    client.on_subscribe = probe.on_subscribe
    if protocol == MQTTProtocolVersion.MQTTv5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry_s
        client.connect("127.0.0.1", port, clean_start=clean_start, properties=properties)
    else:
        client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert probe.connected.wait(WAIT_S), f"no CONNACK within {WAIT_S} s"
        yield probe
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    """A port held by a listener that is not ours to stop."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def fake_mosquitto(directory: Path, script: str) -> Path:
    """An executable standing in for mosquitto, to reach the failure paths."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fake-mosquitto"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


# -------------------------------------------------------------------------- Mosquitto


def test_config_carries_the_tuning_and_clamps_to_a_c_int(tmp_path: Path) -> None:
    conf = render_mosquitto_conf(
        host="127.0.0.1",
        port=1234,
        data_dir=tmp_path,
        log_path=tmp_path / "mosquitto.log",
        tuning=BrokerTuning(),
        as_root=True,
    )
    lines = set(conf.splitlines())
    assert {
        "listener 1234 127.0.0.1",
        "persistence true",
        f"persistence_location {tmp_path}/",
        "autosave_interval 5",
        "max_inflight_messages 10000",
        "max_queued_messages 2000000",
        # 2 GiB is 2**31, which Mosquitto 2.0's atoi() would turn into "unlimited".
        "max_queued_bytes 2147483647",
        "message_size_limit 1048576",
        "set_tcp_nodelay true",
        "allow_anonymous true",
        f"log_dest file {tmp_path / 'mosquitto.log'}",
        "user root",
    } <= lines
    not_root = render_mosquitto_conf(
        host="127.0.0.1",
        port=1234,
        data_dir=tmp_path,
        log_path=tmp_path / "mosquitto.log",
        tuning=BrokerTuning(),
        as_root=False,
    )
    assert "user root" not in not_root


def test_broker_accepts_an_mqtt5_client(broker: EmbeddedMosquitto) -> None:
    assert broker.is_running()
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    topic = f"test/embedded/{uuid.uuid4().hex}"
    with mqtt_client(broker.port, f"t-{uuid.uuid4().hex}") as probe:
        # The broker announces its in-flight window: our tuning, not the default 20.
        assert probe.connack_properties is not None
        receive_maximum = getattr(probe.connack_properties, "ReceiveMaximum", None)
        assert receive_maximum == BrokerTuning().max_inflight_messages
        probe.subscribe(topic)
        probe.publish(topic, b"hello")
        message = probe.next_message()
    assert (message.topic, message.payload) == (topic, b"hello")


def test_retained_and_queued_messages_survive_a_restart(
    running_broker: EmbeddedMosquitto,
) -> None:
    broker = running_broker
    prefix = f"test/embedded/{uuid.uuid4().hex}"
    subscriber_id = f"t-sub-{uuid.uuid4().hex}"
    # clean_start=False from the first connection: Mosquitto 2.0 saves an MQTT 5
    # session to its store only then (one begun with clean_start=True and an
    # expiry works until the broker restarts, and is lost by it).
    with mqtt_client(
        broker.port, subscriber_id, clean_start=False, session_expiry_s=300
    ) as subscriber:
        subscriber.subscribe(f"{prefix}/queued")
    # The subscriber is offline with a persistent session: the broker queues for it.
    with mqtt_client(broker.port, f"t-pub-{uuid.uuid4().hex}") as publisher:
        publisher.publish(f"{prefix}/retained", b"kept", retain=True)
        publisher.publish(f"{prefix}/queued", b"waiting")
    port = broker.port

    broker.stop()
    assert not broker.is_running()
    broker.start()

    assert broker.port == port
    with mqtt_client(
        broker.port, subscriber_id, clean_start=False, session_expiry_s=300
    ) as subscriber:
        assert subscriber.session_present
        queued = subscriber.next_message()
    assert (queued.topic, queued.payload) == (f"{prefix}/queued", b"waiting")
    with mqtt_client(broker.port, f"t-late-{uuid.uuid4().hex}") as late:
        late.subscribe(f"{prefix}/retained")
        retained = late.next_message()
    assert (retained.payload, retained.retain) == (b"kept", True)


def test_broker_drops_an_oversized_message_and_keeps_the_device(
    broker: EmbeddedMosquitto,
) -> None:
    topic = f"test/embedded/{uuid.uuid4().hex}"
    oversized = b"x" * (BrokerTuning().message_size_limit + 1)
    with (
        mqtt_client(broker.port, f"t-sub-{uuid.uuid4().hex}") as subscriber,
        # An MQTT 3.1.1 device: it gets a PUBACK, so it does not resend forever.
        mqtt_client(
            broker.port, f"t-dev-{uuid.uuid4().hex}", protocol=MQTTProtocolVersion.MQTTv311
        ) as device,
    ):
        subscriber.subscribe(topic)
        device.publish(topic, oversized)
        device.publish(topic, b"small")
        assert subscriber.next_message().payload == b"small"
        assert device.client.is_connected()


def test_port_is_recorded_and_reused_by_a_new_instance(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    first = EmbeddedMosquitto(data_dir)
    with first:
        port = first.port
        assert (data_dir / "mosquitto.pid").read_text().strip() == str(_pid_of(first))
    assert not first.is_running()
    assert json.loads((data_dir / "state.json").read_text()) == {"port": port}

    second = EmbeddedMosquitto(data_dir)
    with second:
        assert second.port == port
        second.restart()
        assert second.port == port
        assert second.is_running()


def test_a_later_instance_sees_and_adopts_a_running_broker(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    owner = EmbeddedMosquitto(data_dir)
    with owner:
        later = EmbeddedMosquitto(data_dir)
        assert later.is_running()
        assert later.port == owner.port
        later.start()  # adopts: no second broker
        assert _pid_of(later) == _pid_of(owner)
        later.stop()
        assert not owner.is_running()


def test_a_taken_recorded_port_is_replaced(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    with EmbeddedMosquitto(data_dir):
        pass
    with occupied_port() as taken:
        (data_dir / "state.json").write_text(json.dumps({"port": taken}))
        with EmbeddedMosquitto(data_dir) as second:
            assert second.port != taken
            assert json.loads((data_dir / "state.json").read_text()) == {"port": second.port}


def test_explicit_port_in_use_is_a_clear_error(embedded_root: Path) -> None:
    with occupied_port() as taken:
        broker = EmbeddedMosquitto(embedded_root / f"mq-{uuid.uuid4().hex}", port=taken)
        with pytest.raises(EmbeddedServiceError, match=rf"mosquitto on port {taken}: .*in use"):
            broker.start()
        assert not broker.is_running()


def test_unusable_data_dir_is_a_clear_error(embedded_root: Path) -> None:
    not_a_dir = embedded_root / f"file-{uuid.uuid4().hex}"
    not_a_dir.write_text("")
    broker = EmbeddedMosquitto(not_a_dir / "mq")
    with pytest.raises(EmbeddedServiceError, match=r"data directory .* is unusable") as failure:
        broker.start()
    assert str(not_a_dir) in str(failure.value)


def test_a_crash_leaves_a_stale_pid_file_that_start_ignores(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    broker = EmbeddedMosquitto(data_dir)
    broker.start()
    os.kill(_pid_of(broker), signal.SIGKILL)
    try:
        broker.start()
        assert broker.is_running()
        broker.stop(kill=True)
        assert not broker.is_running()
        assert not (data_dir / "mosquitto.pid").exists()
    finally:
        broker.stop()


def test_start_timeout_names_the_configured_number(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    silent = fake_mosquitto(data_dir / "bin", "echo 'fake broker never listens'\nexec sleep 60")
    broker = EmbeddedMosquitto(data_dir, start_timeout_s=0.5, mosquitto_bin=silent)
    with pytest.raises(EmbeddedServiceError) as failure:
        broker.start()
    text = str(failure.value)
    assert "configured timeout 0.5 s" in text
    assert "fake broker never listens" in text  # the log tail
    assert not broker.is_running()  # killed, not left behind


def test_a_broker_that_exits_reports_its_log(embedded_root: Path) -> None:
    data_dir = embedded_root / f"mq-{uuid.uuid4().hex}"
    failing = fake_mosquitto(data_dir / "bin", "echo 'Error: bad configuration' >&2\nexit 3")
    broker = EmbeddedMosquitto(data_dir, mosquitto_bin=failing)
    with pytest.raises(EmbeddedServiceError, match="exited with code 3") as failure:
        broker.start()
    assert "Error: bad configuration" in str(failure.value)
    assert failure.value.log_path == data_dir / "mosquitto.log"


def _pid_of(broker: EmbeddedMosquitto) -> int:
    return int((broker.data_dir / "mosquitto.pid").read_text())


# ------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg(embedded_root: Path) -> Iterator[EmbeddedPostgres]:
    """A cluster of this module's own: the tests stop and crash it."""
    server = EmbeddedPostgres(embedded_root / "pg-lifecycle")
    server.start()
    yield server
    server.stop()


def test_postgres_starts_with_timescaledb(pg: EmbeddedPostgres) -> None:
    assert pg.is_running()
    assert pg.url().startswith("postgresql://cityops:")
    assert pg.url().endswith(f"@127.0.0.1:{pg.port}/cityops")
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        assert row is not None
        names = [
            "shared_preload_libraries",
            "timescaledb.telemetry_level",  # not in pg_settings: this build has no telemetry
            "listen_addresses",
            "synchronous_commit",
            "max_wal_size",
            "checkpoint_timeout",
            "password_encryption",
        ]
        settings = {name: _show(conn, name) for name in names}
    assert settings == {
        "shared_preload_libraries": "timescaledb",
        "timescaledb.telemetry_level": "off",
        "listen_addresses": "127.0.0.1",
        "synchronous_commit": "on",
        "max_wal_size": "4GB",
        "checkpoint_timeout": "15min",
        "password_encryption": "scram-sha-256",
    }


def _show(conn: psycopg.Connection[tuple[Any, ...]], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def test_password_is_required_and_kept_private(pg: EmbeddedPostgres) -> None:
    wrong = f"postgresql://cityops:not-the-password@127.0.0.1:{pg.port}/cityops"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5).close()
    password_file = pg.data_dir / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().strip() in pg.url()
    # The owner may use the Unix socket without a password (peer authentication).
    with psycopg.connect(
        host=str(pg.socket_dir), port=pg.port, user="cityops", dbname="postgres"
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("cityops",)


def test_cluster_runs_as_postgres_when_root(pg: EmbeddedPostgres) -> None:
    if os.geteuid() != 0:
        pytest.skip("runs as the current user when not root")
    info = pg.pgdata.stat()
    postgres_uid = pwd.getpwnam("postgres").pw_uid
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (postgres_uid, 0o700)


def test_data_survives_stop_and_start(pg: EmbeddedPostgres) -> None:
    table = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(pg.url()) as conn:
        conn.execute(f"CREATE TABLE {table} (v int)")
        conn.execute(f"INSERT INTO {table} VALUES (42)")
    port = pg.port

    pg.stop()
    assert not pg.is_running()
    pg.start()

    assert pg.port == port
    with psycopg.connect(pg.url()) as conn:
        assert conn.execute(f"SELECT v FROM {table}").fetchall() == [(42,)]


def test_immediate_stop_then_start_recovers(pg: EmbeddedPostgres) -> None:
    table = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(pg.url()) as conn:
        conn.execute(f"CREATE TABLE {table} (v int)")
        conn.execute(f"INSERT INTO {table} VALUES (7)")

    pg.stop(mode="immediate")
    assert not pg.is_running()
    pg.start()

    with psycopg.connect(pg.url()) as conn:
        assert conn.execute(f"SELECT v FROM {table}").fetchall() == [(7,)]
    assert "automatic recovery in progress" in pg.log_path.read_text()


def test_start_is_idempotent_and_a_later_instance_adopts(pg: EmbeddedPostgres) -> None:
    pg.start()
    later = EmbeddedPostgres(pg.data_dir)
    assert later.is_running()
    assert later.port == pg.port
    later.start()
    assert later.url("postgres") == pg.url("postgres")
    later.ensure_database("adopted")
    later.ensure_database("adopted")
    with psycopg.connect(pg.url("adopted")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("adopted",)


def test_unknown_stop_mode_is_refused(pg: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="stop mode"):
        pg.stop(mode="gentle")
    assert pg.is_running()


def test_postgres_explicit_port_in_use_is_a_clear_error(embedded_root: Path) -> None:
    with occupied_port() as taken:
        server = EmbeddedPostgres(embedded_root / f"pg-{uuid.uuid4().hex}", port=taken)
        with pytest.raises(EmbeddedServiceError, match=rf"postgresql on port {taken}: .*in use"):
            server.start()
        assert not server.is_running()


def test_postgres_unusable_data_dir_is_a_clear_error(embedded_root: Path) -> None:
    not_a_dir = embedded_root / f"file-{uuid.uuid4().hex}"
    not_a_dir.write_text("")
    with pytest.raises(EmbeddedServiceError, match=r"data directory .* is unusable"):
        EmbeddedPostgres(not_a_dir / "pg").start()


def test_postgres_names_a_parent_it_cannot_enter(embedded_root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another account")
    closed = embedded_root / f"closed-{uuid.uuid4().hex}"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    with pytest.raises(EmbeddedServiceError, match=f"cannot enter {closed}"):
        EmbeddedPostgres(closed / "pg").start()


# --------------------------------------------------------------------- test fixtures


def test_database_url_is_a_fresh_migrated_database(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert name is not None
    assert name[0].startswith("t_")
    assert applied is not None
    assert applied[0] >= 1
