"""Device security on the broker, proven with real clients (mosquitto_pub / _sub, paho, aiomqtt).

Each module broker is its own secured ``EmbeddedMosquitto`` in a temporary
directory: one configured exactly as ``cityops up`` configures it (passwords,
ACLs, a TLS listener signed by the local CA), one whose TLS listener requires
client certificates. The session broker of the other tests stays anonymous.

Mosquitto silently drops a publish the ACL denies (an MQTT 3.1.1 publisher even
gets a normal PUBACK), so "never arrives" is asserted on a subscriber: a marker
published after the denied message arrives, and nothing before it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityops.broker_security import (
    BrokerSecurity,
    CredentialStore,
    Device,
    ServiceUser,
    render_acl_file,
)
from cityops.cli import main
from cityops.embedded import BrokerTuning, EmbeddedMosquitto, render_mosquitto_conf
from cityops.errors import BrokerSecurityError, ConfigError
from cityops.runtime import embedded_broker
from cityops.settings import MqttEndpoint, MqttTlsFiles, Settings
from tests.polling import until_sync

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(
    not (os.path.exists(MOSQUITTO_PUB) and os.path.exists(MOSQUITTO_SUB)),
    reason="mosquitto-clients is not installed",
)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ real clients


@dataclass(frozen=True, slots=True)
class Login:
    """How a client proves who it is: nothing, a password, or a certificate, over TLS or not."""

    port: int
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert: tuple[Path, Path] | None = None

    def args(self) -> list[str]:
        args = ["-h", "localhost" if self.ca_file else "127.0.0.1", "-p", str(self.port)]
        if self.username is not None:
            args += ["-u", self.username]
        if self.password is not None:
            args += ["-P", self.password]
        if self.ca_file is not None:
            args += ["--cafile", str(self.ca_file)]
        if self.cert is not None:
            args += ["--cert", str(self.cert[0]), "--key", str(self.cert[1])]
        return args


def publish(login: Login, topic: str, payload: str, *, retain: bool = False) -> None:
    """mosquitto_pub QoS 1; fails the test when the broker refuses the connection."""
    result = _mosquitto_pub(login, topic, payload, retain=retain)
    assert result.returncode == 0, result.stderr


def publish_refused(login: Login, topic: str = "city/traffic/x/y") -> str:
    """mosquitto_pub that the broker must refuse; returns what the client printed."""
    result = _mosquitto_pub(login, topic, "refused?")
    assert result.returncode != 0, f"{login.username or 'client'} was accepted"
    return result.stderr + result.stdout


def _mosquitto_pub(
    login: Login, topic: str, payload: str, *, retain: bool = False
) -> subprocess.CompletedProcess[str]:
    args = [MOSQUITTO_PUB, *login.args(), "-t", topic, "-m", payload, "-q", "1"]
    return subprocess.run(
        [*args, "-r"] if retain else args,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


_SUB_OPTIONS = ("-q", "1", "-V", "mqttv5", "-v", "-d")


class Subscriber:
    """mosquitto_sub (MQTT 5, QoS 1) on a reader thread: received ``topic payload`` lines."""

    def __init__(self, login: Login, *filters: str) -> None:
        topics = [arg for f in filters for arg in ("-t", f)]
        self._proc = subprocess.Popen(
            # stdbuf: mosquitto_sub's stdio would hold lines back in a pipe's buffer
            ["stdbuf", "-oL", MOSQUITTO_SUB, *login.args(), *topics, *_SUB_OPTIONS],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.subscribed = threading.Event()
        self.lines: queue.Queue[str] = queue.Queue()
        self._output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.subscribed.wait(WAIT_S):
            self.close()
            pytest.fail(f"mosquitto_sub not subscribed: {''.join(self._output)}")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line)
            if line.startswith("Subscribed (mid"):
                self.subscribed.set()
            elif not line.startswith(("Client ", "Subscribed")):
                self.lines.put(line.rstrip("\n"))

    def until_marker(self, marker: str) -> list[str]:
        """Every line received up to the marker line (excluded)."""
        seen: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"marker {marker!r} not received; before it: {seen}")
            if line == marker:
                return seen
            seen.append(line)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(WAIT_S)
        self._reader.join(WAIT_S)  # it reads to the end of the pipe, then the pipe closes
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@contextlib.contextmanager
def subscriber(login: Login, *filters: str) -> Iterator[Subscriber]:
    sub = Subscriber(login, *filters)
    try:
        yield sub
    finally:
        sub.close()


# ---------------------------------------------------------------------- brokers


def reloaded(broker: EmbeddedMosquitto, change: Any) -> Any:
    """Run ``change`` (which reloads the broker) and wait until the broker did."""
    before = broker.log_path.read_text().count("Reloading config.")
    result = change()
    until_sync(
        lambda: broker.log_path.read_text().count("Reloading config.") > before,
        WAIT_S,
        "broker reload",
    )
    return result


@pytest.fixture(scope="module")
def up_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The settings ``cityops up`` reads, with its data in a temporary directory."""
    data_dir = tmp_path_factory.mktemp("secured")
    return Settings.from_env({"CITYOPS_DATA_DIR": str(data_dir)})


