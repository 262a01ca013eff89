"""Embedded Mosquitto and TimescaleDB-enabled PostgreSQL, run as child processes.

``cityops up`` and the test suite use these when no broker or database URL is
configured. Each service keeps everything under its own data directory: its
configuration (rewritten at every start), its data, its log file and a
``state.json`` that records the port, so the next start reuses the same port when
it is still free and picks another free one otherwise.

Both classes are synchronous and quick to start; call them from a thread
(``asyncio.to_thread``) inside an event loop. Waits poll a condition against a
deadline (``start_timeout_s`` / ``stop_timeout_s``) and a missed deadline raises
:class:`~cityops.errors.EmbeddedServiceError` with the tail of the service's log.

Broker restarts and MQTT 5 sessions: Mosquitto 2.0 writes a session to its
persistence store only if the connection that began it had ``clean_start=False``.
A session begun with ``clean_start=True`` and a session expiry works while the
broker runs and is lost when it restarts, with everything queued for it. Durable
consumers connect with ``clean_start=False`` every time, the first included.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from cityops.broker_security import (
    BrokerSecurity,
    CredentialStore,
    ServiceUser,
    TlsListener,
    render_security_conf,
)
from cityops.errors import BrokerSecurityError, EmbeddedServiceError

__all__ = [
    "BrokerSecurity",
    "BrokerTuning",
    "EmbeddedMosquitto",
    "EmbeddedPostgres",
    "PostgresTuning",
]

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.05
_STATE_FILE = "state.json"
_LOG_ROTATE_BYTES = 16 * 1024 * 1024
# Mosquitto 2.0 parses its integer options with atoi() into a C int: 2**31 wraps to
# a negative number, which it clamps to 0, meaning "unlimited". Clamp below that.
_MOSQUITTO_INT_MAX = 2**31 - 1
# MQTT 3.1.1 CONNECT (clean session, empty client id, keepalive 60) and DISCONNECT:
# the readiness probe expects a CONNACK, proving an MQTT broker owns the port.
_MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
_MQTT_CONNACK = 0x20
_MQTT_DISCONNECT = b"\xe0\x00"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the NUL
_INITDB_TIMEOUT_S = 300.0
_PG_ROLE = "cityops"
_PG_STOP_MODES = ("smart", "fast", "immediate")


# --------------------------------------------------------------------------- helpers


def _wait_until(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll ``condition`` every 50 ms; True once it holds, False at the deadline."""
    while True:
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(_POLL_INTERVAL_S, remaining))


def _port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now.

    SO_REUSEADDR, like the services themselves use, so connections of a previous
    run in TIME_WAIT do not count as "taken"; a live listener still does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pick_free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _read_state(path: Path) -> dict[str, object]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _recorded_port(path: Path) -> int | None:
    port = _read_state(path).get("port")
    return port if isinstance(port, int) and 0 < port < 65536 else None


