"""Where the broker and the database are: configured URLs or the embedded default."""

from __future__ import annotations

from pathlib import Path

from cityops.embedded import EmbeddedMosquitto, EmbeddedPostgres
from cityops.errors import ConfigError
from cityops.settings import Settings


def embedded_broker(settings: Settings) -> EmbeddedMosquitto:
    """The embedded Mosquitto kept under ``CITYOPS_DATA_DIR``."""
    return EmbeddedMosquitto(Path(settings.data_dir) / "mosquitto")


def embedded_postgres(settings: Settings) -> EmbeddedPostgres:
    """The embedded TimescaleDB-enabled PostgreSQL kept under ``CITYOPS_DATA_DIR``."""
    return EmbeddedPostgres(Path(settings.data_dir) / "postgres")


DEFAULT_RULES = Path(__file__).resolve().parent.parent / "rules" / "default"


def rules_path(settings: Settings) -> Path:
    """``CITYOPS_RULES``, else the rules shipped for the simulated city."""
    return settings.rules_path or DEFAULT_RULES


def broker_url(settings: Settings) -> str:
    """The MQTT URL: from the environment, else the running embedded broker.

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
    return broker.url


def service_urls(settings: Settings) -> tuple[str, str]:
    """MQTT and database URLs: from the environment, else the running embedded ones.

    Raises:
        ConfigError: a URL is not set and the embedded service is not running.
    """
    mqtt_url = broker_url(settings)
    database_url = settings.database_url
    if database_url is None:
        pg = embedded_postgres(settings)
        if not pg.is_running():
            msg = (
                "CITYOPS_DATABASE_URL is not set and the embedded database under "
                f"{settings.data_dir} is not running: start `cityops up` or set the URL"
            )
            raise ConfigError(msg)
        database_url = pg.url()
    return mqtt_url, database_url
