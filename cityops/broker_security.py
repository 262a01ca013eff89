"""Who may connect to the broker and what each may publish or read.

cityops keeps the broker's users in one registry (``registry.json``, mode 0600,
under the security directory) and renders from it the two files Mosquitto
reads: a password file (``passwd``, hashes made by Debian's ``mosquitto_passwd``)
and an ACL file (``acl``). Mosquitto rereads both on SIGHUP; the embedded broker
is sent one after every change, an external broker is reloaded by its operator.

Two kinds of users:

* **devices** (``cityops devices provision``): one user per device, named by its
  id, allowed to publish its readings topic and its status topic
  (``city/{domain}/{district}/{device_id}`` and ``…/status``) and nothing else,
  reading included. A device may also (or instead) hold a client certificate
  with ``CN=device_id`` signed by the local CA.
* **services**: cityops's own processes (:class:`ServiceUser`), with passwords
  generated once and reused.

Passwords are hashed by ``mosquitto_passwd -U`` over a 0600 temporary file
rather than ``-b user password``: a password on a command line is visible to
every local user in ``ps`` while the hash runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cityops.broker_tls import IssuedCertificate, LocalCertificateAuthority, TlsFiles
from cityops.errors import BrokerSecurityError

__all__ = [
    "DOMAINS",
    "SERVICE_ACL",
    "AclRule",
    "BrokerSecurity",
    "CredentialStore",
    "Device",
    "ProvisionedDevice",
    "ServiceUser",
    "TlsListener",
    "render_acl_file",
    "render_security_conf",
]

DOMAINS = ("traffic", "facility", "emergency")
_NAME = re.compile(r"[a-z0-9-]+\Z")
_PASSWD_TIMEOUT_S = 30.0
_REGISTRY = "registry.json"


class ServiceUser(enum.StrEnum):
    """cityops's own broker users, one per kind of process."""

    INGEST = "cityops-ingest"
    ALERTS = "cityops-alerts"
    API = "cityops-api"
    SIMULATOR = "cityops-simulator"


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``topic read|write|readwrite FILTER`` line of a Mosquitto ACL file."""

    access: Literal["read", "write", "readwrite"]
    topic: str


# Mosquitto 2.0 checks a shared subscription ($share/{group}/city/#) against its
# filter without the $share/{group}/ prefix: these rules cover both.
_READ_CITY = (AclRule("read", "city/#"), AclRule("read", "cityops/replay/#"))

SERVICE_ACL: Mapping[ServiceUser, tuple[AclRule, ...]] = {
    # The standalone ingester runs the rules engine in process and publishes
    # its alert events with its own user.
    ServiceUser.INGEST: (*_READ_CITY, AclRule("write", "cityops/alerts/#")),
    ServiceUser.ALERTS: (AclRule("write", "cityops/alerts/#"),),
    # The API's live feed reads everything; acknowledgements publish alert
    # events; engineers' jobs (simulations, replays into the sandbox, drills
    # into the live namespace) publish devices' topics like a gateway.
    ServiceUser.API: (
        AclRule("readwrite", "city/#"),
        AclRule("readwrite", "cityops/replay/#"),
        AclRule("readwrite", "cityops/alerts/#"),
    ),
    # A gateway: the simulator stands in for thousands of devices, so it may
    # publish any device's topics; `cityops record` reads with it too.
    ServiceUser.SIMULATOR: (
        AclRule("readwrite", "city/#"),
        AclRule("readwrite", "cityops/replay/#"),
    ),
}


@dataclass(frozen=True, slots=True)
class Device:
    """A provisioned device as the registry keeps it."""

    device_id: str
    domain: str
    district: str
    password_hash: str | None = None
    cert_serial: int | None = None
    provisioned_at: str = ""

    @property
    def readings_topic(self) -> str:
        """``city/{domain}/{district}/{device_id}``."""
        return f"city/{self.domain}/{self.district}/{self.device_id}"

    @property
    def status_topic(self) -> str:
        """``city/{domain}/{district}/{device_id}/status`` (retained presence, LWT)."""
        return f"{self.readings_topic}/status"

    @property
    def acl(self) -> tuple[AclRule, ...]:
        """Publish its readings and status; read nothing."""
        return (AclRule("write", self.readings_topic), AclRule("write", self.status_topic))


@dataclass(frozen=True, slots=True)
class ProvisionedDevice:
    """The result of provisioning: secrets shown once, never stored in clear."""

    device: Device
    password: str | None
    certificate: IssuedCertificate | None


@dataclass(frozen=True, slots=True)
class TlsListener:
    """The broker's ``mqtts://`` listener as written into mosquitto.conf."""

    host: str
    port: int
    files: TlsFiles
    crl_file: Path | None
    client_certificates: bool


