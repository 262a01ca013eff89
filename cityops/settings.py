"""Typed settings, read once from the environment at the edge of the process.

Library code never reads the environment; commands build a ``Settings`` with
``Settings.from_env()`` and pass the parts down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cityops.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the broker is, parsed from ``mqtt://user:pass@host:port``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        """Parse an ``mqtt://`` or ``mqtts://`` URL.

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
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    @property
    def url(self) -> str:
        """The URL without credentials, for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """The fixed configuration names of DESIGN.md, typed."""

    mqtt_url: str | None
    database_url: str | None
    http_host: str
    http_port: int
    rules_path: Path | None
    data_dir: Path

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
        return cls(
            mqtt_url=mqtt_url,
            database_url=env.get("CITYOPS_DATABASE_URL") or None,
            http_host=host.strip("[]"),
            http_port=int(port_text),
            rules_path=Path(rules) if rules else None,
            data_dir=Path(env.get("CITYOPS_DATA_DIR", ".cityops")),
        )
