"""``cityops devices``: provision, rotate, revoke and list devices' broker credentials.

The registry and the files the broker reads live in the broker security
directory (``CITYOPS_BROKER_SECURITY_DIR``, default
``{CITYOPS_DATA_DIR}/mosquitto/security``). After a change the embedded broker is
told to reload them; an external broker (``CITYOPS_MQTT_URL`` set) is reloaded by
its operator (docs/security.md).
"""

from __future__ import annotations

import argparse
import sys

from cityops.broker_security import DOMAINS, CredentialStore, ProvisionedDevice
from cityops.errors import CityopsError
from cityops.runtime import broker_security, embedded_broker
from cityops.settings import Settings

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cityops devices provision|revoke|list``."""
    devices = subparsers.add_parser("devices", help="devices' MQTT credentials on the broker")
    sub = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)

    provision = sub.add_parser(
        "provision",
        help="issue a device's MQTT username and password (shown once), optionally a certificate",
    )
    provision.add_argument("device_id", metavar="DEVICE_ID", help="[a-z0-9-]+")
    provision.add_argument("--domain", required=True, choices=DOMAINS)
    provision.add_argument("--district", required=True, help="[a-z0-9-]+")
    provision.add_argument(
        "--rotate", action="store_true", help="replace the secrets of a provisioned device"
    )
    provision.add_argument(
        "--cert",
        action="store_true",
        help="also issue a client certificate (CN=DEVICE_ID) signed by the local CA",
    )
    provision.set_defaults(handler=_provision)

    revoke = sub.add_parser("revoke", help="remove a device's user, ACL and certificate")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.set_defaults(handler=_revoke)

    listing = sub.add_parser("list", help="provisioned devices")
    listing.set_defaults(handler=_list)


def _store(settings: Settings) -> CredentialStore:
    return CredentialStore(broker_security(settings).directory)


def _apply(settings: Settings, store: CredentialStore) -> str:
    """Make the broker use the new files; a line saying what happened."""
    if settings.mqtt_url is not None:
        return (
            f"external broker: reload it to apply {store.password_file}, {store.acl_file}"
            f" and {store.ca.crl_file} (Mosquitto: kill -HUP <pid>)"
        )
    if embedded_broker(settings).reload():
        return "embedded broker reloaded: in force now"
    return "embedded broker not running: in force from its next start"


def _print_provisioned(result: ProvisionedDevice, settings: Settings) -> None:
    device = result.device
    broker = embedded_broker(settings) if settings.mqtt_url is None else None
    lines = [
        f"device {device.device_id} provisioned ({device.domain} / {device.district})",
        f"  username:  {device.device_id}",
        f"  password:  {result.password}",
        "             (shown this once: cityops keeps only its hash)",
        f"  publishes: {device.readings_topic}",
        f"             {device.status_topic}  (retained presence, last will)",
    ]
    if broker is not None and broker.tls_url is not None:
        lines.append(f"  broker:    {broker.tls_url}  (CA {broker.ca_file})")
    if result.certificate is not None:
        lines += [
            f"  cert:      {result.certificate.cert_file}  (CN={device.device_id})",
            f"  key:       {result.certificate.key_file}",
        ]
    print("\n".join(lines))


def _provision(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
        store = _store(settings)
        result = store.provision(
            args.device_id,
            domain=args.domain,
            district=args.district,
            rotate=args.rotate,
            certificate=args.cert,
        )
        _print_provisioned(result, settings)
        print(_apply(settings, store))
    except CityopsError as exc:
        print(f"cityops devices provision: {exc}", file=sys.stderr)
        return 1
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
        store = _store(settings)
        device = store.revoke(args.device_id)
        print(f"device {device.device_id} revoked")
        print(_apply(settings, store))
    except CityopsError as exc:
        print(f"cityops devices revoke: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        devices = _store(Settings.from_env()).devices()
    except CityopsError as exc:
        print(f"cityops devices list: {exc}", file=sys.stderr)
        return 1
    if not devices:
        print("no devices provisioned")
        return 0
    rows = [("DEVICE", "DOMAIN", "DISTRICT", "LOGIN", "PROVISIONED")]
    for d in devices:
        login = "+".join(
            kind
            for kind, present in (("password", d.password_hash), ("cert", d.cert_serial))
            if present
        )
        rows.append((d.device_id, d.domain, d.district, login, d.provisioned_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0