@pytest.fixture(scope="module")
def secured(up_settings: Settings) -> Iterator[EmbeddedMosquitto]:
    """The broker of ``cityops up``: passwords, ACLs, TLS with the local CA."""
    broker = embedded_broker(up_settings)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def cert_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMosquitto]:
    """A broker whose TLS listener requires client certificates (CN = username)."""
    data_dir = tmp_path_factory.mktemp("certs")
    security = BrokerSecurity(directory=data_dir / "security", client_certificates=True)
    broker = EmbeddedMosquitto(data_dir, security=security)
    broker.start()
    yield broker
    broker.stop()


def service_login(broker: EmbeddedMosquitto, user: ServiceUser) -> Login:
    assert broker.credentials is not None
    return Login(broker.port, str(user), broker.credentials.service_password(user))


def provision(broker: EmbeddedMosquitto, district: str, **kw: Any) -> tuple[Device, Login]:
    assert broker.credentials is not None
    store = broker.credentials
    result = reloaded(
        broker,
        lambda: (
            store.provision(_name("dev"), domain="traffic", district=district, **kw),
            broker.reload(),
        )[0],
    )
    device = result.device
    return device, Login(broker.port, device.device_id, result.password)


# ------------------------------------------------------------ passwords and ACL


def test_a_provisioned_device_publishes_its_readings_and_status(
    secured: EmbeddedMosquitto,
) -> None:
    district = _name("d")
    device, login = provision(secured, district)
    ingest = service_login(secured, ServiceUser.INGEST)
    with subscriber(ingest, f"city/traffic/{district}/#") as sub:
        publish(login, device.readings_topic, '{"intensity": 12}')
        publish(login, device.status_topic, '{"state": "online", "session": 1}', retain=True)
        publish(service_login(secured, ServiceUser.SIMULATOR), f"city/traffic/{district}/end", "m")
        assert sub.until_marker(f"city/traffic/{district}/end m") == [
            f'{device.readings_topic} {{"intensity": 12}}',
            f'{device.status_topic} {{"state": "online", "session": 1}}',
        ]


def test_a_device_cannot_publish_as_another_device_nor_elsewhere(
    secured: EmbeddedMosquitto,
) -> None:
    district = _name("d")
    device, login = provision(secured, district)
    other, _ = provision(secured, district)
    ingest = service_login(secured, ServiceUser.INGEST)
    # every device topic of the district, any domain; retained ones of other tests stay out
    with subscriber(ingest, f"city/+/{district}/#", "cityops/#") as sub:
        for topic in (
            other.readings_topic,  # another device's readings
            other.status_topic,  # another device's presence
            f"city/emergency/{district}/{device.device_id}",  # its id, another domain
            f"{device.readings_topic}/extra",  # below its own topic
            f"cityops/replay/r1/{device.readings_topic}",  # the replay namespace
            f"cityops/alerts/{district}",  # forged alert events
        ):
            publish(login, topic, "forged")  # accepted by the broker, then dropped
        publish(login, device.readings_topic, "own")
        assert sub.until_marker(f"{device.readings_topic} own") == []