def _write_text(
    path: Path, text: str, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Write a file atomically (temporary file, then rename) with mode and owner."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _rotate_log(path: Path) -> None:
    """Keep one previous log once the current one grows past 16 MiB."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > _LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))


def _pid_running(pid: int, *, cmdline_contains: str | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) process, optionally with that argument."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    proc = Path("/proc") / str(pid)
    try:
        # The state is the field after the parenthesised command name.
        if (proc / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
        if cmdline_contains is not None:
            return cmdline_contains in (proc / "cmdline").read_text().split("\0")
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return True


def _read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_names(security: BrokerSecurity) -> list[str]:
    """Names the generated server certificate must cover: this host and its listener."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *security.server_names]
    if security.tls_host not in ("0.0.0.0", "::", ""):
        names.append(security.tls_host)
    return names


def _quote_conf(value: str) -> str:
    """A PostgreSQL configuration string literal."""
    return "'" + value.replace("'", "''") + "'"


# -------------------------------------------------------------------------- Mosquitto


class _EmbeddedService(abc.ABC):
    """What both embedded services share: data dir, port choice, lifecycle, errors.

    The port is the one given, else the one recorded in ``state.json`` by the
    previous start when it is free, else a free one; a running service found
    through its data dir is adopted instead of started twice.
    """

    service: str

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None,
        host: str,
        start_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self._data_dir = Path(os.path.normpath(data_dir.absolute()))
        self._explicit_port = port
        self._port: int | None = port
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s

    @property
    def data_dir(self) -> Path:
        """Where the service keeps its configuration, data, log and state."""
        return self._data_dir

    @property
    @abc.abstractmethod
    def log_path(self) -> Path:
        """The service's log file."""

    @property
    def port(self) -> int:
        """The TCP port: given, recorded by the previous start, or a free one."""
        if self._port is None:
            self._port = self._running_port() or self._choose_port()
        return self._port

    @abc.abstractmethod
    def start(self) -> None:
        """Start (or adopt) the service and wait until it is ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the service."""

    def is_running(self) -> bool:
        """Whether the service's process (ours, or one found in the data dir) is alive."""
        return self._running_pid() is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @abc.abstractmethod
    def _running_pid(self) -> int | None: ...

    @abc.abstractmethod
    def _running_port(self) -> int | None: ...

    @property
    def _state_path(self) -> Path:
        return self._data_dir / _STATE_FILE

    def _error(
        self, problem: str, *, port: int | None = None, timeout_s: float | None = None
    ) -> EmbeddedServiceError:
        return EmbeddedServiceError(
            self.service,
            problem,
            port=port if port is not None else self._port,
            timeout_s=timeout_s if timeout_s is not None else self._start_timeout_s,
            log_path=self.log_path,
        )

    def _choose_port(self) -> int:
        if self._explicit_port is not None:
            return self._explicit_port
        recorded = _recorded_port(self._state_path)
        if recorded is not None and _port_is_free(self._host, recorded):
            return recorded
        if recorded is not None:
            log.warning("%s's previous port %d is in use; picking another", self.service, recorded)
        return _pick_free_port(self._host)

    def _claim_port(self) -> int:
        """The port to start on, checked free now."""
        port = self._port if self._port is not None else self._choose_port()
        if not _port_is_free(self._host, port):
            if self._explicit_port is not None:
                msg = f"port {port} on {self._host} is already in use by another process"
                raise self._error(msg, port=port)
            port = self._choose_port()
        self._port = port
        return port


@dataclass(frozen=True, slots=True)
class BrokerTuning:
    """Mosquitto settings that decide whether ingest is lossless and fast.

    Mosquitto's defaults (20 in flight, 1000 queued then silent drops, no
    persistence, Nagle on) lose data and cap a batching consumer; see FACTS.md.
    """

    max_inflight_messages: int = 10_000  # window that fits ack-after-commit batches
    max_queued_messages: int = 2_000_000  # offline queue per client for a long ingester outage
    max_queued_bytes: int = 2 * 1024**3  # byte bound on that queue
    autosave_interval_s: int = 5  # persistence store written often
    message_size_limit: int = 1024 * 1024  # broker refuses larger; ingest dead-letters >64 KiB


def render_mosquitto_conf(
    *,
    host: str,
    port: int,
    data_dir: Path,
    log_path: Path,
    tuning: BrokerTuning,
    as_root: bool,
    security_lines: Sequence[str] = (),
) -> str:
    """The mosquitto.conf of an embedded broker (pure: tested without a broker).

    Without ``security_lines`` anyone may connect and do anything (the test
    broker); with them (see :func:`cityops.broker_security.render_security_conf`)
    they come last, because a second ``listener`` line starts that listener's
    own options.
    """
    lines = [
        "# Written by cityops at every start of the embedded broker: edits are overwritten.",
        f"listener {port} {host}",
        *([] if security_lines else ["allow_anonymous true"]),
        "set_tcp_nodelay true",
        f"max_inflight_messages {min(tuning.max_inflight_messages, _MOSQUITTO_INT_MAX)}",
        f"max_queued_messages {min(tuning.max_queued_messages, _MOSQUITTO_INT_MAX)}",
        f"max_queued_bytes {min(tuning.max_queued_bytes, _MOSQUITTO_INT_MAX)}",
        # Deprecated in 2.0 in favour of max_packet_size, but kept for what it does
        # to an MQTT 3.1.1 device: its oversized PUBLISH is dropped and acknowledged,
        # where max_packet_size disconnects it, and it resends the same QoS 1 packet
        # on every reconnect. (An MQTT 5 publisher gets PUBACK reason 0x95, which
        # paho 2.2 rejects as malformed: it disconnects.)
        f"message_size_limit {min(tuning.message_size_limit, _MOSQUITTO_INT_MAX)}",
        "persistence true",
        f"persistence_location {data_dir}/",
        "persistence_file mosquitto.db",
        f"autosave_interval {tuning.autosave_interval_s}",
        f"log_dest file {log_path}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if as_root:
        # Started as root, mosquitto switches to the user `mosquitto`, which cannot
        # write the persistence file in a data directory that cityops (root) owns.
        # The broker is our child process: it keeps our identity, like PostgreSQL
        # keeps its own.
        lines.append("user root")
    lines.extend(security_lines)
    return "\n".join(lines) + "\n"


class EmbeddedMosquitto(_EmbeddedService):
    """A Mosquitto broker run as a child process, with its data in ``data_dir``.

    Retained messages, persistent sessions and their queued QoS 1 messages are
    saved every ``autosave_interval_s`` and on a clean :meth:`stop`, and come back
    on the next start. A pid file lets a later process see a broker that is
    still running and adopt it instead of starting a second one.

    Without ``security`` the broker accepts anonymous clients and allows every
    topic (the test suite's broker). With it, clients log in (service users and
    provisioned devices of :class:`~cityops.broker_security.CredentialStore`),
    an ACL limits each, and a TLS listener serves ``mqtts://``; :meth:`reload`
    makes a running broker reread the password and ACL files.

    Example:
        >>> with EmbeddedMosquitto(Path(".cityops/mosquitto")) as broker:  # doctest: +SKIP
        ...     print(broker.url)
    """

    service = "mosquitto"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        tuning: BrokerTuning = BrokerTuning(),
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 60.0,
        mosquitto_bin: Path | None = None,
        security: BrokerSecurity | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            port=port,
            host=host,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self._tuning = tuning
        self._bin = mosquitto_bin
        self._process: subprocess.Popen[bytes] | None = None
        self._security = security
        self._tls_port: int | None = security.tls_port if security is not None else None
        self.credentials: CredentialStore | None = (
            CredentialStore(security.directory, mosquitto_passwd=security.mosquitto_passwd)
            if security is not None
            else None
        )

    # ---------------------------------------------------------------- public

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self._data_dir / "mosquitto.log"

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener."""
        return f"mqtt://{_url_host(self._host)}:{self.port}"

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port (``None`` without TLS); known once started."""
        if self._security is None or not self._security.tls:
            return None
        if self._tls_port is None:
            recorded = _read_state(self._state_path).get("tls_port")
            if isinstance(recorded, int) and self._running_pid() is not None:
                self._tls_port = recorded
        return self._tls_port

    @property
    def tls_url(self) -> str | None:
        """``mqtts://host:port`` of the TLS listener, or ``None`` without one."""
        if self._security is None or self.tls_port is None:
            return None
        return f"mqtts://{_url_host(self._security.tls_host)}:{self.tls_port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate that signs the TLS listener's certificate, if any."""
        if self._security is None or not self._security.tls:
            return None
        if self._security.server_tls is not None:
            return self._security.server_tls.ca_file
        assert self.credentials is not None
        return self.credentials.ca.ca_file

    def service_url(self, user: ServiceUser) -> str:
        """``mqtt://user:password@host:port`` of the plain listener for a service.

        Without security this is :attr:`url`. Credentials are created by the
        first start (or earlier by :meth:`CredentialStore.ensure_service_credentials`).

        Raises:
            EmbeddedServiceError: the service's password cannot be read.
        """
        if self.credentials is None:
            return self.url
        try:
            password = self.credentials.service_password(user)
        except BrokerSecurityError as exc:
            raise self._error(str(exc)) from exc
        if password is None:
            msg = f"no credentials for {user} in {self.credentials.directory}: start the broker"
            raise self._error(msg)
        return f"mqtt://{quote(str(user), safe='')}:{quote(password, safe='')}@" + self.url[7:]

    def reload(self) -> bool:
        """Make the running broker reread its password and ACL files (SIGHUP).

        Returns:
            False when no broker runs for this data dir (the files apply at its start).
        """
        pid = self._running_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        log.info("mosquitto (pid %d) told to reload its password and ACL files", pid)
        return True

    def start(self) -> None:
        """Start the broker and wait until it answers MQTT; no-op when running.

        Raises:
            EmbeddedServiceError: the data directory or port is unusable, or the
                broker exited or did not answer within ``start_timeout_s``.
        """
        deadline = time.monotonic() + self._start_timeout_s
        if self._running_pid() is not None and self._adopt_running(deadline):
            return
        self._prepare_data_dir()
        attempts = 1 if self._explicit_port is not None else 2
        for attempt in range(1, attempts + 1):
            port = self._claim_port()
            process = self._spawn(port)
            if self._wait_ready(process, port, deadline):
                tls = f" and {self.tls_url}" if self.tls_url else ""
                log.info("mosquitto listening on %s%s (pid %d)", self.url, tls, process.pid)
                return
            self._pid_path.unlink(missing_ok=True)
            self._process = None
            # An automatically chosen port can be taken between the check and the
            # bind: pick another one once.
            if (
                attempt < attempts
                and process.returncode is not None
                and not _port_is_free(self._host, port)
            ):
                log.warning("port %d was taken while mosquitto started; picking another", port)
                self._port = None
                continue
            if process.returncode is not None:
                problem = f"exited with code {process.returncode} while starting"
            else:
                self._kill(process)
                problem = "did not answer MQTT CONNECT in time; killed"
            raise EmbeddedServiceError(
                self.service,
                problem,
                port=port,
                timeout_s=self._start_timeout_s,
                log_path=self.log_path,
            )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM and wait (the store is saved), or SIGKILL.

        Raises:
            EmbeddedServiceError: it did not exit within ``stop_timeout_s``; it is
                then killed, and changes since the last autosave are lost.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid_path.unlink(missing_ok=True)
            self._process = None
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        exited = self._wait_exit(pid, time.monotonic() + self._stop_timeout_s)
        if not exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, time.monotonic() + self._stop_timeout_s)
        self._pid_path.unlink(missing_ok=True)
        self._process = None
        if not exited:
            raise EmbeddedServiceError(
                self.service,
                f"pid {pid} did not exit after SIGTERM; killed",
                port=self._port,
                timeout_s=self._stop_timeout_s,
                log_path=self.log_path,
            )
        log.info("mosquitto on port %s stopped%s", self._port, " (killed)" if kill else "")

    def restart(self) -> None:
        """Stop cleanly, then start again on the same port."""
        self.stop()
        self.start()

    # -------------------------------------------------------------- internals

    @property
    def _conf_path(self) -> Path:
        return self._data_dir / "mosquitto.conf"

    @property
    def _pid_path(self) -> Path:
        return self._data_dir / "mosquitto.pid"

    def _running_pid(self) -> int | None:
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        pid = _read_pid_file(self._pid_path)
        if pid is not None and _pid_running(pid, cmdline_contains=str(self._conf_path)):
            return pid
        return None

    def _running_port(self) -> int | None:
        return _recorded_port(self._state_path) if self._running_pid() is not None else None

    def _adopt_running(self, deadline: float) -> bool:
        """Use the broker already running for this data dir; False if it just exited."""
        running_port = _recorded_port(self._state_path)
        if running_port is None:
            msg = f"is running (pid file {self._pid_path}) but {self._state_path} has no port"
            raise self._error(msg)
        if self._explicit_port is not None and running_port != self._explicit_port:
            msg = f"is already running for {self._data_dir} on another port ({running_port})"
            raise self._error(msg, port=self._explicit_port)
        self._port = running_port
        answered = False

        def answered_or_gone() -> bool:
            nonlocal answered
            if self._running_pid() is None:
                return True
            answered = self._answers(running_port)
            return answered

        _wait_until(answered_or_gone, deadline)
        if answered:
            return True
        if self._running_pid() is None:
            log.warning("mosquitto pid in %s exited while being adopted", self._pid_path)
            self._process = None
            return False
        msg = "is running but does not answer MQTT CONNECT"
        raise self._error(msg, port=running_port)

    def _prepare_data_dir(self) -> None:
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"data directory {self._data_dir} is unusable: {exc}"
            raise self._error(msg) from exc
        if not os.access(self._data_dir, os.W_OK | os.X_OK):
            msg = f"data directory {self._data_dir} is unusable: not writable"
            raise self._error(msg)
        for forbidden in ("\n", "\r", "\0"):
            if forbidden in str(self._data_dir):
                msg = f"data directory {self._data_dir!r} contains a line break or NUL"
                raise self._error(msg)

    def _mosquitto_bin(self) -> Path:
        if self._bin is not None:
            return self._bin
        found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
        if found is None:
            msg = "mosquitto executable not found on PATH nor in /usr/sbin"
            raise self._error(msg)
        return Path(found)

    def _security_lines(self) -> list[str]:
        """Write the credential, ACL and certificate files; the conf lines that use them."""
        security, store = self._security, self.credentials
        if security is None or store is None:
            return []
        try:
            store.ensure_service_credentials()
            tls = None
            if security.tls:
                files = security.server_tls or store.ca.ensure_server_certificate(
                    _server_names(security)
                )
                tls = TlsListener(
                    host=security.tls_host,
                    port=self._claim_tls_port(security),
                    files=files,
                    crl_file=store.ca.crl_file if security.server_tls is None else None,
                    client_certificates=security.client_certificates,
                )
        except (BrokerSecurityError, OSError, ValueError) as exc:
            msg = f"cannot prepare authentication and TLS in {security.directory}: {exc}"
            raise self._error(msg) from exc
        return render_security_conf(
            password_file=store.password_file, acl_file=store.acl_file, tls=tls
        )

    def _claim_tls_port(self, security: BrokerSecurity) -> int:
        """The TLS port: configured, else the previous one when free, else a free one."""
        if security.tls_port is not None:
            self._tls_port = security.tls_port
            return security.tls_port
        recorded = _read_state(self._state_path).get("tls_port")
        if isinstance(recorded, int) and _port_is_free(security.tls_host, recorded):
            self._tls_port = recorded
        else:
            self._tls_port = _pick_free_port(security.tls_host)
        return self._tls_port

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        conf = render_mosquitto_conf(
            host=self._host,
            port=port,
            data_dir=self._data_dir,
            log_path=self.log_path,
            tuning=self._tuning,
            as_root=os.geteuid() == 0,
            security_lines=self._security_lines(),
        )
        executable = self._mosquitto_bin()
        state: dict[str, int] = {"port": port}
        if self.tls_port is not None:
            state["tls_port"] = self.tls_port
        try:
            _write_text(self._conf_path, conf)
            _write_text(self._state_path, json.dumps(state) + "\n", mode=0o644)
            _rotate_log(self.log_path)
            with self.log_path.open("ab") as log_file:
                # Own session: a Ctrl-C meant for `cityops up` must not reach the
                # broker before ingest has committed and acknowledged.
                process = subprocess.Popen(
                    [str(executable), "-c", str(self._conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            msg = f"cannot start {executable} in {self._data_dir}: {exc}"
            raise self._error(msg, port=port) from exc
        try:
            _write_text(self._pid_path, f"{process.pid}\n", mode=0o644)
        except OSError as exc:
            self._kill(process)
            msg = f"cannot write {self._pid_path}: {exc}"
            raise self._error(msg, port=port) from exc
        self._process = process
        return process

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        """Poll until the broker answers (True), or it exits or the deadline passes."""
        answered = False

        def answered_or_exited() -> bool:
            nonlocal answered
            if process.poll() is not None:
                return True
            answered = self._answers(port)
            return answered

        _wait_until(answered_or_exited, deadline)
        # Answered but then exited: another listener held the port.
        return answered and process.poll() is None

    def _answers(self, port: int) -> bool:
        try:
            with socket.create_connection((self._host, port), timeout=1.0) as sock:
                sock.sendall(_MQTT_CONNECT)
                reply = sock.recv(4)
                with contextlib.suppress(OSError):
                    sock.sendall(_MQTT_DISCONNECT)
        except OSError:
            return False
        return reply[:1] == bytes([_MQTT_CONNACK])

    def _wait_exit(self, pid: int, deadline: float) -> bool:
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
            return True
        return _wait_until(lambda: not _pid_running(pid), deadline)

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True, slots=True)
class PostgresTuning:
    """postgresql.conf settings for ingest on a 2-core, 24 GiB machine.

    Sized for one machine that also runs the broker, ingest, rules and the API:
    a quarter of the memory would be the textbook shared_buffers, but the OS
    page cache serves the rest as well and the other processes need room.
    """

    shared_buffers: str = "1GB"
    effective_cache_size: str = "12GB"
    work_mem: str = "16MB"
    maintenance_work_mem: str = "512MB"
    wal_buffers: str = "64MB"  # batched COPY writes WAL faster than the 16MB auto value drains
    max_wal_size: str = "4GB"  # fewer forced checkpoints under sustained ingest
    min_wal_size: str = "1GB"
    checkpoint_timeout: str = "15min"
    max_connections: int = 100
    max_locks_per_transaction: int = 256  # queries over many hypertable chunks lock each


def render_postgresql_conf(*, port: int, socket_dir: Path, tuning: PostgresTuning) -> str:
    """The settings cityops includes at the end of postgresql.conf (pure)."""
    settings: Sequence[tuple[str, str]] = (
        ("listen_addresses", "'127.0.0.1'"),
        ("port", str(port)),
        ("unix_socket_directories", _quote_conf(str(socket_dir))),
        ("unix_socket_permissions", "0700"),
        ("password_encryption", "'scram-sha-256'"),
        ("shared_preload_libraries", "'timescaledb'"),
        ("timescaledb.telemetry_level", "off"),
        ("max_connections", str(tuning.max_connections)),
        ("shared_buffers", tuning.shared_buffers),
        ("effective_cache_size", tuning.effective_cache_size),
        ("work_mem", tuning.work_mem),
        ("maintenance_work_mem", tuning.maintenance_work_mem),
        ("wal_buffers", tuning.wal_buffers),
        ("max_wal_size", tuning.max_wal_size),
        ("min_wal_size", tuning.min_wal_size),
        ("checkpoint_timeout", tuning.checkpoint_timeout),
        ("checkpoint_completion_target", "0.9"),
        # Lossless ingest acknowledges to the broker after COMMIT: the commit must
        # be on disk by then.
        ("synchronous_commit", "on"),
        ("random_page_cost", "1.1"),
        ("effective_io_concurrency", "200"),
        ("max_worker_processes", "16"),
        ("max_parallel_workers", "2"),
        ("max_parallel_workers_per_gather", "1"),
        ("max_locks_per_transaction", str(tuning.max_locks_per_transaction)),
        ("timezone", "'UTC'"),
        ("log_timezone", "'UTC'"),
        ("logging_collector", "off"),
        ("log_line_prefix", "'%m [%p] %q%u@%d '"),
        ("log_checkpoints", "on"),
    )
    header = (
        "# Written by cityops at every start of the embedded database: edits are\n"
        "# overwritten. Use ALTER SYSTEM (postgresql.auto.conf) for local changes.\n"
    )
    return header + "".join(f"{name} = {value}\n" for name, value in settings)


@dataclass(frozen=True, slots=True)
class _OsUser:
    """The operating-system account that owns and runs the cluster."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


class EmbeddedPostgres(_EmbeddedService):
    """A TimescaleDB-enabled PostgreSQL cluster in ``data_dir``, started with pg_ctl.

    Layout: ``pgdata/`` (the cluster), ``run/`` (its Unix socket), ``postgres.log``,
    ``password`` (of the superuser role ``cityops``, mode 0600) and ``state.json``.
    PostgreSQL refuses to run as root, so under root the cluster belongs to, and
    runs as, the ``postgres`` account; every parent of ``data_dir`` must then be
    traversable by it.
    """

    service = "postgresql"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        pg_bin_dir: Path | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 60.0,
        tuning: PostgresTuning = PostgresTuning(),
    ) -> None:
        super().__init__(
            data_dir,
            port=port,
            host="127.0.0.1",
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self._pg_bin_dir = pg_bin_dir
        self._tuning = tuning
        self._os_user = self._cluster_os_user()

    # ---------------------------------------------------------------- public

    @property
    def pgdata(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self._data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        """The server log written through ``pg_ctl -l``."""
        return self._data_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """Directory of the Unix socket (peer authentication for the owner)."""
        return self._data_dir / "run"

    def url(self, dbname: str = "cityops") -> str:
        """``postgresql://cityops:PASSWORD@127.0.0.1:PORT/dbname``."""
        password = self._password()
        return f"postgresql://{_PG_ROLE}:{password}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> None:
        """Initialise the cluster on first use, start it and wait until it is ready.

        Also creates the ``cityops`` database if missing. No-op when running.

        Raises:
            EmbeddedServiceError: the data directory or port is unusable, initdb
                failed, or the server was not ready within ``start_timeout_s``.
        """
        if self._running_pid() is not None:
            self._adopt_running()
            return
        self._prepare_dirs()
        port = self._claim_port()  # before initdb: a taken port fails fast
        password = self._password()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(password)
        self._write_config(port)
        _rotate_log(self.log_path)
        self._touch_log()
        timeout = max(1, math.ceil(self._start_timeout_s))
        self._pg_ctl(
            ["start", "-w", "-t", str(timeout), "-D", str(self.pgdata), "-l", str(self.log_path)],
            timeout_s=self._start_timeout_s,
            what="start",
        )
        _write_text(self._state_path, json.dumps({"port": port}) + "\n", mode=0o644)
        log.info("postgresql listening on 127.0.0.1:%d (data %s)", port, self.pgdata)
        self.ensure_database(_PG_ROLE)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean), or ``immediate`` (crash recovery next start).

        Raises:
            ValueError: an unknown mode.
            EmbeddedServiceError: it did not stop within ``stop_timeout_s``.
        """
        if mode not in _PG_STOP_MODES:
            msg = f"stop mode must be one of {_PG_STOP_MODES}, not {mode!r}"
            raise ValueError(msg)
        if self._running_pid() is None:
            return
        timeout = max(1, math.ceil(self._stop_timeout_s))
        self._pg_ctl(
            ["stop", "-w", "-t", str(timeout), "-m", mode, "-D", str(self.pgdata)],
            timeout_s=self._stop_timeout_s,
            what=f"stop -m {mode}",
        )
        log.info("postgresql on port %s stopped (%s)", self._port, mode)

    def ensure_database(self, name: str) -> None:
        """Create database ``name`` if it does not exist.

        Raises:
            EmbeddedServiceError: the server cannot be reached.
        """
        timeout = max(1, math.ceil(self._start_timeout_s))
        try:
            url = self.url("postgres")
            with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if exists is None:
                    # A concurrent creator may win the race: that is fine.
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                        log.info("created database %s", name)
        except psycopg.Error as exc:
            msg = f"cannot create database {name!r}: {exc}"
            raise self._error(msg) from exc

    # -------------------------------------------------------------- internals

    @property
    def _password_path(self) -> Path:
        return self._data_dir / "password"

    @property
    def _owner(self) -> tuple[int, int] | None:
        """Owner to give files the server reads, when we are root and it is not."""
        return (self._os_user.uid, self._os_user.gid) if os.geteuid() == 0 else None

    @staticmethod
    def _cluster_os_user() -> _OsUser:
        name = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            msg = f"running as root needs the user {name!r} to own the cluster: none exists"
            raise EmbeddedServiceError(EmbeddedPostgres.service, msg) from exc
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return _OsUser(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)

    def _postmaster_pid_lines(self) -> list[str]:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _running_pid(self) -> int | None:
        lines = self._postmaster_pid_lines()
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        # The postmaster keeps its command line (-D PGDATA): a recycled pid does not.
        return pid if _pid_running(pid, cmdline_contains=str(self.pgdata)) else None

    def _running_port(self) -> int | None:
        if self._running_pid() is None:
            return None
        lines = self._postmaster_pid_lines()
        try:
            return int(lines[3])  # postmaster.pid line 4: the port
        except (IndexError, ValueError):
            return _recorded_port(self._state_path)

    def _adopt_running(self) -> None:
        running_port = self._running_port()
        if running_port is None:
            msg = f"is running but its port is unknown ({self.pgdata / 'postmaster.pid'})"
            raise self._error(msg)
        if self._explicit_port is not None and running_port != self._explicit_port:
            msg = f"is already running for {self.pgdata} on another port ({running_port})"
            raise self._error(msg, port=self._explicit_port)
        self._port = running_port
        # postmaster.pid line 8 turns "ready" once it accepts connections.
        deadline = time.monotonic() + self._start_timeout_s

        def ready() -> bool:
            lines = self._postmaster_pid_lines()
            return len(lines) > 7 and lines[7].strip() == "ready"

        if not _wait_until(ready, deadline):
            msg = "is running but did not become ready"
            raise self._error(msg, port=running_port)

    def _claim_port(self) -> int:
        port = super()._claim_port()
        socket_path = self.socket_dir / f".s.PGSQL.{port}"
        if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
            msg = (
                f"socket path {socket_path} is longer than {_SUN_PATH_MAX} bytes:"
                " use a shorter data directory"
            )
            raise self._error(msg, port=port)
        self._port = port
        return port

    def _prepare_dirs(self) -> None:
        try:
            self._data_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"data directory {self._data_dir} is unusable: {exc}"
            raise self._error(msg) from exc
        if not os.access(self._data_dir, os.W_OK | os.X_OK):
            msg = f"data directory {self._data_dir} is unusable: not writable"
            raise self._error(msg)
        try:
            owner = self._owner
            if owner is not None:
                # The server account must reach pgdata/ and run/ through data_dir.
                mode = self._data_dir.stat().st_mode
                if not mode & stat.S_IXOTH:
                    self._data_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
                self._check_traversable()
            for directory in (self.pgdata, self.socket_dir):
                directory.mkdir(mode=0o700, exist_ok=True)
                if owner is not None:
                    os.chown(directory, *owner)
                directory.chmod(0o700)
        except OSError as exc:
            msg = f"data directory {self._data_dir} is unusable: {exc}"
            raise self._error(msg) from exc

    def _check_traversable(self) -> None:
        """Every parent of data_dir must let the server account pass (``x``)."""
        user = self._os_user
        for directory in (self._data_dir, *self._data_dir.parents):
            st = directory.stat()
            if st.st_uid == user.uid:
                allowed = st.st_mode & stat.S_IXUSR
            elif st.st_gid in user.groups:
                allowed = st.st_mode & stat.S_IXGRP
            else:
                allowed = st.st_mode & stat.S_IXOTH
            if not allowed:
                msg = (
                    f"data directory {self._data_dir} is unusable: the server runs as "
                    f"{user.name!r}, which cannot enter {directory} (try chmod o+x {directory}, "
                    f"or a data directory elsewhere)"
                )
                raise self._error(msg)

    def _password(self) -> str:
        try:
            return self._password_path.read_text().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            msg = f"cannot read {self._password_path}: {exc}"
            raise self._error(msg) from exc
        if (self.pgdata / "PG_VERSION").exists():
            msg = (
                f"the cluster in {self.pgdata} exists but its password file "
                f"{self._password_path} is missing"
            )
            raise self._error(msg)
        try:
            self._data_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
            password = secrets.token_urlsafe(24)  # URL-safe: no quoting in the DSN
            _write_text(self._password_path, password + "\n", mode=0o600)
        except OSError as exc:
            msg = f"data directory {self._data_dir} is unusable: {exc}"
            raise self._error(msg) from exc
        return password

    def _bin(self, name: str) -> str:
        if self._pg_bin_dir is None:
            self._pg_bin_dir = self._find_bin_dir()
        return str(self._pg_bin_dir / name)

    def _find_bin_dir(self) -> Path:
        pg_config = shutil.which("pg_config")
        if pg_config is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
                )
                candidate = Path(out.stdout.strip())
                if (candidate / "pg_ctl").exists():
                    return candidate
        fallback = Path("/usr/lib/postgresql/15/bin")
        if (fallback / "pg_ctl").exists():
            return fallback
        msg = f"no PostgreSQL binaries: pg_config --bindir failed and {fallback} is missing"
        raise self._error(msg)

    def _run_as_owner(
        self, args: list[str], *, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the cluster's account (never as root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        user = self._os_user
        as_root = os.geteuid() == 0
        if as_root:
            env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env=env,
            cwd="/",
            user=user.uid if as_root else None,
            group=user.gid if as_root else None,
            extra_groups=list(user.groups) if as_root else None,
        )

    def _pg_ctl(self, args: list[str], *, timeout_s: float, what: str) -> None:
        # pg_ctl enforces its own -t deadline; the margin only guards a hung pg_ctl.
        try:
            result = self._run_as_owner([self._bin("pg_ctl"), *args], timeout_s=timeout_s + 10)
        except subprocess.TimeoutExpired as exc:
            msg = f"pg_ctl {what} hung"
            raise self._error(msg, timeout_s=timeout_s) from exc
        except OSError as exc:
            msg = f"cannot run pg_ctl {what}: {exc}"
            raise self._error(msg, timeout_s=timeout_s) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            msg = f"pg_ctl {what} failed with code {result.returncode}: {output}"
            raise self._error(msg, timeout_s=timeout_s)

    def _initdb(self, password: str) -> None:
        pwfile = self._data_dir / ".initdb-password"
        try:
            _write_text(pwfile, password + "\n", mode=0o600, owner=self._owner)
            result = self._run_as_owner(
                [
                    self._bin("initdb"),
                    "--pgdata",
                    str(self.pgdata),
                    "--username",
                    _PG_ROLE,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                timeout_s=_INITDB_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            msg = f"initdb of {self.pgdata} did not finish"
            raise self._error(msg, timeout_s=_INITDB_TIMEOUT_S) from exc
        except OSError as exc:
            msg = f"cannot run initdb for {self.pgdata}: {exc}"
            raise self._error(msg) from exc
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            msg = f"initdb of {self.pgdata} failed with code {result.returncode}: {output}"
            raise self._error(msg, timeout_s=_INITDB_TIMEOUT_S)
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a") as out:
            out.write("\n# cityops settings, rewritten at every start\n")
            out.write("include_if_exists = 'cityops.conf'\n")
        log.info("initialised a PostgreSQL cluster in %s", self.pgdata)

    def _write_config(self, port: int) -> None:
        owner = self._owner
        hba = (
            "# Written by cityops at every start: edits are overwritten.\n"
            "# TYPE  DATABASE  USER     ADDRESS        METHOD\n"
            f"local   all       {_PG_ROLE}                  peer map=owner\n"
            "host    all       all      127.0.0.1/32   scram-sha-256\n"
            "host    all       all      ::1/128        scram-sha-256\n"
        )
        owners = [self._os_user.name] + (["root"] if os.geteuid() == 0 else [])
        ident = "# MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n" + "".join(
            f"owner      {name}  {_PG_ROLE}\n" for name in owners
        )
        conf = render_postgresql_conf(port=port, socket_dir=self.socket_dir, tuning=self._tuning)
        try:
            _write_text(self.pgdata / "pg_hba.conf", hba, owner=owner)
            _write_text(self.pgdata / "pg_ident.conf", ident, owner=owner)
            _write_text(self.pgdata / "cityops.conf", conf, owner=owner)
        except OSError as exc:
            msg = f"cannot write the configuration in {self.pgdata}: {exc}"
            raise self._error(msg, port=port) from exc

    def _touch_log(self) -> None:
        """pg_ctl opens the log as the server account: create it with that owner."""
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
            if self._owner is not None:
                os.chown(self.log_path, *self._owner)
        except OSError as exc:
            msg = f"cannot create the log file {self.log_path}: {exc}"
            raise self._error(msg) from exc
