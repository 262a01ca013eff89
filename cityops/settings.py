"""Typed settings, read once from the environment at the edge of the process.

Library code never reads the environment; commands build a ``Settings`` with
``Settings.from_env()`` and pass the parts down.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

from cityops.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the broker is, parsed from ``mqtt://user:pass@host:port``.

    With ``mqtts://`` the broker's certificate is checked against ``ca_file``
    (default: the system's trusted CAs); ``cert_file`` and ``key_file`` add a
    client certificate for brokers that require one.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def parse(cls, url: str, *, tls_files: MqttTlsFiles | None = None) -> MqttEndpoint:
        """Parse an ``mqtt://`` or ``mqtts://`` URL; ``tls_files`` apply to ``mqtts://``.

        Raises:
            ConfigError: the URL has another scheme, no host or a bad port.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            msg = f"CITYOPS_MQTT_URL {url!r}: scheme must be mqtt:// or mqtts://"
            raise ConfigError(msg)
        if not parts.hostname:
            msg = f"CITYOPS_MQTT_URL {url!r}: no host"
            raise ConfigError(msg)
        try:
            port = parts.port
        except ValueError as exc:
            msg = f"CITYOPS_MQTT_URL {url!r}: bad port"
            raise ConfigError(msg) from exc
        tls = parts.scheme == "mqtts"
        files = tls_files if tls and tls_files is not None else MqttTlsFiles()
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=files.ca_file,
            cert_file=files.cert_file,
            key_file=files.key_file,
        )

    @property
    def url(self) -> str:
        """The URL without credentials, for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts://`` (``None`` for plain ``mqtt://``).

        Raises:
            ConfigError: a CA, certificate or key file cannot be loaded.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            if self.cert_file is not None:
                key = str(self.key_file) if self.key_file is not None else None
                context.load_cert_chain(str(self.cert_file), key)
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(str(f) for f in (self.ca_file, self.cert_file, self.key_file) if f)
            msg = f"MQTT TLS files ({files or 'system CAs'}) cannot be loaded: {exc}"
            raise ConfigError(msg) from exc
        return context


@dataclass(frozen=True, slots=True)
class MqttTlsFiles:
    """What a client presents over ``mqtts://``: ``CITYOPS_MQTT_CA``, ``_CERT``, ``_KEY``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class BrokerSecuritySettings:
    """How the embedded broker authenticates and encrypts (see docs/security.md).

    Attributes:
        directory: ``CITYOPS_BROKER_SECURITY_DIR``: registry, password, ACL and CA files
            (default ``{CITYOPS_DATA_DIR}/mosquitto/security``).
        tls_host / tls_port: ``CITYOPS_BROKER_TLS_LISTEN`` (``host:port``, ``host:0`` for a
            free port, ``off`` for no TLS listener); default ``127.0.0.1:0``.
        client_certificates: ``CITYOPS_BROKER_CLIENT_CERTS=1``: the TLS listener
            requires a client certificate and takes its CN as the username.
        server_ca / server_cert / server_key: ``CITYOPS_BROKER_TLS_CA``, ``_CERT``, ``_KEY``:
            your own CA and server certificate instead of the local CA.
        server_names: ``CITYOPS_BROKER_TLS_NAMES`` (comma-separated): more host names or
            addresses for the generated server certificate.
    """

    directory: Path
    tls: bool = True
    tls_host: str = "127.0.0.1"
    tls_port: int | None = None
    client_certificates: bool = False
    server_ca: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    server_names: tuple[str, ...] = ()


def _path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value) if value else None


def _broker_security(env: Mapping[str, str], data_dir: Path) -> BrokerSecuritySettings:
    directory = _path(env, "CITYOPS_BROKER_SECURITY_DIR") or data_dir / "mosquitto" / "security"
    listen = env.get("CITYOPS_BROKER_TLS_LISTEN", "127.0.0.1:0")
    server = [_path(env, f"CITYOPS_BROKER_TLS_{part}") for part in ("CA", "CERT", "KEY")]
    if any(server) and not all(server):
        msg = "CITYOPS_BROKER_TLS_CA, _CERT and _KEY go together: set all three"
        raise ConfigError(msg)
    names_text = env.get("CITYOPS_BROKER_TLS_NAMES", "")
    names = tuple(n.strip() for n in names_text.split(",") if n.strip())
    common = BrokerSecuritySettings(
        directory=directory,
        client_certificates=env.get("CITYOPS_BROKER_CLIENT_CERTS", "") in ("1", "true", "yes"),
        server_ca=server[0],
        server_cert=server[1],
        server_key=server[2],
        server_names=names,
    )
    if listen == "off":
        return replace(common, tls=False)
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        msg = f"CITYOPS_BROKER_TLS_LISTEN {listen!r}: expected host:port (port 0: free) or off"
        raise ConfigError(msg)
    port = int(port_text)
    return replace(common, tls_host=host.strip("[]"), tls_port=port or None)


