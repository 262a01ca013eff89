"""Where the broker and the database are: configured URLs or the embedded default."""

from __future__ import annotations

from pathlib import Path

from cityops.broker_security import BrokerSecurity, ServiceUser
from cityops.broker_tls import TlsFiles
from cityops.embedded import EmbeddedMosquitto, EmbeddedPostgres
from cityops.errors import CityopsError, ConfigError
from cityops.settings import BrokerSecuritySettings, Settings


def broker_security(settings: Settings) -> BrokerSecurity:
    """The embedded broker's authentication, ACLs and TLS, from the settings."""
    configured = settings.broker_security or BrokerSecuritySettings(
        directory=Path(settings.data_dir) / "mosquitto" / "security"
    )
    server_tls = None
    if configured.server_ca and configured.server_cert and configured.server_key:
        server_tls = TlsFiles(configured.server_ca, configured.server_cert, configured.server_key)
    return BrokerSecurity(
        directory=configured.directory,
        tls=configured.tls,
        tls_host=configured.tls_host,
        tls_port=configured.tls_port,
        client_certificates=configured.client_certificates,
        server_tls=server_tls,
        server_names=configured.server_names,
    )


def embedded_broker(settings: Settings) -> EmbeddedMosquitto:
    """The embedded Mosquitto kept under ``CITYOPS_DATA_DIR``, with authentication on."""
    return EmbeddedMosquitto(
        Path(settings.data_dir) / "mosquitto", security=broker_security(settings)
    )


def embedded_postgres(settings: Settings) -> EmbeddedPostgres:
    """The embedded TimescaleDB-enabled PostgreSQL kept under ``CITYOPS_DATA_DIR``."""
    return EmbeddedPostgres(Path(settings.data_dir) / "postgres")


CONSOLE_DIST = Path(__file__).resolve().parent.parent / "console" / "dist"
"""The built console (``npm run build`` in ``console/``), served at ``/`` when present."""

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "rules" / "default"


def rules_path(settings: Settings) -> Path:
    """``CITYOPS_RULES``, else the rules shipped for the simulated city."""
    return settings.rules_path or DEFAULT_RULES


def broker_url(settings: Settings, *, user: ServiceUser = ServiceUser.SIMULATOR) -> str:
    """The MQTT URL: from the environment, else the running embedded broker.

    The embedded broker's URL carries the credentials of service ``user``; a
    configured ``CITYOPS_MQTT_URL`` is used as it is.

    Raises:
        ConfigError: the URL is not set and the embedded broker is not running.
    """
    if settings.mqtt_url is not None:
        return settings.mqtt_url
    broker = embedded_broker(settings)
    if not broker.is_running():
        msg = (
            "CITYOPS_MQTT_URL is not set and the embedded broker under "
            f"{settings.data_dir} is not running: start `cityops up` or set the URL"
        )
        raise ConfigError(msg)
    try:
        return broker.service_url(user)
    except CityopsError as exc:
        raise ConfigError(str(exc)) from exc


def service_urls(
    settings: Settings, *, user: ServiceUser = ServiceUser.INGEST
) -> tuple[str, str]:
    """MQTT (as service ``user``) and database URLs: configured, else the embedded ones.

    Raises:
        ConfigError: a URL is not set and the embedded service is not running.
    """
    return broker_url(settings, user=user), database_url(settings)


def database_url(settings: Settings) -> str:
    """The database URL: configured, else the running embedded database's.

    Raises:
        ConfigError: the URL is not set and the embedded database is not running.
    """
    if settings.database_url is not None:
        return settings.database_url
    pg = embedded_postgres(settings)
    if not pg.is_running():
        msg = (
            "CITYOPS_DATABASE_URL is not set and the embedded database under "
            f"{settings.data_dir} is not running: start `cityops up` or set the URL"
        )
        raise ConfigError(msg)
    return pg.url()