def test_a_device_reads_nothing(secured: EmbeddedMosquitto) -> None:
    district = _name("d")
    device, login = provision(secured, district)
    simulator = service_login(secured, ServiceUser.SIMULATOR)
    publish(simulator, f"city/traffic/{district}/retained", "r", retain=True)
    received: list[str] = []
    subacks: queue.Queue[int] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(login.username, login.password)
    client.on_message = lambda _c, _u, m: received.append(m.topic)
    client.on_subscribe = lambda _c, _u, mid, _codes, _p: subacks.put(mid)
    client.connect("127.0.0.1", secured.port)
    client.loop_start()
    try:
        # Mosquitto 2.0 grants the subscription and then withholds every message.
        _, mid = client.subscribe([("city/#", 1), ("cityops/#", 1), ("#", 1)])
        assert subacks.get(timeout=WAIT_S) == mid
        publish(simulator, device.readings_topic, "to the device itself")
        publish(simulator, f"city/traffic/{district}/other", "to another")
        # The broker writes to one client in order: a SUBACK requested after those
        # publishes comes after anything it would have delivered.
        _, mid = client.subscribe("probe/none", 1)
        assert subacks.get(timeout=WAIT_S) == mid
        assert received == []
    finally:
        client.disconnect()
        client.loop_stop()


def test_anonymous_and_wrong_passwords_are_refused(secured: EmbeddedMosquitto) -> None:
    _, login = provision(secured, _name("d"))
    assert "not authorised" in publish_refused(Login(secured.port))
    assert "not authorised" in publish_refused(Login(secured.port, login.username, "wrong"))
    assert "not authorised" in publish_refused(Login(secured.port, login.username))
    tls_port = secured.tls_port
    assert tls_port is not None
    publish_refused(Login(tls_port, ca_file=secured.ca_file))


def test_the_ingester_reads_through_a_shared_subscription(secured: EmbeddedMosquitto) -> None:
    district = _name("d")
    device, login = provision(secured, district)
    ingest = service_login(secured, ServiceUser.INGEST)
    with subscriber(ingest, f"$share/ingest/city/traffic/{district}/#") as sub:
        publish(login, device.readings_topic, "shared")
        publish(login, device.readings_topic, "end")
        assert sub.until_marker(f"{device.readings_topic} end") == [
            f"{device.readings_topic} shared"
        ]


def test_service_users_are_limited_to_their_topics(secured: EmbeddedMosquitto) -> None:
    district = _name("d")
    api = service_login(secured, ServiceUser.API)
    with subscriber(api, f"city/+/{district}/#", "cityops/#") as sub:
        # the alerts publisher may only publish alert events
        publish(service_login(secured, ServiceUser.ALERTS), f"city/traffic/{district}/x", "no")
        publish(service_login(secured, ServiceUser.ALERTS), f"cityops/alerts/{district}", "a")
        # the ingester publishes no readings
        publish(service_login(secured, ServiceUser.INGEST), f"city/traffic/{district}/x", "no")
        # the simulator is a gateway: any device's topics, and replays
        simulator = service_login(secured, ServiceUser.SIMULATOR)
        publish(simulator, f"city/facility/{district}/any-device", "g")
        publish(simulator, f"cityops/replay/r-{district}/city/traffic/{district}/x", "r")
        publish(simulator, f"cityops/alerts/{district}", "no")
        publish(simulator, f"city/traffic/{district}/end", "end")
        assert sub.until_marker(f"city/traffic/{district}/end end") == [
            f"cityops/alerts/{district} a",
            f"city/facility/{district}/any-device g",
            f"cityops/replay/r-{district}/city/traffic/{district}/x r",
        ]