def _days(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip() or str(default)
    if not text.isdigit():
        msg = f"{name} {text!r}: expected a whole number of days (0: forever)"
        raise ConfigError(msg)
    return int(text)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip() or str(default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        msg = f"{name} {text!r}: expected a positive number of seconds"
        raise ConfigError(msg)
    return value


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    """Retention, roll-ups and audit pseudonymisation (docs/data-lifecycle.md).

    Day counts of 0 mean forever (never dropped, never pseudonymised).
    """

    raw_days: int = 90
    minute_days: int = 365
    hour_days: int = 3650
    audit_keep_days: int = 180
    rollup_interval_s: float = 60.0
    retention_interval_s: float = 3600.0

    def __post_init__(self) -> None:
        if 0 < self.minute_days < self.raw_days or 0 < self.hour_days < self.minute_days:
            msg = (
                "CITYOPS_RETENTION_*_DAYS: keep coarser data at least as long as finer"
                f" (raw {self.raw_days}, 1m {self.minute_days}, 1h {self.hour_days})"
            )
            raise ConfigError(msg)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LifecycleSettings:
        """Read ``CITYOPS_RETENTION_*``, ``CITYOPS_AUDIT_KEEP_DAYS`` and the intervals."""
        default = _DEFAULT_LIFECYCLE
        return cls(
            raw_days=_days(env, "CITYOPS_RETENTION_RAW_DAYS", default.raw_days),
            minute_days=_days(env, "CITYOPS_RETENTION_1M_DAYS", default.minute_days),
            hour_days=_days(env, "CITYOPS_RETENTION_1H_DAYS", default.hour_days),
            audit_keep_days=_days(env, "CITYOPS_AUDIT_KEEP_DAYS", default.audit_keep_days),
            rollup_interval_s=_seconds(env, "CITYOPS_ROLLUP_INTERVAL_S", default.rollup_interval_s),
            retention_interval_s=_seconds(
                env, "CITYOPS_RETENTION_INTERVAL_S", default.retention_interval_s
            ),
        )


_DEFAULT_LIFECYCLE: Final = LifecycleSettings()


@dataclass(frozen=True, slots=True)
class Settings:
    """The fixed configuration names of DESIGN.md, typed."""

    mqtt_url: str | None
    database_url: str | None
    http_host: str
    http_port: int
    rules_path: Path | None
    data_dir: Path
    mqtt_tls: MqttTlsFiles = field(default_factory=MqttTlsFiles)
    broker_security: BrokerSecuritySettings | None = None
    """The embedded broker's security (always set by :meth:`from_env`)."""
    lifecycle: LifecycleSettings = _DEFAULT_LIFECYCLE
    """Retention, roll-ups and audit pseudonymisation."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``CITYOPS_*`` variables; unset URLs mean the embedded default."""
        env = os.environ if env is None else env
        http = env.get("CITYOPS_HTTP", "127.0.0.1:8080")
        host, sep, port_text = http.rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            msg = f"CITYOPS_HTTP {http!r}: expected host:port"
            raise ConfigError(msg)
        mqtt_url = env.get("CITYOPS_MQTT_URL") or None
        if mqtt_url is not None:
            MqttEndpoint.parse(mqtt_url)  # fail early on a bad URL
        rules = env.get("CITYOPS_RULES")
        data_dir = Path(env.get("CITYOPS_DATA_DIR", ".cityops"))
        return cls(
            mqtt_url=mqtt_url,
            database_url=env.get("CITYOPS_DATABASE_URL") or None,
            http_host=host.strip("[]"),
            http_port=int(port_text),
            rules_path=Path(rules) if rules else None,
            data_dir=data_dir,
            mqtt_tls=MqttTlsFiles(
                ca_file=_path(env, "CITYOPS_MQTT_CA"),
                cert_file=_path(env, "CITYOPS_MQTT_CERT"),
                key_file=_path(env, "CITYOPS_MQTT_KEY"),
            ),
            broker_security=_broker_security(env, data_dir),
            lifecycle=LifecycleSettings.from_env(env),
        )

    def mqtt_endpoint(self, url: str) -> MqttEndpoint:
        """``url`` parsed, with this process's client TLS files (``CITYOPS_MQTT_CA`` …).

        Raises:
            ConfigError: a bad URL.
        """
        return MqttEndpoint.parse(url, tls_files=self.mqtt_tls)
