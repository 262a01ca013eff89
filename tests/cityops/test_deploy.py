"""deploy/: the compose file, the broker config, the image's scripts and the systemd units.

Everything here runs offline and without a Docker daemon:

* ``docker-compose config`` (compose v1.29, Debian's ``docker-compose``) parses
  and validates deploy/docker-compose.yml against the compose specification.
  The compose v2 plugin is not on the build machine; v1.29 reads the same
  (versionless) format.
* deploy/mosquitto/ is run for real in the local Mosquitto with the accounts
  that deploy/gen-secrets.sh writes.
* ``systemd-analyze verify`` checks the units.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import generate_latest

from cityops.embedded import BrokerTuning, render_mosquitto_conf
from ingest.metrics import IngestMetrics
from tests.polling import until_sync

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
UNITS = DEPLOY / "systemd"
DOCS = ROOT / "docs" / "operations.md"
WAIT_S = 10.0

FIXED_NAMES = {
    "CITYOPS_MQTT_URL",
    "CITYOPS_DATABASE_URL",
    "CITYOPS_HTTP",
    "CITYOPS_RULES",
    "CITYOPS_DATA_DIR",
}
CITYOPS_SERVICES = {"migrate", "ingest-1", "ingest-2", "rules", "api", "simulator"}
LONG_RUNNING = {"db", "broker", "ingest-1", "ingest-2", "rules", "api"}


# ------------------------------------------------------------------------ compose


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package, compose v1.29) is not installed")
    return exe


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f deploy/docker-compose.yml ARGS`` (no daemon involved)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (merge keys, interpolation)."""
    result = compose("config")
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def test_compose_file_is_versionless_compose_spec() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw  # the compose specification; v2 warns on `version`


def test_compose_config_validates_and_has_every_service(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"db", "broker"} | CITYOPS_SERVICES


def test_compose_long_running_services_have_healthchecks(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"], f"{name} has an empty healthcheck"
    assert services["db"]["healthcheck"]["test"][1] == "pg_isready"
    assert "mosquitto_sub" in services["broker"]["healthcheck"]["test"]
    assert services["api"]["healthcheck"]["test"][1:] == ["cityops-healthcheck", "api"]


def test_compose_uses_only_the_fixed_environment_names(config: dict[str, Any]) -> None:
    for name in CITYOPS_SERVICES:
        env = config["services"][name].get("environment", {})
        for key in env:
            if key.startswith("CITYOPS_"):
                base = key.removesuffix("_FILE")
                assert base in FIXED_NAMES, f"{name}: {key} is not a fixed name (DESIGN.md)"
    assert config["services"]["api"]["environment"]["CITYOPS_HTTP"] == "0.0.0.0:8080"
    # No credentials in the file: the URLs that hold them come from docker secrets.
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"[a-z]+://[^\s/@]+:[^\s/@]+@", text)
    assert "postgresql://" not in text