@dataclass(frozen=True, slots=True)
class BrokerSecurity:
    """Authentication, ACLs and TLS for an embedded broker.

    Attributes:
        directory: where the registry, password file, ACL file and local CA live.
        tls: serve a TLS listener besides the plain one.
        tls_host: the TLS listener's address (``0.0.0.0`` to reach field devices).
        tls_port: its port; ``None`` reuses the previous one or picks a free one.
        client_certificates: require a client certificate on the TLS listener and
            use its CN as the username (password login is then plain-listener only).
        server_tls: the operator's CA, server certificate and key; ``None`` uses
            the local CA, which issues a server certificate for ``server_names``.
        server_names: extra host names and addresses for the generated certificate.
        mosquitto_passwd: the ``mosquitto_passwd`` program (default: found on PATH).
    """

    directory: Path
    tls: bool = True
    tls_host: str = "127.0.0.1"
    tls_port: int | None = None
    client_certificates: bool = False
    server_tls: TlsFiles | None = None
    server_names: tuple[str, ...] = field(default=())
    mosquitto_passwd: Path | None = None


def _check_name(what: str, value: str) -> None:
    if not _NAME.match(value):
        msg = f"{what} {value!r} must match [a-z0-9-]+"
        raise BrokerSecurityError(msg)


def render_acl_file(devices: Iterable[Device]) -> str:
    """The Mosquitto ACL file for the services and ``devices`` (pure)."""
    lines = ["# Written by cityops (cityops devices …): edits are overwritten.", ""]
    blocks: list[tuple[str, tuple[AclRule, ...]]] = [
        (str(user), rules) for user, rules in SERVICE_ACL.items()
    ]
    blocks += [(d.device_id, d.acl) for d in sorted(devices, key=lambda d: d.device_id)]
    for user, rules in blocks:
        lines.append(f"user {user}")
        lines.extend(f"topic {rule.access} {rule.topic}" for rule in rules)
        lines.append("")
    return "\n".join(lines)


def render_password_file(hashes: Mapping[str, str]) -> str:
    """``user:hash`` lines, sorted (pure)."""
    return "".join(f"{user}:{hashes[user]}\n" for user in sorted(hashes))


def render_security_conf(
    *, password_file: Path, acl_file: Path, tls: TlsListener | None
) -> list[str]:
    """The mosquitto.conf lines that turn authentication, ACLs and TLS on (pure)."""
    lines = [
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
    ]
    if tls is not None:
        lines += [
            f"listener {tls.port} {tls.host}",
            f"cafile {tls.files.ca_file}",
            f"certfile {tls.files.cert_file}",
            f"keyfile {tls.files.key_file}",
            "tls_version tlsv1.2",
        ]
        if tls.crl_file is not None:
            lines.append(f"crlfile {tls.crl_file}")
        if tls.client_certificates:
            lines += ["require_certificate true", "use_identity_as_username true"]
    return lines