def test_revoke_and_rotate_take_effect_at_the_reload(secured: EmbeddedMosquitto) -> None:
    assert secured.credentials is not None
    store = secured.credentials
    district = _name("d")
    device, old = provision(secured, district)
    publish(old, device.readings_topic, "before")
    rotated = reloaded(
        secured,
        lambda: (
            store.provision(device.device_id, domain="traffic", district=district, rotate=True),
            secured.reload(),
        )[0],
    )
    publish_refused(old, device.readings_topic)
    new = Login(secured.port, device.device_id, rotated.password)
    publish(new, device.readings_topic, "rotated")
    reloaded(secured, lambda: (store.revoke(device.device_id), secured.reload()))
    assert "not authorised" in publish_refused(new, device.readings_topic)


# ----------------------------------------------------------------------------- TLS


def test_a_device_logs_in_over_tls_with_the_local_ca(secured: EmbeddedMosquitto) -> None:
    district = _name("d")
    device, login = provision(secured, district)
    tls_port = secured.tls_port
    assert tls_port is not None
    assert secured.ca_file is not None
    assert secured.tls_url == f"mqtts://127.0.0.1:{tls_port}"
    over_tls = Login(tls_port, login.username, login.password, ca_file=secured.ca_file)
    ingest = service_login(secured, ServiceUser.INGEST)
    with subscriber(ingest, f"city/traffic/{district}/#") as sub:
        publish(over_tls, device.readings_topic, "tls")
        assert sub.until_marker(f"{device.readings_topic} tls") == []
    # without the CA the server certificate is not trusted
    publish_refused(Login(tls_port, login.username, login.password, ca_file=Path("/dev/null")))


async def test_cityops_clients_connect_over_tls_with_the_configured_ca(
    secured: EmbeddedMosquitto,
) -> None:
    """The ingester (paho, manual acks), the simulator (paho) and the alert publisher
    (aiomqtt) all verify the broker against ``CITYOPS_MQTT_CA``."""
    from ingest.mqtt import InboundMessage, ManualAckClient, MqttOptions  # noqa: PLC0415
    from rules.alerts import Alert, AlertEvent  # noqa: PLC0415
    from rules.service import MqttAlertPublisher  # noqa: PLC0415
    from simulators.mqtt import MqttPublisher  # noqa: PLC0415

    assert secured.credentials is not None
    assert secured.ca_file is not None
    settings = Settings.from_env({"CITYOPS_MQTT_CA": str(secured.ca_file)})

    def endpoint(user: ServiceUser) -> MqttEndpoint:
        assert secured.credentials is not None
        password = secured.credentials.service_password(user)
        return settings.mqtt_endpoint(f"mqtts://{user}:{password}@localhost:{secured.tls_port}")

    district = _name("d")
    got: list[InboundMessage] = []
    arrived = asyncio.Event()

    def on_message(message: InboundMessage) -> None:
        got.append(message)
        arrived.set()

    options = MqttOptions(client_id=_name("tls-ingest"), session_expiry_s=0)
    async with ManualAckClient(
        endpoint(ServiceUser.INGEST),
        options,
        subscriptions=[f"city/traffic/{district}/#"],
        on_message=on_message,
    ) as ingest:
        await ingest.wait_connected(WAIT_S)
        publisher = MqttPublisher(endpoint(ServiceUser.SIMULATOR), client_id=_name("tls-sim"))
        with publisher:
            publisher.publish(f"city/traffic/{district}/sim-1", b"1", qos=1)
            assert publisher.drain(WAIT_S)
        await asyncio.wait_for(arrived.wait(), WAIT_S)
        assert [m.topic for m in got] == [f"city/traffic/{district}/sim-1"]

    with subscriber(service_login(secured, ServiceUser.API), f"cityops/alerts/{district}") as sub:
        alerts = MqttAlertPublisher(endpoint(ServiceUser.ALERTS), client_id=_name("tls-alerts"))
        alert = Alert(
            id=district,
            rule_id="r",
            subject="s",
            severity="minor",
            state="active_unacked",
            version=1,
            message="m",
            raised_at=0.0,
            updated_at=0.0,
        )
        event = AlertEvent(district, 1, "raise", "normal", "active_unacked", "cityops", 0.0)
        try:
            await alerts.publish(alert, event)
        finally:
            await alerts.close()
        line = await asyncio.to_thread(sub.lines.get, timeout=WAIT_S)
        assert line.startswith(f"cityops/alerts/{district} ")