def test_compose_start_order_and_migrate_one_shot(config: dict[str, Any]) -> None:
    services = config["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("ingest-1", "ingest-2", "rules", "api"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["broker"]["condition"] == "service_healthy", name


def test_compose_ingest_members_share_a_group_with_stable_distinct_ids(
    config: dict[str, Any],
) -> None:
    services = config["services"]
    ids = []
    for name in ("ingest-1", "ingest-2"):
        command = services[name]["command"]
        assert command[0] == "ingest"
        assert "--shared-group=ingest" in command
        assert "--no-rules" in command
        ids += [arg for arg in command if arg.startswith("--client-id=")]
        # Longer than the ingester's own 30 s flush deadline.
        assert services[name]["stop_grace_period"] in ("45s", "1m")
    assert len(set(ids)) == 2
    rules = services["rules"]["command"]
    assert rules[0] == "rules"  # the rules engine alone: it stores nothing
    assert not any(arg.startswith("--shared-group") for arg in rules)


def test_compose_database_is_timescaledb_apache_only(config: dict[str, Any]) -> None:
    db = config["services"]["db"]
    assert db["image"] == "timescale/timescaledb:2.19.3-pg15"
    assert "timescaledb.license=apache" in db["command"]
    assert db["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in _volume_specs(db))


def test_compose_broker_mounts_auth_files_and_keeps_data(config: dict[str, Any]) -> None:
    broker = config["services"]["broker"]
    assert broker["image"] == "eclipse-mosquitto:2"
    specs = _volume_specs(broker)
    for name in ("mosquitto.conf", "acl", "passwd"):
        assert any(f"/mosquitto/config/{name}" in v for v in specs), name
    assert any(v.endswith(":/mosquitto/data") for v in specs)


def _volume_specs(service: dict[str, Any]) -> list[str]:
    """Volumes as ``source:target`` strings, whichever syntax docker-compose printed."""
    specs = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            specs.append(volume.removesuffix(":ro").removesuffix(":rw"))
        else:
            specs.append(f"{volume['source']}:{volume['target']}")
    return specs


def test_compose_simulator_is_behind_a_profile(config: dict[str, Any]) -> None:
    assert config["services"]["simulator"]["profiles"] == ["simulator"]
    listed = compose("config", "--profiles")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["simulator"]
    with_profile = compose("--profile", "simulator", "config", "--services")
    assert with_profile.returncode == 0, with_profile.stderr
    assert "simulator" in with_profile.stdout.split()


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check has teeth: an unknown key fails validation."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("init: true", "init: true\n  bogus: 1", 1))
    shutil.copy(DEPLOY / "cityops.env", tmp_path / "cityops.env")
    result = subprocess.run(
        [_docker_compose(), "-f", str(broken), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "bogus" in result.stderr


# ------------------------------------------------------------------------- broker


def _conf_values(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            values.setdefault(key, []).append(value)
    return values


def test_broker_conf_is_tuned_like_the_embedded_broker() -> None:
    deployed = _conf_values((DEPLOY / "mosquitto" / "mosquitto.conf").read_text())
    embedded = _conf_values(
        render_mosquitto_conf(
            host="127.0.0.1",
            port=1883,
            data_dir=Path("/d"),
            log_path=Path("/d/log"),
            tuning=BrokerTuning(),
            as_root=False,
        )
    )
    for key in (
        "set_tcp_nodelay",
        "max_inflight_messages",
        "max_queued_messages",
        "max_queued_bytes",
        "message_size_limit",
        "persistence",
        "persistence_file",
        "autosave_interval",
    ):
        assert deployed[key] == embedded[key], key
    assert deployed["allow_anonymous"][0] == "false"  # the device listener comes first
    assert deployed["password_file"] == ["/mosquitto/config/passwd"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True, slots=True)
class DeployedBroker:
    """deploy/mosquitto/ running in the local Mosquitto."""

    port: int
    """The device listener (1883 in the container)."""
    probe_port: int
    """The health-probe listener (1880 in the container)."""
    work: Path
    """What gen-secrets.sh wrote: secrets/ and mosquitto/passwd."""
    pid: int


@pytest.fixture(scope="module")
def deployed_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedBroker]:
    """deploy/mosquitto/ run in the local Mosquitto, with gen-secrets.sh accounts."""
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if exe is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    work = tmp_path_factory.mktemp("deploy-broker")
    subprocess.run(
        ["sh", str(DEPLOY / "gen-secrets.sh"), str(work)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (work / "data").mkdir()
    shutil.copy(DEPLOY / "mosquitto" / "acl", work / "acl")
    port, probe_port = _free_port(), _free_port()
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("/mosquitto/config/passwd", str(work / "mosquitto" / "passwd"))
    conf = conf.replace("/mosquitto/config/", f"{work}/")
    conf = conf.replace("/mosquitto/data/", f"{work}/data/")
    conf = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    conf = re.sub(r"^listener 1880 ", f"listener {probe_port} ", conf, flags=re.M)
    if os.geteuid() == 0:
        conf += "user root\n"  # as the embedded broker does: keep our identity
    (work / "mosquitto.conf").write_text(conf)
    log = (work / "broker.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(work / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        until_sync(lambda: _accepts(port) and _accepts(probe_port), WAIT_S, "broker listening")
        yield DeployedBroker(port, probe_port, work, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT_S)
        log.close()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _Client:
    """A paho MQTT 5 client on its network thread; messages go to a queue."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-deploy-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.reason: Any = None
        self.subscribed = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connack.wait(WAIT_S), f"no CONNACK within {WAIT_S} s"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.connack.set()

    @property
    def accepted(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT_S), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)

    def next_message(self, timeout_s: float = WAIT_S) -> mqtt.MQTTMessage | None:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def _connected(port: int, username: str | None, password: str | None) -> Iterator[_Client]:
    client = _Client(port, username, password)
    try:
        yield client
    finally:
        client.close()


def _account(work: Path, name: str) -> tuple[str, str]:
    """User and password of a service account from the URL gen-secrets.sh wrote."""
    url = (work / "secrets" / f"mqtt_url_{name}").read_text().strip()
    match = re.fullmatch(r"mqtt://([^:]+):([^@]+)@broker:1883", url)
    assert match, url
    return match[1], match[2]


def test_broker_refuses_anonymous_clients_on_the_device_listener(
    deployed_broker: DeployedBroker,
) -> None:
    port = deployed_broker.port
    with _connected(port, None, None) as anonymous:
        assert not anonymous.accepted
    with _connected(port, "cityops-ingest", "wrong") as wrong:
        assert not wrong.accepted


def test_broker_probe_listener_shows_uptime_and_nothing_else(
    deployed_broker: DeployedBroker,
) -> None:
    port, probe_port, work = deployed_broker.port, deployed_broker.probe_port, deployed_broker.work
    with _connected(probe_port, None, None) as probe:
        assert probe.accepted
        probe.subscribe("$SYS/broker/uptime")
        assert probe.next_message() is not None
        probe.subscribe("city/#")
        with _connected(port, *_account(work, "simulator")) as sim:
            sim.publish("city/traffic/aoba/probe-leak", b'{"v": 1}')
        message = probe.next_message(timeout_s=1.0)
        assert message is None or message.topic.startswith("$SYS/")


def test_broker_acl_lets_ingest_share_and_devices_publish_only_their_topics(
    deployed_broker: DeployedBroker,
) -> None:
    port, work = deployed_broker.port, deployed_broker.work
    device = f"loop-deploy-{uuid.uuid4().hex[:6]}"
    other = f"{device}-other"
    # A device added by hand as deploy/mosquitto/acl shows (docs/security.md's form).
    subprocess.run(
        ["mosquitto_passwd", "-b", str(work / "mosquitto" / "passwd"), device, "device-pass"],
        check=True,
        timeout=30,
    )
    with (work / "acl").open("a") as acl:
        acl.write(
            f"\nuser {device}\ntopic write city/traffic/aoba/{device}\n"
            f"topic write city/traffic/aoba/{device}/status\n"
        )
    # Mosquitto re-reads both files on SIGHUP; a new client proves it did.
    os.kill(deployed_broker.pid, signal.SIGHUP)

    def device_accepted() -> bool:
        with _connected(port, device, "device-pass") as probe:
            return probe.accepted

    until_sync(device_accepted, WAIT_S, "the device account is loaded")
    with (
        _connected(port, *_account(work, "ingest")) as ingest,
        _connected(port, device, "device-pass") as dev,
    ):
        ingest.subscribe("$share/ingest/city/#")
        dev.publish(f"city/traffic/aoba/{other}", b'{"v": 0}')  # not its own: dropped
        dev.publish(f"city/traffic/aoba/{device}", b'{"v": 1}')
        dev.publish(f"city/traffic/aoba/{device}/status", b'{"state": "online", "session": 1}')
        got = [ingest.next_message(), ingest.next_message()]
        assert [m.topic if m else None for m in got] == [
            f"city/traffic/aoba/{device}",
            f"city/traffic/aoba/{device}/status",
        ]
        assert ingest.next_message(timeout_s=0.5) is None
        # The API account reads alert events that the ingest account publishes.
        with _connected(port, *_account(work, "api")) as api:
            api.subscribe("cityops/alerts/#")
            ingest.publish("cityops/alerts/a1", b"{}")
            message = api.next_message()
            assert message is not None
            assert message.topic == "cityops/alerts/a1"


# ------------------------------------------------------------- image scripts


def test_dockerfile_copies_only_what_exists_and_is_in_the_context() -> None:
    """What can be checked of the image without building it (no daemon here)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignored = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += words[1:-1]
    assert "console/package-lock.json" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        excluded = [pattern for pattern in ignored if source.rstrip("/").startswith(pattern)]
        assert not excluded, f"COPY {source} is excluded by {excluded}"
    # The stage that places the console asks the installed code where it goes.
    assert "from cityops.runtime import CONSOLE_DIST" in dockerfile
    assert "npm ci" in dockerfile
    assert "npm run build" in dockerfile
    assert "FROM ${PYTHON_IMAGE}" in dockerfile
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cityops_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_reads_the_real_ingest_metric() -> None:
    healthcheck = _load_healthcheck()
    metrics = IngestMetrics()
    assert not healthcheck.ingest_connected(generate_latest(metrics.registry).decode())
    metrics.connected.set(1)
    assert healthcheck.ingest_connected(generate_latest(metrics.registry).decode())
    assert healthcheck.api_url("0.0.0.0:8080") == "http://127.0.0.1:8080/readyz"
    assert healthcheck.api_url("[::]:8081") == "http://127.0.0.1:8081/readyz"
    assert healthcheck.api_url("10.0.0.5:8080") == "http://10.0.0.5:8080/readyz"


def _run_entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/entrypoint.sh with a stand-in `cityops` that prints what it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "cityops"
    stub.write_text(
        '#!/bin/sh\necho "args=$*"\necho "db=${CITYOPS_DATABASE_URL:-}"\n'
        'echo "mqtt=${CITYOPS_MQTT_URL:-}"\necho "dbfile=${CITYOPS_DATABASE_URL_FILE:-}"\n'
    )
    stub.chmod(0o755)
    return subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "ingest", "--no-rules"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_entrypoint_reads_url_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://cityops:s3cret@db:5432/cityops\n")
    result = _run_entrypoint(
        tmp_path,
        {"CITYOPS_DATABASE_URL_FILE": str(secret), "CITYOPS_MQTT_URL": "mqtt://broker:1883"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "args=ingest --no-rules",
        "db=postgresql://cityops:s3cret@db:5432/cityops",
        "mqtt=mqtt://broker:1883",
        "dbfile=",
    ]


def test_entrypoint_refuses_a_missing_or_ambiguous_secret(tmp_path: Path) -> None:
    missing = _run_entrypoint(tmp_path, {"CITYOPS_MQTT_URL_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2
    assert "CITYOPS_MQTT_URL_FILE" in missing.stderr
    secret = tmp_path / "mqtt_url"
    secret.write_text("mqtt://a:b@broker:1883\n")
    both = _run_entrypoint(
        tmp_path, {"CITYOPS_MQTT_URL_FILE": str(secret), "CITYOPS_MQTT_URL": "mqtt://x:1883"}
    )
    assert both.returncode == 2
    assert "both" in both.stderr


# ------------------------------------------------------------------------ systemd


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → values (keys may repeat; continuations joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


SERVICES = ("cityops-migrate.service", "cityops-ingest@.service", "cityops-rules.service",
            "cityops-api@.service")  # fmt: skip


def test_systemd_units_are_hardened_and_ordered() -> None:
    for name in SERVICES:
        service = _unit(UNITS / name)
        unit, svc = service["Unit"], service["Service"]
        assert svc["User"] == ["cityops"], name
        assert "/etc/cityops/cityops.env" in svc["EnvironmentFile"], name
        for key, value in (
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("Restart", "on-failure"),
        ):
            assert svc[key] == [value], f"{name}: {key}"
        if name != "cityops-migrate.service":
            assert "cityops-migrate.service" in " ".join(unit["After"]).split(), name
            assert svc["ReadWritePaths"] == ["/var/lib/cityops"], name
            assert service["Install"]["WantedBy"] == ["cityops.target"], name
            assert "TimeoutStopSec" in svc, name
    migrate = _unit(UNITS / "cityops-migrate.service")
    assert migrate["Service"]["Type"] == ["oneshot"]
    assert migrate["Service"]["ExecStart"] == ["/opt/cityops/venv/bin/cityops db migrate"]
    assert "cityops.target" in migrate["Unit"]["Before"]
    ingest = _unit(UNITS / "cityops-ingest@.service")["Service"]
    (command,) = ingest["ExecStart"]
    assert "--shared-group=" in command
    assert "%i" in command.split("--client-id=")[1].split()[0]
    assert ingest["TimeoutStopSec"] == ["45s"]  # the ingester's flush deadline is 30 s


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart= is executable: point it at this checkout's
    # cityops instead of /opt/cityops/venv, which exists only where installed.
    cityops = Path(sys.executable).parent / "cityops"
    assert cityops.exists()
    for path in UNITS.glob("cityops*"):
        text = path.read_text().replace("/opt/cityops/venv/bin/cityops", str(cityops))
        (tmp_path / path.name).write_text(text)
    units = [
        "cityops.target",
        "cityops-migrate.service",
        "cityops-ingest@1.service",  # a template is verified through an instance
        "cityops-rules.service",
        "cityops-api@8080.service",
    ]
    result = subprocess.run(
        [exe, "verify", "--man=no", *(f"./{u}" for u in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # verify exits 0 on an unknown key but prints it: demand silence.
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


# ----------------------------------------------------------------------- the docs


def test_operations_doc_lists_every_metric() -> None:
    from control_api.app import HTTP_LATENCY, HTTP_REQUESTS  # noqa: PLC0415
    from control_api.feed import FEED_MESSAGES  # noqa: PLC0415

    doc = DOCS.read_text()
    names = {m.name for m in IngestMetrics().registry.collect()}
    names |= {m.name for c in (HTTP_REQUESTS, HTTP_LATENCY, FEED_MESSAGES) for m in c.collect()}
    missing = sorted(n for n in names if n not in doc)
    assert not missing, f"docs/operations.md does not describe {missing}"
