"""Errors raised by the shared ``cityops`` package.

The tree::

    CityopsError                   root of every error cityops raises on purpose
    ├── ConfigError                a setting (environment variable, URL) is invalid
    ├── MigrationError             the schema cannot be brought up to date
    ├── BrokerSecurityError        a broker user cannot be provisioned or revoked, or
                                   the password / ACL / certificate files cannot be written
    └── EmbeddedServiceError       the embedded Mosquitto or PostgreSQL did not start,
                                   stop or answer within its deadline, or its data
                                   directory or port cannot be used

Third-party errors (``OSError``, ``subprocess`` and psycopg errors) are translated at
the boundary with ``raise ... from exc`` so the original stays in ``__cause__``.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

__all__ = [
    "BrokerSecurityError",
    "CityopsError",
    "ConfigError",
    "EmbeddedServiceError",
    "MigrationError",
    "read_log_tail",
]

_LOG_TAIL_LINES = 20
_LOG_TAIL_MAX_BYTES = 64 * 1024


class CityopsError(Exception):
    """Root of the errors raised by cityops."""


class ConfigError(CityopsError):
    """A setting is invalid: fix the environment variable or argument it names."""


class MigrationError(CityopsError):
    """The database schema cannot be brought up to date by this cityops."""


class BrokerSecurityError(CityopsError):
    """A broker user or its files cannot be changed: the message names which and why."""


class EmbeddedServiceError(CityopsError):
    """An embedded service (broker or database) could not be used.

    The message names the service, its port, the configured timeout and ends with
    the last lines of the service's log file, so the cause is visible without
    hunting for the file.

    Attributes:
        service: ``"mosquitto"`` or ``"postgresql"``.
        port: the TCP port the service was (to be) listening on, if known.
        timeout_s: the configured deadline that applied, if any.
        log_path: the service's log file, if any.
        log_tail: the last lines of that file (empty when there is none).
    """

    def __init__(
        self,
        service: str,
        problem: str,
        *,
        port: int | None = None,
        timeout_s: float | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.service = service
        self.problem = problem
        self.port = port
        self.timeout_s = timeout_s
        self.log_path = log_path
        self.log_tail = read_log_tail(log_path) if log_path is not None else ""
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.service} on port {self.port}" if self.port is not None else self.service
        text = f"{where}: {self.problem}"
        if self.timeout_s is not None:
            text += f" (configured timeout {self.timeout_s:g} s)"
        if self.log_path is not None:
            if self.log_tail:
                text += f"\nlast lines of {self.log_path}:\n{self.log_tail}"
            else:
                text += f"\n{self.log_path} is empty or missing"
        return text


def read_log_tail(path: Path, *, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or ``""`` when it cannot be read."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, 2)
            log.seek(max(0, size - _LOG_TAIL_MAX_BYTES))
            data = log.read()
    except OSError:
        return ""
    tail = deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=lines)
    return "\n".join(tail)