def test_a_client_certificate_signed_by_the_ca_is_the_device_identity(
    cert_broker: EmbeddedMosquitto,
) -> None:
    assert cert_broker.credentials is not None
    assert cert_broker.tls_port is not None
    district = _name("d")
    device, _ = provision(cert_broker, district, certificate=True)
    assert device.cert_serial is not None
    clients = cert_broker.credentials.ca.directory / "clients"
    cert = (clients / f"{device.device_id}.crt", clients / f"{device.device_id}.key")
    with_cert = Login(cert_broker.tls_port, ca_file=cert_broker.ca_file, cert=cert)
    ingest = service_login(cert_broker, ServiceUser.INGEST)
    with subscriber(ingest, f"city/traffic/{district}/#") as sub:
        publish(with_cert, f"city/traffic/{district}/someone-else", "forged")
        publish(with_cert, device.readings_topic, "by certificate")
        # its ACL applied: the broker took the certificate's CN as the username
        assert sub.until_marker(f"{device.readings_topic} by certificate") == []
    assert f"u'{device.device_id}'" in cert_broker.log_path.read_text()
    # no certificate, or a password instead, is refused on this listener
    publish_refused(Login(cert_broker.tls_port, ca_file=cert_broker.ca_file))
    # revoked: the CRL is reread at the reload
    store = cert_broker.credentials
    reloaded(cert_broker, lambda: (store.revoke(device.device_id), cert_broker.reload()))
    publish_refused(with_cert, device.readings_topic)