class CredentialStore:
    """The registry of broker users in ``directory`` and the files rendered from it.

    Every change takes an exclusive lock on ``directory/.lock``, so two
    ``cityops devices`` commands never lose each other's update.
    """

    def __init__(self, directory: Path, *, mosquitto_passwd: Path | None = None) -> None:
        self.directory = directory
        self.ca = LocalCertificateAuthority(directory / "tls")
        self._mosquitto_passwd = mosquitto_passwd

    @property
    def password_file(self) -> Path:
        """The Mosquitto password file (``password_file`` in mosquitto.conf)."""
        return self.directory / "passwd"

    @property
    def acl_file(self) -> Path:
        """The Mosquitto ACL file (``acl_file`` in mosquitto.conf)."""
        return self.directory / "acl"

    # ---------------------------------------------------------------- services

    def ensure_service_credentials(self) -> dict[ServiceUser, str]:
        """Passwords of the service users: generated on first use, then reused.

        Also (re)writes the password and ACL files, so a fresh directory is
        ready for the broker.
        """
        with self._locked() as registry:
            services: dict[str, dict[str, str]] = registry.setdefault("services", {})
            missing = {
                str(user): secrets.token_urlsafe(24) for user in ServiceUser if user not in services
            }
            for user, hashed in self._hash(missing).items():
                services[user] = {"password": missing[user], "hash": hashed}
            self._write_broker_files(registry)
            return {user: services[str(user)]["password"] for user in ServiceUser}

    def service_password(self, user: ServiceUser) -> str | None:
        """A service user's password, or ``None`` before the first broker start."""
        services = self._read().get("services", {})
        entry = services.get(str(user)) if isinstance(services, dict) else None
        return entry["password"] if isinstance(entry, dict) else None

    # ----------------------------------------------------------------- devices

    def devices(self) -> list[Device]:
        """The provisioned devices, by id."""
        return sorted(_devices(self._read()).values(), key=lambda d: d.device_id)

    def provision(
        self,
        device_id: str,
        *,
        domain: str,
        district: str,
        rotate: bool = False,
        certificate: bool = False,
    ) -> ProvisionedDevice:
        """Issue a device's password (and client certificate) and write the broker files.

        Raises:
            BrokerSecurityError: a bad id, domain or district; the device exists and
                ``rotate`` is false; or ``rotate`` for a device never provisioned.
        """
        _check_name("device id", device_id)
        _check_name("district", district)
        if domain not in DOMAINS:
            msg = f"domain {domain!r} must be one of {', '.join(DOMAINS)}"
            raise BrokerSecurityError(msg)
        if device_id in {str(u) for u in ServiceUser}:
            msg = f"device id {device_id!r} is a cityops service user"
            raise BrokerSecurityError(msg)
        with self._locked() as registry:
            devices = _devices(registry)
            old = devices.get(device_id)
            if old is not None and not rotate:
                msg = f"device {device_id!r} is already provisioned: pass --rotate for new secrets"
                raise BrokerSecurityError(msg)
            if old is None and rotate:
                msg = f"device {device_id!r} is not provisioned: nothing to rotate"
                raise BrokerSecurityError(msg)
            password = secrets.token_urlsafe(24)
            issued = self.ca.issue_client_certificate(device_id) if certificate else None
            device = Device(
                device_id=device_id,
                domain=domain,
                district=district,
                password_hash=self._hash({device_id: password})[device_id],
                cert_serial=issued.serial if issued else None,
                provisioned_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            )
            if old is not None and old.cert_serial is not None:
                _revoke_serial(registry, old.cert_serial)  # the rotated-out certificate
            devices[device_id] = device
            registry["devices"] = {k: asdict(v) for k, v in devices.items()}
            self._write_broker_files(registry)
            return ProvisionedDevice(device=device, password=password, certificate=issued)

    def revoke(self, device_id: str) -> Device:
        """Remove a device's user and ACL and revoke its client certificate.

        Raises:
            BrokerSecurityError: no such device.
        """
        with self._locked() as registry:
            devices = _devices(registry)
            device = devices.pop(device_id, None)
            if device is None:
                msg = f"device {device_id!r} is not provisioned"
                raise BrokerSecurityError(msg)
            if device.cert_serial is not None:
                _revoke_serial(registry, device.cert_serial)
            registry["devices"] = {k: asdict(v) for k, v in devices.items()}
            self._write_broker_files(registry)
            return device

    # --------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The registry under an exclusive lock; written back when the block succeeds."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            msg = f"security directory {self.directory} is unusable: {exc}"
            raise BrokerSecurityError(msg) from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            registry = self._read()
            yield registry
            _write_private(self.directory / _REGISTRY, json.dumps(registry, indent=1) + "\n")
        finally:
            os.close(lock)

    def _read(self) -> dict[str, Any]:
        path = self.directory / _REGISTRY
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            msg = f"cannot read the broker user registry {path}: {exc}"
            raise BrokerSecurityError(msg) from exc
        return data if isinstance(data, dict) else {}

    def _write_broker_files(self, registry: dict[str, Any]) -> None:
        devices = _devices(registry).values()
        services = registry.get("services", {})
        hashes = {u: e["hash"] for u, e in services.items()} if isinstance(services, dict) else {}
        hashes |= {d.device_id: d.password_hash for d in devices if d.password_hash}
        self.ca.ensure()
        revoked = registry.get("revoked_serials", [])
        self.ca.write_crl(revoked if isinstance(revoked, list) else [])
        _write_private(self.password_file, render_password_file(hashes))
        _write_private(self.acl_file, render_acl_file(devices))

    def _passwd_program(self) -> str:
        if self._mosquitto_passwd is not None:
            return str(self._mosquitto_passwd)
        found = shutil.which("mosquitto_passwd") or shutil.which(
            "mosquitto_passwd", path="/usr/bin:/usr/sbin"
        )
        if found is None:
            msg = "mosquitto_passwd not found on PATH (Debian: apt-get install mosquitto)"
            raise BrokerSecurityError(msg)
        return found

    def _hash(self, passwords: Mapping[str, str]) -> dict[str, str]:
        """Hash with ``mosquitto_passwd -U`` (PBKDF2-SHA512), one run for all."""
        if not passwords:
            return {}
        program = self._passwd_program()
        scratch = self.directory / f".hash-{secrets.token_hex(8)}"
        try:
            _write_private(scratch, "".join(f"{u}:{p}\n" for u, p in passwords.items()))
            result = subprocess.run(
                [program, "-U", str(scratch)],
                capture_output=True,
                text=True,
                timeout=_PASSWD_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                msg = f"{program} -U failed with code {result.returncode}: {result.stderr.strip()}"
                raise BrokerSecurityError(msg)
            hashed = dict(line.split(":", 1) for line in scratch.read_text().splitlines() if line)
        except (OSError, subprocess.SubprocessError) as exc:
            msg = f"cannot hash passwords with {program}: {exc}"
            raise BrokerSecurityError(msg) from exc
        finally:
            scratch.unlink(missing_ok=True)
        return {user: hashed[user] for user in passwords}


def _devices(registry: Mapping[str, Any]) -> dict[str, Device]:
    raw = registry.get("devices", {})
    if not isinstance(raw, dict):
        return {}
    return {device_id: Device(**entry) for device_id, entry in raw.items()}


def _revoke_serial(registry: dict[str, Any], serial: int) -> None:
    revoked = registry.setdefault("revoked_serials", [])
    if isinstance(revoked, list) and serial not in revoked:
        revoked.append(serial)


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: secrets, hashes and who may do what."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