def test_a_certificate_not_signed_by_the_ca_is_refused(
    cert_broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    from cityops.broker_tls import LocalCertificateAuthority  # noqa: PLC0415

    assert cert_broker.tls_port is not None
    district = _name("d")
    device, _ = provision(cert_broker, district, certificate=True)
    rogue_ca = LocalCertificateAuthority(tmp_path / "rogue")
    rogue = rogue_ca.issue_client_certificate(device.device_id)  # same CN, other CA
    login = Login(
        cert_broker.tls_port, ca_file=cert_broker.ca_file, cert=(rogue.cert_file, rogue.key_file)
    )
    publish_refused(login, device.readings_topic)


# -------------------------------------------------------------------------- CLI


def test_devices_cli_provisions_lists_and_revokes(
    secured: EmbeddedMosquitto,
    up_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CITYOPS_DATA_DIR", str(up_settings.data_dir))
    monkeypatch.delenv("CITYOPS_MQTT_URL", raising=False)
    monkeypatch.delenv("CITYOPS_BROKER_SECURITY_DIR", raising=False)
    device_id, district = _name("cli"), _name("d")
    argv = ["devices", "provision", device_id, "--domain", "facility", "--district", district]
    assert reloaded(secured, lambda: main(argv)) == 0
    out = capsys.readouterr().out
    password = next(line.split()[1] for line in out.splitlines() if "password:" in line)
    assert "embedded broker reloaded" in out
    assert f"city/facility/{district}/{device_id}/status" in out
    publish(Login(secured.port, device_id, password), f"city/facility/{district}/{device_id}", "1")

    assert main(argv) == 1  # already provisioned: --rotate is needed
    assert "--rotate" in capsys.readouterr().err

    assert main(["devices", "list"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [device_id, "facility", district, "password"] in [row[:4] for row in listed]

    assert reloaded(secured, lambda: main(["devices", "revoke", device_id])) == 0
    assert "revoked" in capsys.readouterr().out
    publish_refused(Login(secured.port, device_id, password))
    assert main(["devices", "revoke", device_id]) == 1


# ------------------------------------------------------------------ files, units


def test_broker_files_hold_hashes_only_and_are_private(secured: EmbeddedMosquitto) -> None:
    assert secured.credentials is not None
    store = secured.credentials
    result = store.provision(_name("dev"), domain="emergency", district="d1", certificate=True)
    assert result.password is not None
    passwd = store.password_file.read_text()
    assert result.password not in passwd
    assert f"{result.device.device_id}:$7$" in passwd  # PBKDF2-SHA512 from mosquitto_passwd
    for path in (
        store.password_file,
        store.acl_file,
        store.directory / "registry.json",
        store.ca.directory / "ca.key",
        store.ca.directory / "server.key",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for user in ServiceUser:  # generated once, reused by every start
        assert store.service_password(user) is not None
    before = {user: store.service_password(user) for user in ServiceUser}
    assert store.ensure_service_credentials() == before


def test_provisioning_refuses_bad_names_and_unknown_devices(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "security")
    with pytest.raises(BrokerSecurityError, match="must match"):
        store.provision("Dev_1", domain="traffic", district="d")
    with pytest.raises(BrokerSecurityError, match="must match"):
        store.provision("dev-1", domain="traffic", district="d\nuser x")
    with pytest.raises(BrokerSecurityError, match="domain 'water'"):
        store.provision("dev-1", domain="water", district="d")
    with pytest.raises(BrokerSecurityError, match="service user"):
        store.provision("cityops-ingest", domain="traffic", district="d")
    with pytest.raises(BrokerSecurityError, match="nothing to rotate"):
        store.provision("dev-1", domain="traffic", district="d", rotate=True)
    with pytest.raises(BrokerSecurityError, match="not provisioned"):
        store.revoke("dev-1")


def test_acl_gives_a_device_its_two_topics_only() -> None:
    acl = render_acl_file([Device("cam-7", "traffic", "north")])
    block = acl.split("user cam-7\n")[1].strip().splitlines()
    assert block == [
        "topic write city/traffic/north/cam-7",
        "topic write city/traffic/north/cam-7/status",
    ]
    assert "user cityops-simulator\ntopic readwrite city/#\n" in acl


def test_conf_without_security_stays_anonymous_and_with_it_is_closed(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1883,
        "data_dir": tmp_path,
        "log_path": tmp_path / "log",
        "tuning": BrokerTuning(),
        "as_root": False,
    }
    assert "allow_anonymous true" in render_mosquitto_conf(**common)
    closed = render_mosquitto_conf(**common, security_lines=["allow_anonymous false"])
    assert "allow_anonymous true" not in closed
    assert closed.rstrip().endswith("allow_anonymous false")


def test_settings_read_the_tls_and_broker_security_variables(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CITYOPS_DATA_DIR": str(tmp_path),
            "CITYOPS_MQTT_CA": "/etc/ca.pem",
            "CITYOPS_BROKER_TLS_LISTEN": "0.0.0.0:8883",
            "CITYOPS_BROKER_CLIENT_CERTS": "1",
            "CITYOPS_BROKER_TLS_NAMES": "mqtt.city.example, 10.0.0.5",
        }
    )
    assert settings.mqtt_tls == MqttTlsFiles(ca_file=Path("/etc/ca.pem"))
    assert settings.mqtt_endpoint("mqtts://h").ca_file == Path("/etc/ca.pem")
    assert settings.mqtt_endpoint("mqtt://h").ca_file is None  # plain: no TLS files
    security = settings.broker_security
    assert security is not None
    assert security.directory == tmp_path / "mosquitto" / "security"
    assert (security.tls_host, security.tls_port) == ("0.0.0.0", 8883)
    assert security.client_certificates
    assert security.server_names == ("mqtt.city.example", "10.0.0.5")
    off = Settings.from_env({"CITYOPS_BROKER_TLS_LISTEN": "off"}).broker_security
    assert off is not None
    assert not off.tls
    with pytest.raises(ConfigError, match="CITYOPS_BROKER_TLS_LISTEN"):
        Settings.from_env({"CITYOPS_BROKER_TLS_LISTEN": "8883"})
    with pytest.raises(ConfigError, match="go together"):
        Settings.from_env({"CITYOPS_BROKER_TLS_CA": "/ca.pem"})
    missing_ca = MqttTlsFiles(ca_file=tmp_path / "no-such-ca.pem")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        MqttEndpoint.parse("mqtts://h", tls_files=missing_ca).ssl_context()
